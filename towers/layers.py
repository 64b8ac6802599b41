"""Dense building blocks shared by both towers: MLP, DCN-v2 cross layers, L2 normalisation."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """Scales each row to unit L2 norm. x: [..., d] -> [..., d]."""
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


class MLP(nnx.Module):
    """Stack of Linear layers with ReLU between them (none after the last).

    Args:
      in_dim: input width.
      widths: output width of each layer; the last one is the MLP's output width.
    """

    def __init__(self, in_dim: int, widths: list[int], *, rngs: nnx.Rngs):
        dims = [in_dim, *widths]
        self.layers = nnx.List(
            [nnx.Linear(a, b, rngs=rngs) for a, b in zip(dims[:-1], dims[1:])]
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = jax.nn.relu(x)
        return x


class CrossNetwork(nnx.Module):
    """DCN-v2 cross layers (Wang et al., WWW 2021): x_{l+1} = x_0 * (W_l x_l + b_l) + x_l.

    Explicit bounded-degree feature crosses, cheap next to the MLP. W_l may be low-rank (U V^T) when
    `rank` is set, as the paper recommends for wide inputs.
    """

    def __init__(self, dim: int, num_layers: int, *, rank: int | None = None, rngs: nnx.Rngs):
        if rank:
            self.down = nnx.List([nnx.Linear(dim, rank, use_bias=False, rngs=rngs) for _ in range(num_layers)])
            self.up = nnx.List([nnx.Linear(rank, dim, rngs=rngs) for _ in range(num_layers)])
        else:
            self.down = nnx.List([])
            self.up = nnx.List([nnx.Linear(dim, dim, rngs=rngs) for _ in range(num_layers)])

    def __call__(self, x0: jax.Array) -> jax.Array:
        x = x0
        for i, up in enumerate(self.up):
            h = self.down[i](x) if len(self.down) else x
            x = x0 * up(h) + x
        return x
