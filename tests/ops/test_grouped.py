"""severjax.ops.grouped: the dense-block and taps implementations of the grouped convolution equal the native one."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from severjax import ops


@pytest.mark.parametrize("shape,groups,stride,padding,dilation", [
    ((2, 13, 18, 32), 8, 1, 1, 1), ((2, 13, 18, 32), 8, 2, 1, 1), ((1, 9, 11, 16), 4, 2, 0, 1),
    ((1, 7, 9, 16), 4, 3, 2, 1), ((2, 12, 17, 64), 4, 2, 1, 1),  # 16 channels a group: two dense blocks of 2 groups
    ((2, 9, 10, 128), 32, 1, 1, 1), ((1, 9, 10, 128), 32, 2, 1, 1),  # 4 channels a group: four blocks of 8 groups
    ((1, 6, 7, 96), 3, 1, 1, 1),  # 32 channels a group: one group a block
    ((1, 9, 11, 16), 4, 1, 2, 2),  # dilated
])
def test_grouped_conv_paths_match_native(shape, groups, stride, padding, dilation):
    rng = np.random.RandomState(5)
    x = jnp.asarray(rng.randn(*shape), jnp.float32)
    w = jnp.asarray(rng.randn(3, 3, shape[-1] // groups, shape[-1]), jnp.float32)
    pad = ((padding, padding),) * 2
    f = {impl: functools.partial(ops.grouped_conv, stride=(stride, stride), padding=pad, groups=groups, impl=impl,
                                 dilation=dilation)
         for impl in ("native", "dense_blocks", "taps")}
    y = f["native"](x, w)
    for impl in ("dense_blocks", "taps"):
        np.testing.assert_allclose(jax.jit(f[impl])(x, w), y, rtol=1e-5, atol=2e-5, err_msg=impl)
    gy = jnp.asarray(rng.randn(*y.shape), jnp.float32)
    grads = {impl: jax.jit(jax.grad(lambda x, w, fn=fn: jnp.sum(fn(x, w) * gy), argnums=(0, 1)))(x, w)
             for impl, fn in f.items()}
    for impl in ("dense_blocks", "taps"):
        for a, b in zip(grads[impl], grads["native"]):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4, err_msg=impl)


def test_grouped_conv_unknown_impl_names_the_choices():
    x, w = jnp.zeros((1, 4, 4, 8)), jnp.zeros((3, 3, 2, 8))
    with pytest.raises(ValueError, match=r"grouped_conv: impl must be 'auto' or one of "
                                         r"\('native', 'dense_blocks', 'taps'\), got 'dense'"):
        ops.grouped_conv(x, w, (1, 1), ((1, 1), (1, 1)), 4, impl="dense")
