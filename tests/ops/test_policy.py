"""severjax.ops.policy: off CPU every op is XLA's standard one; on CPU the rules pick the fast forms; every
implementation of every op computes the standard op's values and gradients; whole models traced for a GPU hold
no custom gradient."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from severjax import ops
from severjax.ops import policy

TRAIN = (True, False, None)
FACTS = [dict(group_width=g, features=f, doubles=d)
         for g, f, d in itertools.product((1, 4, 8, 16, 64), (1, 4, 8, 9, 256), (True, False))]
# ops whose implementations live outside severjax.ops (tests/test_postprocess.py checks those)
ELSEWHERE = {"small_components"}


def test_standard_is_a_candidate_and_listed_first():
    assert set(policy.STANDARD) == set(policy.CANDIDATES)
    for op, impls in policy.CANDIDATES.items():
        assert impls[0] == policy.STANDARD[op], op


@pytest.mark.parametrize("platform", ["gpu", "cuda", "rocm", "tpu"])
def test_off_cpu_every_op_is_the_standard_one(platform):
    with policy.platform(platform):
        assert policy.backend() in ("gpu", "tpu")
        for op, train, facts in itertools.product(policy.CANDIDATES, TRAIN, FACTS):
            assert policy.choose(op, train=train, **facts) == policy.STANDARD[op], (op, train, facts)
        for op in policy.CANDIDATES:  # no fact is needed where the answer does not depend on it
            assert policy.choose(op) == policy.STANDARD[op], op


def test_cpu_rules():
    with policy.platform("cpu"):
        choose = policy.choose
        for train in TRAIN:
            assert choose("pointwise_conv", train=train) == "dot_grad"
            assert choose("depthwise_conv", train=train) == "taps"
            assert choose("max_pool_ceil", train=train) == "taps_grad"
            assert choose("swish", train=train) == "recompute_grad"
            assert choose("upsample_concat_conv", train=train, doubles=True) == "taps"
            assert choose("upsample_concat_conv", train=train, doubles=False) == "native"
            assert choose("small_components", train=train) == "host"
        # grouped: elementwise taps for narrow groups in inference; dense blocks (convolution gradients) otherwise
        assert choose("grouped_conv", train=False, group_width=4) == "taps"
        assert choose("grouped_conv", train=False, group_width=policy.TAPS_MAX_GROUP_WIDTH) == "taps"
        assert choose("grouped_conv", train=False, group_width=16) == "dense_blocks"
        assert choose("grouped_conv", train=True, group_width=4) == "dense_blocks"
        assert choose("grouped_conv", train=None, group_width=4) == "dense_blocks"
        # 3x3: tap products for a few outputs in inference only
        assert choose("conv3x3", train=False, features=4) == "taps"
        assert choose("conv3x3", train=False, features=policy.CONV3X3_TAPS_MAX_FEATURES) == "taps"
        assert choose("conv3x3", train=False, features=policy.CONV3X3_TAPS_MAX_FEATURES + 1) == "native"
        assert choose("conv3x3", train=True, features=4) == "native"
        assert choose("conv3x3", train=None, features=4) == "native"


def test_a_named_impl_is_kept_and_errors_name_the_fault():
    with policy.platform("tpu"):
        assert policy.choose("grouped_conv", "taps", train=True) == "taps"
    with pytest.raises(ValueError, match="unknown op 'conv5x5'"):
        policy.choose("conv5x5")
    with pytest.raises(ValueError, match=r"depthwise_conv: impl must be 'auto' or one of \('native', 'taps'\), "
                                         r"got 'cpu'"):
        policy.choose("depthwise_conv", "cpu")
    with policy.platform("cpu"), pytest.raises(TypeError, match="group_width"):
        policy.choose("grouped_conv", train=False)


# op -> (fn(impl, *arrays), arrays): one small case an op; gradients are taken w.r.t. every array
def _cases():
    rng = np.random.RandomState(0)

    def a(*shape):
        return jnp.asarray(rng.randn(*shape), jnp.float32)

    return {
        "pointwise_conv": (lambda impl, x, k: ops.pointwise_conv(x, k, impl=impl), (a(2, 3, 4, 5), a(5, 6))),
        "depthwise_conv": (lambda impl, x, k: ops.depthwise_conv(x, k, 2, ((1, 1), (0, 1)), impl=impl),
                           (a(1, 7, 8, 4), a(3, 3, 1, 4))),
        "grouped_conv": (lambda impl, x, k: ops.grouped_conv(x, k, 1, 1, 4, impl=impl), (a(1, 6, 7, 16), a(3, 3, 4, 16))),
        "conv3x3": (lambda impl, x, k: ops.conv3x3(x, k, impl=impl), (a(1, 5, 6, 3), a(3, 3, 3, 4))),
        "upsample_concat_conv": (
            lambda impl, x, skip, k: ops.upsample_concat_conv3x3(x, skip, k, (6, 8), train=True, impl=impl),
            (a(1, 3, 4, 4), a(1, 6, 8, 2), a(3, 3, 6, 5))),
        "max_pool_ceil": (lambda impl, x: ops.max_pool_ceil(x, 3, 2, impl=impl), (a(1, 7, 9, 2),)),
        "swish": (lambda impl, x: ops.swish(x, impl=impl), (a(2, 9) * 4,)),
    }


def test_every_op_has_a_case():
    assert set(_cases()) == set(policy.CANDIDATES) - ELSEWHERE


@pytest.mark.parametrize("op,impl", [(op, impl) for op, impls in policy.CANDIDATES.items() if op not in ELSEWHERE
                                     for impl in impls[1:]])
def test_every_implementation_equals_the_standard_op(op, impl):
    fn, arrays = _cases()[op]
    standard = policy.STANDARD[op]

    def value_and_grads(impl):
        f = functools.partial(fn, impl)
        y, vjp = jax.vjp(f, *arrays)
        gy = jnp.asarray(np.random.RandomState(1).randn(*y.shape), jnp.float32)
        return y, vjp(gy)

    (y, grads), (y_std, grads_std) = jax.jit(value_and_grads, static_argnums=0)(impl), value_and_grads(standard)
    np.testing.assert_allclose(y, y_std, rtol=1e-5, atol=1e-5, err_msg=f"{op} {impl} values")
    for i, (g, g_std) in enumerate(zip(grads, grads_std)):
        np.testing.assert_allclose(g, g_std, rtol=1e-4, atol=1e-4, err_msg=f"{op} {impl} gradient {i}")


# ----------------------------------------------------------------------------------------------------
# whole models

CUSTOM_GRADIENT = {"custom_vjp_call", "custom_vjp_call_jaxpr", "custom_lin"}


@pytest.fixture
def tiny_se_resnext(monkeypatch):
    """An SE-ResNeXt encoder with one bottleneck a stage, under its own name in the encoder table."""
    from severjax.models import encoders

    monkeypatch.setitem(encoders.ENCODERS, "tiny_se_resnext", ("senet", "SENetEncoder", {"layers": (1, 1, 1, 1)}))
    return "tiny_se_resnext"


@pytest.mark.parametrize("arch,encoder,kw", [
    ("unet", "tiny_se_resnext", {"decoder_channels": (16, 8, 8, 8, 8)}),  # grouped, max pool, upsample+concat, head
    ("fpn", "efficientnet-b0", {}),  # depthwise, pointwise, swish
])
def test_models_traced_for_gpu_hold_no_custom_gradient(tiny_se_resnext, arch, encoder, kw):
    # A custom_vjp shows in a forward trace as custom_vjp_call and in a JVP (what grad differentiates) as
    # custom_lin; both are traced, in training and inference. Tracing only: nothing is compiled.
    from severjax.models import create_model

    model = create_model(arch, encoder, **kw)
    x = jax.ShapeDtypeStruct((1, 64, 64, 1), jnp.float32)
    variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros(x.shape), train=False))

    def loss(params, stats, x, train):
        y, _ = model.apply({"params": params, "batch_stats": stats}, x, train=train,
                           rngs={"dropout": jax.random.PRNGKey(0)}, mutable=["batch_stats"])
        return jnp.mean(y ** 2)

    def found(platform):
        names = set()
        with policy.platform(platform):
            for train in (True, False):
                f = functools.partial(loss, train=train)
                args = (variables["params"], variables["batch_stats"], x)
                names |= _primitives(jax.make_jaxpr(f)(*args).jaxpr)
                jvp = jax.make_jaxpr(lambda p, s, x: jax.jvp(lambda p: f(p, s, x), (p,), (p,)))(*args)
                names |= _primitives(jvp.jaxpr)
        return names & CUSTOM_GRADIENT

    assert found("gpu") == set()
    assert found("cpu") == {"custom_vjp_call", "custom_lin"}  # the check sees them where they are


def _primitives(jaxpr) -> set:
    """Every primitive name in ``jaxpr`` and the jaxprs inside its equations (jit, scan, custom calls ...)."""
    names = set()
    for eqn in jaxpr.eqns:
        names.add(eqn.primitive.name)
        for value in eqn.params.values():
            for sub in value if isinstance(value, (list, tuple)) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    names |= _primitives(inner)
    return names
