"""severjax.ops.conv: each implementation of the pointwise, depthwise and 3x3 convolutions equals the native one."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from severjax import ops
from severjax.ops.conv import int_pair, padding_pairs

RNG = np.random.RandomState(0)


@pytest.mark.parametrize("k,stride,dilation,padding", [
    (3, 1, 1, ((1, 1), (1, 1))),
    (5, 2, 1, ((1, 2), (1, 2))),
    (3, 2, 1, ((0, 1), (0, 1))),
    (3, 1, 2, ((2, 2), (1, 3))),
    (5, 2, 1, ((2, 2), (2, 2))),
])
def test_depthwise_taps_equals_native_forward_and_grads(k, stride, dilation, padding):
    x = jnp.asarray(RNG.randn(2, 13, 18, 8), jnp.float32)
    w = jnp.asarray(RNG.randn(k, k, 1, 8), jnp.float32)
    fn = {impl: functools.partial(ops.depthwise_conv, stride=(stride, stride), padding=padding,
                                  dilation=(dilation, dilation), impl=impl) for impl in ("native", "taps")}
    y_native, y_taps = fn["native"](x, w), jax.jit(fn["taps"])(x, w)
    np.testing.assert_allclose(y_taps, y_native, rtol=1e-5, atol=1e-5)
    g = jnp.asarray(RNG.randn(*y_native.shape), jnp.float32)
    grads = {impl: jax.jit(jax.grad(lambda x, w, f=f: jnp.sum(f(x, w) * g), argnums=(0, 1)))(x, w)
             for impl, f in fn.items()}
    np.testing.assert_allclose(grads["taps"][0], grads["native"][0], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(grads["taps"][1], grads["native"][1], rtol=1e-4, atol=1e-4)


def test_pointwise_conv_gradients_match_plain_dot():
    rng = np.random.RandomState(8)
    x = jnp.asarray(rng.randn(2, 5, 7, 12), jnp.float32)
    w = jnp.asarray(rng.randn(12, 20), jnp.float32)
    gy = jnp.asarray(rng.randn(2, 5, 7, 20), jnp.float32)
    fn = {impl: functools.partial(ops.pointwise_conv, impl=impl) for impl in ("dot_grad", "native")}
    grads = [jax.jit(jax.grad(lambda x, w, f=f: jnp.sum(f(x, w) * gy), argnums=(0, 1)))(x, w) for f in fn.values()]
    np.testing.assert_allclose(fn["dot_grad"](x, w), fn["native"](x, w), rtol=1e-6)
    for a, b in zip(*grads):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape,out", [((2, 5, 7, 6), 4), ((1, 1, 3, 2), 5), ((1, 4, 4, 3), 16)])
def test_conv3x3_taps_equals_native_forward_and_grads(shape, out):
    x = jnp.asarray(RNG.randn(*shape), jnp.float32)
    w = jnp.asarray(RNG.randn(3, 3, shape[-1], out), jnp.float32)
    gy = jnp.asarray(RNG.randn(*shape[:3], out), jnp.float32)
    fn = {impl: functools.partial(ops.conv3x3, impl=impl) for impl in ("native", "taps")}
    np.testing.assert_allclose(jax.jit(fn["taps"])(x, w), fn["native"](x, w), rtol=1e-5, atol=1e-5)
    grads = {impl: jax.jit(jax.grad(lambda x, w, f=f: jnp.sum(f(x, w) * gy), argnums=(0, 1)))(x, w)
             for impl, f in fn.items()}
    for a, b in zip(grads["taps"], grads["native"]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_shape_arguments_are_read_as_torch_writes_them():
    assert int_pair(3) == (3, 3) and int_pair((1, 7)) == (1, 7)
    assert padding_pairs(1) == ((1, 1), (1, 1))
    assert padding_pairs((0, 3)) == ((0, 0), (3, 3))
    assert padding_pairs(((0, 1), (2, 3))) == ((0, 1), (2, 3))
    with pytest.raises(ValueError, match=r"an int or a pair, got \(1, 2, 3\)"):
        int_pair((1, 2, 3))
