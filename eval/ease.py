"""EASE (Steck, WWW 2019, "Embarrassingly Shallow Autoencoders for Sparse Data"): a closed-form item-item
linear baseline, and a blocked numpy top-k over its scores.

With the binary user x item training matrix X [U, N]:

    P = (XᵀX + λI)⁻¹,    B = I - P · diag(1 / diag(P))    (so B_ij = -P_ij / P_jj and diag(B) = 0)

and a user's scores are ``X_u B``. The N x N inverse costs O(N³) time: on a 2-core CPU about 5 s at N = 4,000,
80 s at N = 10,000 and ten minutes at N = 20,000, which is why the evaluation run skips EASE above
``baselines.ease_max_items`` unless asked. Up to ``DENSE_INVERSE_MAX_ITEMS`` the inverse is a float64
``np.linalg.inv``; above it (Gowalla's 40,981 items) the fit is float32 and in place: the Gram matrix is densified
straight into one float32 [N, N] array and inverted there by LAPACK's Cholesky pair (potrf, potri), so it needs
4 N² bytes (6.7 GB at 41k items) instead of the 16-24 N² of a float64 ``inv``. Those two calls run
single-threaded: OpenBLAS's threaded potrf has been reported to crash at this size (the peers' harness,
``../shared/peers``, fits Gowalla's EASE the same way).

Scores are computed block by block as a sparse-dense product (scipy.sparse), so X is never densified; the same
exclusions and tie rule as ``towers.inference.exact.exact_topk`` apply (excluded items never appear; equal
scores go to the smaller item id; ``-1`` pads rows with fewer than k eligible items).
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from eval.metrics import PAD, csr_pairs


def interaction_matrix(indptr, items, num_items: int, users=None) -> sp.csr_matrix:
    """Binary CSR matrix of the selected rows of an item CSR; repeated (user, item) pairs count once.

    Args:
      indptr: int64[R + 1] CSR offsets. items: int[nnz] item ids in [0, num_items).
      num_items: N, the number of columns.
      users: optional int[Q] rows to select (None: all R rows).

    Returns:
      float64 csr_matrix [Q or R, N] with ones where the user interacted.
    """
    rows, cols, num_rows = csr_pairs(indptr, items, users, num_cols=num_items, name="interactions")
    x = sp.csr_matrix((np.ones(rows.size), (rows, cols)), shape=(num_rows, num_items))
    x.sum_duplicates()
    x.data[:] = 1.0
    return x


def ease_weights(train_indptr, train_items, num_items: int, lam: float = 500.0) -> np.ndarray:
    """The EASE item-item matrix B.

    Args:
      train_indptr: int64[U + 1] CSR offsets of every user's training items.
      train_items: int[nnz] training item ids.
      num_items: N.
      lam: the L2 weight λ > 0 added to the Gram matrix's diagonal.

    Returns:
      float32[N, N] B with a zero diagonal; scores of a user are ``x_u @ B``.
    """
    if not lam > 0:
        raise ValueError(f"EASE needs lam > 0 (the Gram matrix is singular without it), got {lam}")
    return ease_from_gram(gram_matrix(train_indptr, train_items, num_items), lam)


def gram_matrix(train_indptr, train_items, num_items: int) -> sp.csr_matrix:
    """XᵀX of the binary interaction matrix of these CSR rows: float64 sparse [N, N] of co-occurrence counts.

    XᵀX is a sum over users, so the Gram matrix of a whole split is the sum of those of its users' chunks
    (`eval.run` streams a prepared dataset this way, chunk by chunk, without its interactions in memory).
    """
    x = interaction_matrix(train_indptr, train_items, num_items)
    return (x.T @ x).tocsr()


DENSE_INVERSE_MAX_ITEMS = 20_000


def ease_from_gram(gram, lam: float = 500.0, *, in_place: bool | None = None) -> np.ndarray:
    """The EASE item-item matrix B from XᵀX (sparse or dense [N, N]); see `ease_weights`.

    Args:
      in_place: the float32 in-place Cholesky fit (`_ease_in_place`); None chooses it above
        ``DENSE_INVERSE_MAX_ITEMS`` items.
    """
    if not lam > 0:
        raise ValueError(f"EASE needs lam > 0 (the Gram matrix is singular without it), got {lam}")
    num_items = gram.shape[0]
    if in_place is None:
        in_place = num_items > DENSE_INVERSE_MAX_ITEMS
    if in_place:
        return _ease_in_place(gram, lam)
    gram = gram.toarray() if sp.issparse(gram) else np.array(gram, np.float64)
    gram[np.diag_indices(num_items)] += lam
    p = np.linalg.inv(gram)
    b = p / -np.diag(p)[None, :]
    b[np.diag_indices(num_items)] = 0.0
    return b.astype(np.float32)


def _ease_in_place(gram, lam: float, block: int = 2048) -> np.ndarray:
    """B in one float32 [N, N] array: Cholesky factor and inverse by LAPACK in place, then B's scaling in place."""
    from scipy.linalg import lapack
    from threadpoolctl import threadpool_limits

    n = gram.shape[0]
    a = np.zeros((n, n), np.float32)
    if sp.issparse(gram):
        coo = gram.tocoo()
        a[coo.row, coo.col] = coo.data      # no float64 dense copy of the Gram matrix
        del coo
    else:
        a[...] = gram
    a[np.diag_indices(n)] += np.float32(lam)
    potrf, potri = lapack.get_lapack_funcs(("potrf", "potri"), (a,))
    with threadpool_limits(1, "blas"):
        # a.T is the same symmetric matrix in Fortran order: LAPACK works on it without a copy. Its upper
        # triangle is a's lower one.
        c, info = potrf(a.T, lower=0, overwrite_a=1, clean=0)
        if info != 0:
            raise np.linalg.LinAlgError(f"EASE: Cholesky factorisation failed (potrf info={info}); "
                                        "raise baselines.ease_lambda")
        c, info = potri(c, lower=0, overwrite_c=1)
        if info != 0:
            raise np.linalg.LinAlgError(f"EASE: inverse from the Cholesky factor failed (potri info={info})")
    if not np.shares_memory(c, a):
        raise RuntimeError("EASE: LAPACK copied the Gram matrix instead of working in place")
    # P's lower triangle (in a's C order) is filled; mirror it into the upper one, a block of rows at a time.
    for r0 in range(0, n, block):
        r1 = min(n, r0 + block)
        d = a[r0:r1, r0:r1]
        d[...] = np.tril(d) + np.tril(d, -1).T
        if r1 < n:
            a[r0:r1, r1:] = a[r1:, r0:r1].T
    diag = np.diag(a).copy()
    for r0 in range(0, n, block):      # B = P / -diag(P) by columns, in place
        a[r0:r0 + block] /= -diag[None, :]
    a[np.diag_indices(n)] = 0.0
    return a


def topk_rows(scores: np.ndarray, k: int) -> np.ndarray:
    """Top-k columns of each row by score, ties to the smaller column, ``-inf`` entries never returned.

    Args:
      scores: float[B, N]; ``-inf`` marks excluded items.
      k: results per row, in [1, N].

    Returns:
      int32[B, k] column ids, best first; ``-1`` where a row has fewer than k finite scores.
    """
    b, n = scores.shape
    kth = -np.partition(-scores, k - 1, axis=1)[:, k - 1]
    above = scores > kth[:, None]
    # Rows whose k-th value is tied with columns outside the top k need the full stable sort for the tie rule;
    # other rows only sort their k candidates.
    tied = (above.sum(axis=1) + (scores == kth[:, None]).sum(axis=1)) > k
    out = np.empty((b, k), np.int64)
    clean = np.flatnonzero(~tied)
    if clean.size:
        cand = np.argpartition(-scores[clean], k - 1, axis=1)[:, :k]
        vals = np.take_along_axis(scores[clean], cand, axis=1)
        order = np.lexsort((cand, -vals), axis=1)
        out[clean] = np.take_along_axis(cand, order, axis=1)
    rest = np.flatnonzero(tied)
    if rest.size:
        out[rest] = np.argsort(-scores[rest], axis=1, kind="stable")[:, :k]
    finite = np.isfinite(np.take_along_axis(scores, out, axis=1))
    return np.where(finite, out, PAD).astype(np.int32)


def ease_topk(b: np.ndarray, train_indptr, train_items, users, k: int, *, exclude_indptr=None, exclude_items=None,
              user_block: int = 1024) -> np.ndarray:
    """EASE recommendations: top-k of ``x_u @ B`` per user, the user's excluded items (default: training items)
    never returned.

    Args:
      b: float32[N, N] from ``ease_weights``.
      train_indptr: int64[U + 1] CSR offsets of the training items (the model input).
      train_items: int[nnz] training item ids.
      users: int[Q] user rows to rank for.
      k: results per user, in [1, N].
      exclude_indptr: optional int64[Q + 1] CSR offsets, rows aligned with ``users``, of the items to exclude
        (e.g. training and validation items when ranking for test); None excludes the training items.
      exclude_items: optional int[nnz] excluded item ids, each in [0, N); given with ``exclude_indptr``.
      user_block: users scored per block (a block's dense scores take user_block * N * 4 bytes).

    Returns:
      int32[Q, k] item ids, best first, ``-1`` padded.
    """
    n = b.shape[0]
    if b.ndim != 2 or b.shape[1] != n:
        raise ValueError(f"b must be a square [N, N] matrix, got shape {b.shape}")
    if not isinstance(k, (int, np.integer)) or not 1 <= k <= n:
        raise ValueError(f"k must be an int in [1, N={n}], got {k!r}")
    if (exclude_indptr is None) != (exclude_items is None):
        raise ValueError("pass exclude_indptr and exclude_items together (a CSR of items to exclude), or neither")
    users = np.asarray(users, dtype=np.int64)
    if exclude_indptr is not None and len(exclude_indptr) != users.size + 1:
        raise ValueError(f"the exclusion CSR has {len(exclude_indptr) - 1} rows but {users.size} users are "
                         "ranked; its rows must align with users")
    out = np.empty((users.size, k), np.int32)
    for start in range(0, users.size, user_block):
        block = np.arange(start, min(start + user_block, users.size))
        x = interaction_matrix(train_indptr, train_items, n, users[block]).astype(b.dtype)  # b is never upcast
        scores = np.asarray(x @ b, dtype=np.float32)
        if exclude_indptr is None:
            rows, cols = x.nonzero()
        else:
            rows, cols, _ = csr_pairs(exclude_indptr, exclude_items, block, num_cols=n, name="exclusions")
        scores[rows, cols] = -np.inf
        out[start:start + user_block] = topk_rows(scores, int(k))
    return out
