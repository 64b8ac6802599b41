"""The on-disk index format: an index directory with a verified manifest, written atomically.

Layout of an index directory (e.g. `<run_dir>/export/<model_version>/`):

    manifest.json     what the index is (see `write_index`), the sha256 of every other file, and its own
                      sha256 (`manifest_json`)
    index.json        the index's type and parameters (`TopK.params()`)
    ids.npy           item ids in slot order: int64 or unicode, saved with allow_pickle=False
    embeddings.npy    float32 [N, D] item embeddings, row i belonging to ids[i]
    scann/            ScaNN's own artifacts (ScaNN indexes above the brute-force size only)

`write_index` writes everything into a hidden temporary sibling directory and renames it into place, so a
reader sees either no directory or a complete one; the temporary directory of a writer that was killed is
removed by the next write of the same directory. `load_index` refuses a directory whose manifest is missing
or malformed, whose files are missing, extra, truncated or altered, or whose contents disagree with the
manifest, raising `IndexLoadError` with what is wrong.

An index directory is data, never code. The manifest's checksums catch damage, not tampering (anyone who can
write the files can rewrite the manifest), so loading never depends on them for safety: a directory holding
any file its index type does not write (a pickle, say), or a symbolic link, is refused before anything is
read, and nothing is ever unpickled (`.npy` files load with allow_pickle=False; ScaNN's searcher is built
without its docids pickle, `serve.scann_index.load_scann_searcher`). The checks run cheapest first and the
model version before any other file: manifest, model version, file names, sizes and checksums, then the load.
"""
from __future__ import annotations

import datetime
import fcntl
import hashlib
import json
import logging
import os
import pathlib
import shutil
import uuid

import numpy as np

from data.paths import sha256_file
from serve.index import TopK
from serve.indexes import index_class

log = logging.getLogger("twotower.manifest")

MANIFEST = "manifest.json"
FORMAT_VERSION = 2          # 2 adds manifest_sha256; version 1 directories are still read, without that check
_READS = (1, 2)
_DIGEST = "manifest_sha256"
_REQUIRED = ("format_version", "model_version", "embedding_dim", "dtype", "distance", "normalized",
             "num_items", "index", "created_utc", "files")


class IndexLoadError(RuntimeError):
    """An index directory is missing, partial, corrupt or inconsistent with its manifest."""


class ModelVersionError(IndexLoadError):
    """An index directory holds embeddings of another model version than the one asked for."""


def _files_of(directory: pathlib.Path) -> list[str]:
    return sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*")
                  if p.is_file() and p.name != MANIFEST)


def is_normalized(embeddings: np.ndarray, atol: float = 1e-3) -> bool:
    """Whether every row of float[N, D] has unit L2 norm (dot product then equals cosine)."""
    return bool(np.allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=atol))


def write_index(index: TopK, out_dir, *, model_version: str, extra: dict | None = None) -> pathlib.Path:
    """Saves `index` and its manifest into `out_dir`, atomically.

    An existing `out_dir` is replaced only when it is itself an index directory (it has a manifest.json);
    anything else there is an error, so a typo cannot delete unrelated files.

    Args:
      index: the index to write (N items of dim D).
      out_dir: the index directory to create.
      model_version: `TrainedModel.model_version` (checkpoint step + config hash) of the embeddings.
      extra: more manifest fields (e.g. "recall", "run_dir", "step").
    Returns:
      the absolute index directory.
    """
    out = pathlib.Path(out_dir).absolute()
    if out.exists() and not (out / MANIFEST).is_file():
        raise FileExistsError(f"{out} exists and is not an index directory (no {MANIFEST}); choose another "
                              "out= or remove it")
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_siblings(out)
    tmp, lock = _locked_tmp_dir(out)
    try:
        index.save(tmp)
        emb = np.load(tmp / "embeddings.npy", allow_pickle=False, mmap_mode="r")
        params = json.loads((tmp / "index.json").read_text())
        manifest = {
            **(extra or {}),
            "format_version": FORMAT_VERSION, "model_version": model_version,
            "embedding_dim": int(emb.shape[1]), "dtype": str(emb.dtype), "distance": "dot_product",
            "normalized": is_normalized(np.asarray(emb)), "num_items": int(emb.shape[0]),
            "id_kind": params["id_kind"], "index": params, "scann_version": params.get("scann_version"),
            "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "files": {rel: {"sha256": sha256_file(tmp / rel), "bytes": (tmp / rel).stat().st_size}
                      for rel in _files_of(tmp)},
        }
        # The manifest is written last: its presence marks a complete directory.
        (tmp / MANIFEST).write_text(manifest_json(manifest))
        _swap_into_place(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        os.close(lock)
    return out


def _canonical(manifest: dict) -> str:
    return json.dumps(manifest, indent=2, sort_keys=True)


def manifest_json(body: dict) -> str:
    """The manifest.json text of `body`: its canonical JSON with the sha256 of that JSON added as
    `manifest_sha256`, so a corrupted byte in the manifest is caught like one in any other file (an
    informational field such as created_utc included). Like the file checksums it guards against damage, not
    tampering: whoever can write the directory can recompute it."""
    body = {k: v for k, v in body.items() if k != _DIGEST}
    return _canonical({**body, _DIGEST: hashlib.sha256(_canonical(body).encode()).hexdigest()})


def _locked_tmp_dir(out: pathlib.Path) -> tuple[pathlib.Path, int]:
    """A new hidden temporary sibling of `out`, and a descriptor holding an exclusive flock on it.

    The kernel releases the lock when the writer dies, even by SIGKILL, which is how the next writer tells a
    dead writer's directory from a live one (`_remove_stale_siblings`). A directory that another writer's
    clean-up locked or removed between its creation and our lock is abandoned for a new one.
    """
    while True:
        tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        fd = os.open(tmp, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.fstat(fd).st_nlink:
                return tmp, fd
        except BlockingIOError:
            pass
        os.close(fd)


def _remove_stale_siblings(out: pathlib.Path) -> None:
    """Deletes what killed writers of `out` left behind: temporary directories that no live writer holds
    locked, and old copies a replace renamed aside (`_swap_into_place`) but did not get to delete."""
    for p in out.parent.iterdir():
        if p.is_symlink() or not p.is_dir():
            continue
        if p.name.startswith(f".{out.name}.old-"):
            shutil.rmtree(p, ignore_errors=True)
        elif p.name.startswith(f".{out.name}.tmp-"):
            try:
                fd = os.open(p, os.O_RDONLY)
            except OSError:   # removed meanwhile
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                log.info("removing %s, left by an export that did not finish", p)
                shutil.rmtree(p, ignore_errors=True)
            except BlockingIOError:   # a writer is at work in it
                pass
            finally:
                os.close(fd)


def _swap_into_place(tmp: pathlib.Path, out: pathlib.Path) -> None:
    """Renames tmp to out; an old out is first renamed aside, then deleted (each rename is atomic)."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
        os.rename(out, old)
    os.rename(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def read_manifest(index_dir, *, model_version: str | None = None) -> dict:
    """The parsed, checked manifest of an index directory (checksums of every file included).

    Args:
      index_dir: an index directory.
      model_version: if given, the manifest must name this model version; it is checked before any file
        other than the manifest is opened.
    Raises:
      ModelVersionError: another model version. IndexLoadError: no directory, no or malformed manifest, a
        missing, extra, unexpected or altered file, a symbolic link.
    """
    d = pathlib.Path(index_dir)
    manifest = _parse_manifest(d)
    if model_version is not None and manifest["model_version"] != model_version:
        raise ModelVersionError(f"{d} holds embeddings of model {manifest['model_version']}, not {model_version}; "
                                "export the index from the same checkpoint as the user tower")
    _check_files(d, manifest)
    return manifest


def _parse_manifest(d: pathlib.Path) -> dict:
    """manifest.json of `d`, parsed, with its required fields and format version checked."""
    if not d.is_dir():
        raise IndexLoadError(f"{d} is not a directory; pass an index directory written by `python -m serve.export`")
    path = d / MANIFEST
    if not path.is_file():
        raise IndexLoadError(f"{d} has no {MANIFEST}: not an index directory, or an export that did not finish; "
                             "re-run `python -m serve.export`")
    try:
        text = path.read_text()
        manifest = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise IndexLoadError(f"{path} is not valid JSON ({e}); the directory is corrupt, re-export it") from None
    missing = [k for k in _REQUIRED if k not in manifest] if isinstance(manifest, dict) else list(_REQUIRED)
    if missing:
        raise IndexLoadError(f"{path} lacks the fields {missing}; the manifest is corrupt or from another tool")
    if manifest["format_version"] not in _READS:
        raise IndexLoadError(f"{path} has format_version {manifest['format_version']!r}; this code reads "
                             f"versions {list(_READS)}")
    # Byte for byte: a flip that parses to the same values (1e-05 -> 1E-05) is caught too.
    if manifest["format_version"] >= 2 and text != manifest_json(manifest):
        raise IndexLoadError(f"{path} does not match its own {_DIGEST}; the manifest is corrupt or was edited, "
                             "re-export the index")
    files = manifest["files"]
    if not (isinstance(files, dict) and all(isinstance(v, dict) for v in files.values())
            and isinstance(manifest["index"], dict)):
        raise IndexLoadError(f"{path}: 'files' must map paths to {{sha256, bytes}} and 'index' be an object; "
                             "the manifest is corrupt or from another tool")
    return manifest


def _check_files(d: pathlib.Path, manifest: dict) -> None:
    """Names first (nothing unexpected is read), then presence, sizes and checksums."""
    try:
        allowed = set(index_class(manifest["index"].get("type")).files)
    except ValueError as e:
        raise IndexLoadError(f"{d / MANIFEST}: {e}; the manifest is corrupt or from another tool") from None
    links = sorted(p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_symlink())
    if links:
        raise IndexLoadError(f"{d} holds symbolic links {links}; an index directory holds regular files only, "
                             "re-export it")
    files, present = manifest["files"], set(_files_of(d))
    listed = set(files)
    unexpected = sorted((present | listed) - allowed)
    if unexpected:
        raise IndexLoadError(f"{d} holds {unexpected}, which a {manifest['index']['type']} index never has; "
                             "refused without reading anything (an index directory is data: no pickle or other "
                             "file is ever loaded from it)")
    if listed - present:
        raise IndexLoadError(f"{d} is missing {sorted(listed - present)} listed in its manifest; the directory "
                             "is partial, re-export it")
    if present - listed:
        raise IndexLoadError(f"{d} holds files its manifest does not list: {sorted(present - listed)}; "
                             "the directory was modified after export")
    for rel in sorted(listed):
        want, path = files[rel], d / rel
        if path.stat().st_size != want.get("bytes"):
            raise IndexLoadError(f"{path} has {path.stat().st_size} bytes, the manifest says {want.get('bytes')}; "
                                 "the file is truncated or altered, re-export the index")
        if sha256_file(path) != want.get("sha256"):
            raise IndexLoadError(f"{path} does not match its sha256 in the manifest; the file is corrupt or "
                                 "was altered, re-export the index")


def load_index(index_dir, *, model_version: str | None = None) -> tuple[TopK, dict]:
    """Verifies and loads an index directory.

    Args:
      index_dir: a directory written by `write_index`.
      model_version: if given, the manifest must name this model version (the server's user tower).
    Returns:
      (the index, the manifest dict).
    Raises:
      ModelVersionError: another model version (found from the manifest alone).
      IndexLoadError: on any missing, partial, corrupt, unexpected or mismatched content.
    """
    d = pathlib.Path(index_dir)
    manifest = read_manifest(d, model_version=model_version)
    try:
        index = TopK.load(d)
    except Exception as e:  # noqa: BLE001 - any unreadable file is a corrupt directory
        raise IndexLoadError(f"{d} cannot be loaded: {type(e).__name__}: {str(e)[:300]}") from e
    found = {"num_items": len(index), "embedding_dim": index.dim, "index.type": index.kind}
    said = {"num_items": manifest["num_items"], "embedding_dim": manifest["embedding_dim"],
            "index.type": manifest["index"].get("type")}
    if found != said:
        raise IndexLoadError(f"{d}: the files hold {found} but the manifest says {said}; the manifest was "
                             "altered, re-export the index")
    return index, manifest
