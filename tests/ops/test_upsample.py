"""severjax.ops.upsample: the Unet decoder's upsample + concatenate + 3x3 convolution as taps equals the native one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from severjax import ops


@pytest.mark.parametrize("shape,skip_channels,train", [
    ((2, 4, 6, 8), 5, False), ((1, 3, 5, 6), 0, True), ((2, 5, 4, 12), 3, True), ((1, 3, 4, 4), 2, None),
])
def test_upsample_concat_conv_taps_matches_native(shape, skip_channels, train):
    # conv3x3(concat(upsample2x(x), skip)) as x's tap products at low resolution + the skip's conv: values, gradients.
    rng = np.random.RandomState(9)
    b, h, w, c = shape
    x = jnp.asarray(rng.randn(*shape), jnp.float32)
    skip = jnp.asarray(rng.randn(b, 2 * h, 2 * w, skip_channels), jnp.float32) if skip_channels else None
    kernel = jnp.asarray(rng.randn(3, 3, c + skip_channels, 7) * 0.2, jnp.float32)
    gy = jnp.asarray(rng.randn(b, 2 * h, 2 * w, 7), jnp.float32)

    def loss(kernel, x, skip, impl):
        return jnp.sum(ops.upsample_concat_conv3x3(x, skip, kernel, (2 * h, 2 * w), train=train, impl=impl) * gy)

    outs = {impl: jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)), static_argnums=3)(kernel, x, skip, impl)
            for impl in ("native", "taps", "auto")}
    for impl in ("taps", "auto"):
        for got, want in zip(jax.tree_util.tree_leaves(outs[impl]), jax.tree_util.tree_leaves(outs["native"])):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # sizes that are not exactly twice the input: "auto" upsamples by index (native), "taps" refuses
    odd_skip = None if skip is None else skip[:, :-1]
    y = ops.upsample_concat_conv3x3(x, odd_skip, kernel, (2 * h - 1, 2 * w), train=train)
    assert y.shape == (b, 2 * h - 1, 2 * w, 7)
    with pytest.raises(ValueError, match="taps needs size twice"):
        ops.upsample_concat_conv3x3(x, odd_skip, kernel, (2 * h - 1, 2 * w), train=train, impl="taps")


def test_upsample_nearest_index_rule():
    # torch's legacy rule: source index floor(dst * in / out), an exact factor of two a plain repeat
    x = jnp.arange(5.0).reshape(1, 5, 1, 1)
    np.testing.assert_array_equal(ops.upsample_nearest(x, size=(7, 1))[0, :, 0, 0], [0, 0, 1, 2, 2, 3, 4])
    np.testing.assert_array_equal(ops.upsample_nearest(x, size=(3, 1))[0, :, 0, 0], [0, 1, 3])
    np.testing.assert_array_equal(ops.upsample_nearest(x, scale_factor=2.0)[0, :, 0, 0], np.repeat(np.arange(5), 2))
    with pytest.raises(ValueError, match="exactly one of size or scale_factor"):
        ops.upsample_nearest(x)
