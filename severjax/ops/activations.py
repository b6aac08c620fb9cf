"""Swish (``x * sigmoid(x)``, ``jax.nn.silu``), EfficientNet's activation.

``impl``: ``"native"`` (autodiff, which saves ``sigmoid(x)`` for the backward pass, so each BatchNorm +
swish fusion writes it as a second output) or ``"recompute_grad"`` (a hand-written gradient that keeps
``x`` and recomputes the sigmoid in the backward fusion; docs/performance.md, "Swish").
"""

from __future__ import annotations

import jax

from severjax.ops import policy


def swish(x: jax.Array, impl: str = "auto") -> jax.Array:
    """``x * sigmoid(x)``, by the implementation ``policy.choose("swish", impl)`` names."""
    if policy.choose("swish", impl) == "recompute_grad":
        return _swish_recompute_grad(x)
    return x * jax.nn.sigmoid(x)


@jax.custom_vjp
def _swish_recompute_grad(x):
    return x * jax.nn.sigmoid(x)


def _swish_fwd(x):
    return _swish_recompute_grad(x), x


def _swish_bwd(x, g):
    s = jax.nn.sigmoid(x)
    return (g * (s * (1 + x * (1 - s))),)


_swish_recompute_grad.defvjp(_swish_fwd, _swish_bwd)
