"""severjax.ops.activations: swish, either implementation, is jax.nn.silu in values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from severjax import ops


@pytest.mark.parametrize("impl", ["native", "recompute_grad", "auto"])
def test_swish_matches_silu_values_and_gradients(impl):
    rng = np.random.RandomState(0)
    x = jnp.asarray(rng.randn(3, 50) * 6, jnp.float32)
    g = jnp.asarray(rng.randn(3, 50), jnp.float32)
    np.testing.assert_allclose(ops.swish(x, impl=impl), jax.nn.silu(x), rtol=1e-6, atol=1e-7)
    grads = [jax.grad(lambda x, f=f: jnp.sum(f(x) * g))(x)
             for f in (lambda x: ops.swish(x, impl=impl), jax.nn.silu)]
    np.testing.assert_allclose(grads[0], grads[1], rtol=1e-5, atol=1e-6)
