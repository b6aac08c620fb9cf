"""severjax.ops.pooling: max_pool_ceil's hand-written gradient equals autodiff's of the native pool."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from severjax import ops


@pytest.mark.parametrize("shape,kernel,stride", [((2, 9, 11, 3), 3, 2), ((1, 8, 8, 2), 3, 2), ((1, 12, 17, 2), 3, 2),
                                                  ((1, 10, 7, 1), 2, 2)])
def test_max_pool_ceil_taps_grad_matches_native(shape, kernel, stride):
    x = jnp.asarray(np.random.RandomState(6).randn(*shape), jnp.float32)  # distinct values: one maximum a window
    y = {impl: ops.max_pool_ceil(x, kernel, stride, impl=impl) for impl in ("native", "taps_grad")}
    np.testing.assert_array_equal(y["taps_grad"], y["native"])
    gy = jnp.asarray(np.random.RandomState(7).randn(*y["native"].shape), jnp.float32)
    grads = {impl: jax.jit(jax.grad(lambda x, impl=impl: jnp.sum(ops.max_pool_ceil(x, kernel, stride, impl=impl) * gy)))(x)
             for impl in y}
    np.testing.assert_allclose(grads["taps_grad"], grads["native"], rtol=1e-6, atol=1e-6)


def test_max_pool2d_ceil_mode_keeps_a_last_window_that_starts_inside():
    x = jnp.arange(5.0).reshape(1, 5, 1, 1)
    np.testing.assert_array_equal(ops.max_pool2d(x, (2, 1), (2, 1), ceil_mode=True)[0, :, 0, 0], [1, 3, 4])
    np.testing.assert_array_equal(ops.max_pool2d(x, (2, 1), (2, 1))[0, :, 0, 0], [1, 3])
