"""Layers and ops with torch semantics, EfficientNet encoders, Unet/FPN/classifier: parity against SMP 0.6.0.

The equality of each op's implementations (no torch needed) is tests/ops/.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
smp = pytest.importorskip("segmentation_models_pytorch")
F = torch.nn.functional

from severjax import ops  # noqa: E402
from severjax.models import create_model  # noqa: E402
from severjax.models import layers  # noqa: E402
from severjax.models.convert import convert_smp_state_dict, expected_variables  # noqa: E402
from severjax.models.encoders.efficientnet import (EfficientNetEncoder, block_specs,  # noqa: E402
                                                   efficientnet_out_channels)

torch.set_num_threads(2)
RNG = np.random.RandomState(0)


def _nchw(x):
    return torch.from_numpy(np.ascontiguousarray(np.transpose(x, (0, 3, 1, 2))))


def _nhwc(t):
    return np.transpose(t.detach().numpy(), (0, 2, 3, 1))


# ----------------------------------------------------------------------------------------------------
# layers


@pytest.mark.parametrize("groups,dilation,stride,bias", [(1, 1, 1, True), (2, 2, 2, False), (6, 1, 2, True)])
def test_conv2d_matches_torch(groups, dilation, stride, bias):
    x = RNG.randn(2, 11, 14, 6).astype(np.float32)
    conv = layers.Conv2d(6, 3, stride, ((1, 2), (2, 0)), dilation, groups, use_bias=bias)
    v = conv.init(jax.random.PRNGKey(0), x)
    kernel = np.asarray(v["params"]["kernel"])
    tw = torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1)))
    tb = torch.from_numpy(np.asarray(v["params"]["bias"]) + 0.3) if bias else None
    if bias:
        v = {"params": {"kernel": kernel, "bias": np.asarray(v["params"]["bias"]) + 0.3}}
    ref = F.conv2d(F.pad(_nchw(x), (2, 0, 1, 2)), tw, tb, stride, 0, dilation, groups)
    np.testing.assert_allclose(conv.apply(v, x), _nhwc(ref), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape,out", [((2, 5, 7, 6), 4), ((1, 1, 3, 2), 5)])
def test_conv3x3_taps_matches_torch_values_and_gradients(shape, out):
    # a 3x3 conv as one matmul of the nine taps + a shifted sum, with its own gather-form gradient
    x = RNG.randn(*shape).astype(np.float32)
    gy = RNG.randn(*shape[:3], out).astype(np.float32)
    conv = layers.Conv2d(out, 3, padding=1)
    params = conv.init(jax.random.PRNGKey(2), x)["params"]

    def taps(x, p):
        return ops.conv3x3(x, p["kernel"], impl="taps") + p["bias"]

    y, (dx, dp) = jax.jit(jax.value_and_grad(lambda x, p: jnp.sum(taps(x, p) * gy), argnums=(0, 1)))(x, params)
    tx = _nchw(x).requires_grad_(True)
    tw = torch.from_numpy(np.ascontiguousarray(np.asarray(params["kernel"]).transpose(3, 2, 0, 1))).requires_grad_(True)
    tb = torch.from_numpy(np.array(params["bias"])).requires_grad_(True)
    ref = (F.conv2d(tx, tw, tb, padding=1) * _nchw(gy)).sum()
    ref.backward()
    np.testing.assert_allclose(y, ref.item(), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(dx, _nhwc(tx.grad), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dp["kernel"], tw.grad.numpy().transpose(2, 3, 1, 0), rtol=1e-5, atol=1e-5)
    # Conv2d in inference (the Unet head's use: taps where the policy says so) equals it without a use (native)
    np.testing.assert_allclose(conv.apply({"params": params}, x, train=False), conv.apply({"params": params}, x),
                               rtol=1e-5, atol=1e-5)


def test_conv2d_1x1_gradients_match_torch():
    # 1x1 convs run as a dot with a hand-written gradient on CPU (ops.pointwise_conv): check it end to end
    x = RNG.randn(2, 5, 7, 12).astype(np.float32)
    gy = RNG.randn(2, 5, 7, 20).astype(np.float32)
    conv = layers.Conv2d(20, 1)
    params = conv.init(jax.random.PRNGKey(1), x)["params"]
    params = {"kernel": params["kernel"], "bias": params["bias"] + 0.2}
    dx, dp = jax.jit(jax.grad(lambda x, p: jnp.sum(conv.apply({"params": p}, x) * gy), argnums=(0, 1)))(x, params)
    tx = _nchw(x).requires_grad_(True)
    tw = torch.from_numpy(np.ascontiguousarray(np.asarray(params["kernel"]).transpose(3, 2, 0, 1))).requires_grad_(True)
    tb = torch.from_numpy(np.array(params["bias"])).requires_grad_(True)
    (F.conv2d(tx, tw, tb) * _nchw(gy)).sum().backward()
    np.testing.assert_allclose(dx, _nhwc(tx.grad), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dp["kernel"], tw.grad.numpy().transpose(2, 3, 1, 0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dp["bias"], tb.grad.numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("size,k,s,p", [(13, 3, 2, 0), (14, 3, 2, 0), (15, 3, 2, 1), (35, 3, 2, 0), (8, 2, 2, 0)])
def test_max_pool_ceil_mode_matches_torch(size, k, s, p):
    x = RNG.randn(1, size, size + 3, 2).astype(np.float32)
    for ceil in (False, True):
        ref = F.max_pool2d(_nchw(x), k, s, p, ceil_mode=ceil)
        np.testing.assert_array_equal(ops.max_pool2d(jnp.asarray(x), k, s, p, ceil_mode=ceil), _nhwc(ref))
    # differentiable, with torch's gradient (to the max of each window)
    tx = _nchw(x).requires_grad_(True)
    F.max_pool2d(tx, k, s, p, ceil_mode=True).sum().backward()
    grad = jax.grad(lambda v: ops.max_pool2d(v, k, s, p, ceil_mode=True).sum())(jnp.asarray(x))
    np.testing.assert_array_equal(grad, _nhwc(tx.grad))


@pytest.mark.parametrize("src,dst", [((8, 13), (16, 26)), ((16, 26), (64, 104)), ((5, 7), (9, 4)), ((3, 1), (6, 2))])
def test_bilinear_align_corners_matches_torch(src, dst):
    x = RNG.randn(2, *src, 3).astype(np.float32)
    ref = F.interpolate(_nchw(x), size=dst, mode="bilinear", align_corners=True)
    np.testing.assert_allclose(layers.resize_bilinear_align_corners(jnp.asarray(x), dst), _nhwc(ref), rtol=1e-6, atol=1e-6)


def test_nearest_matches_torch():
    x = RNG.randn(1, 7, 13, 2).astype(np.float32)
    for size in ((14, 26), (13, 25), (7, 40), (3, 5)):
        ref = F.interpolate(_nchw(x), size=size, mode="nearest")
        np.testing.assert_array_equal(ops.upsample_nearest(jnp.asarray(x), size=size), _nhwc(ref))
    for factor in (2.0, 3.0):
        ref = F.interpolate(_nchw(x), scale_factor=factor, mode="nearest")
        np.testing.assert_array_equal(ops.upsample_nearest(jnp.asarray(x), scale_factor=factor), _nhwc(ref))


@pytest.mark.parametrize("momentum,eps", [(0.1, 1e-5), (0.01, 1e-3), (1.0, 1e-5)])
def test_batchnorm_train_and_eval_match_torch(momentum, eps):
    x = (RNG.randn(3, 5, 7, 4) * 2 + 1).astype(np.float32)
    tbn = torch.nn.BatchNorm2d(4, eps=eps, momentum=momentum)
    with torch.no_grad():
        tbn.weight.copy_(torch.tensor([1.0, 0.5, 2.0, -1.0]))
        tbn.bias.copy_(torch.tensor([0.0, 0.1, -0.2, 0.3]))
        tbn.running_mean.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]))
        tbn.running_var.copy_(torch.tensor([1.0, 0.5, 2.0, 1.5]))
    bn = layers.BatchNorm2d(momentum=momentum, eps=eps)
    v = {"params": {"scale": tbn.weight.detach().numpy().copy(), "bias": tbn.bias.detach().numpy().copy()},
         "batch_stats": {"mean": tbn.running_mean.numpy().copy(), "var": tbn.running_var.numpy().copy()}}
    np.testing.assert_allclose(bn.apply(v, x, train=False), _nhwc(tbn.eval()(_nchw(x))), rtol=1e-5, atol=1e-5)
    y, upd = bn.apply(v, x, train=True, mutable=["batch_stats"])
    ref = tbn.train()(_nchw(x))
    np.testing.assert_allclose(y, _nhwc(ref), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(upd["batch_stats"]["mean"], tbn.running_mean.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(upd["batch_stats"]["var"], tbn.running_var.numpy(), rtol=1e-5, atol=1e-6)
    # train-mode gradients (hand-written VJP) against torch autograd
    g = RNG.randn(*x.shape).astype(np.float32)
    tx = _nchw(x).requires_grad_(True)
    tbn.weight.grad = tbn.bias.grad = None
    (tbn(tx) * _nchw(g)).sum().backward()

    def loss(params, x):
        y, _ = bn.apply({"params": params, "batch_stats": v["batch_stats"]}, x, train=True, mutable=["batch_stats"])
        return jnp.sum(y * g)

    dparams, dx = jax.grad(loss, argnums=(0, 1))(v["params"], jnp.asarray(x))
    np.testing.assert_allclose(dx, _nhwc(tx.grad), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(dparams["scale"], tbn.weight.grad.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dparams["bias"], tbn.bias.grad.numpy(), rtol=1e-4, atol=1e-4)


def test_groupnorm_matches_torch():
    x = (RNG.randn(2, 5, 7, 64) * 2 + 1).astype(np.float32)
    tgn = torch.nn.GroupNorm(32, 64)
    with torch.no_grad():
        tgn.weight.copy_(torch.linspace(0.5, 1.5, 64))
        tgn.bias.copy_(torch.linspace(-1, 1, 64))
    v = {"params": {"scale": tgn.weight.detach().numpy().copy(), "bias": tgn.bias.detach().numpy().copy()}}
    gn = layers.GroupNorm(32)
    g = RNG.randn(*x.shape).astype(np.float32)
    tx = _nchw(x).requires_grad_(True)
    ty = tgn(tx)
    (ty * _nchw(g)).sum().backward()
    np.testing.assert_allclose(gn.apply(v, x), _nhwc(ty), rtol=1e-5, atol=1e-5)
    dparams, dx = jax.grad(lambda p, x: jnp.sum(gn.apply({"params": p}, x) * g), argnums=(0, 1))(v["params"], x)
    np.testing.assert_allclose(dx, _nhwc(tx.grad), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(dparams["scale"], tgn.weight.grad.numpy(), rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------------------------
# EfficientNet structure


def test_out_channels_and_block_counts_match_smp():
    from segmentation_models_pytorch.encoders.efficientnet import efficient_net_encoders

    counts = {"efficientnet-b0": 16, "efficientnet-b5": 39, "efficientnet-b7": 55}
    for name, entry in efficient_net_encoders.items():
        smp_channels = tuple(entry["params"]["out_channels"])
        assert efficientnet_out_channels(name, 3) == smp_channels
        assert efficientnet_out_channels(name, 1) == (1,) + smp_channels[1:]
        assert EfficientNetEncoder(name, in_channels=1).out_channels == (1,) + smp_channels[1:]
        if name in counts:
            assert len(block_specs(name)[0]) == counts[name]


def test_static_padding_is_that_of_the_nominal_size():
    # b5 is built for 456x456: its stride-2 k5 block at 57x57 pads (2, 2) even though 256x416 inputs are even there.
    blocks, _, stem_pad = block_specs("efficientnet-b5")
    assert stem_pad == ((0, 1), (0, 1))
    strided = [b.padding for b in blocks if b.stride == 2]
    assert strided == [((0, 1), (0, 1)), ((1, 2), (1, 2)), ((1, 1), (1, 1)), ((2, 2), (2, 2))]


# ----------------------------------------------------------------------------------------------------
# parity with SMP models


def _check_parity(torch_reference, arch, encoder, in_channels, height, width, **kw):
    torch_reference.check_smp_parity(arch, encoder, in_channels, [(height, width)], **kw)


@pytest.mark.parametrize("arch", ["unet", "fpn"])
@pytest.mark.parametrize("in_channels", [1, 3])
def test_parity_b0_256x416(torch_reference, arch, in_channels):
    # FPN with SMP's default merge "add" here; tests/test_parity_matrix.py (slow) has every encoder,
    # both sizes and merge "cat".
    _check_parity(torch_reference, arch, "efficientnet-b0", in_channels, 256, 416)


@pytest.mark.slow
def test_parity_unet_odd_size(torch_reference):
    # Unet accepts sizes that are not multiples of 32 (nearest upsampling to each skip's size).
    _check_parity(torch_reference, "unet", "efficientnet-b0", 1, 200, 300)


class _TorchClassifier(torch.nn.Module):
    def __init__(self, encoder, classes):
        super().__init__()
        self.encoder = smp.encoders.get_encoder(encoder, in_channels=1, weights=None)
        self.classification_head = smp.base.ClassificationHead(self.encoder.out_channels[-1], classes, dropout=0.2)

    def forward(self, x):
        return self.classification_head(self.encoder(x)[-1])


def test_classifier_parity(torch_reference):
    torch.manual_seed(0)
    tm = torch_reference.randomize_norms(_TorchClassifier("efficientnet-b0", 4).eval())
    model = create_model("classifier", "efficientnet-b0")
    variables = convert_smp_state_dict(torch_reference.state_dict(tm), model)
    x = RNG.randn(2, 128, 224, 1).astype(np.float32)
    with torch.no_grad():
        ref = tm(_nchw(x)).numpy()
    out = np.asarray(jax.jit(functools.partial(model.apply, train=False))(variables, x))
    assert out.shape == (2, 4)
    assert np.abs(out - ref).max() <= 1e-4 * max(1.0, float(np.abs(ref).max()))


def test_bfloat16_compute_stays_close(torch_reference):
    torch.manual_seed(0)
    tm = torch_reference.randomize_norms(smp.FPN("efficientnet-b0", encoder_weights=None, in_channels=1, classes=4).eval())
    model32 = create_model("fpn", "efficientnet-b0")
    model16 = create_model("fpn", "efficientnet-b0", dtype="bfloat16")
    variables = convert_smp_state_dict(torch_reference.state_dict(tm), model32)
    x = RNG.randn(1, 64, 96, 1).astype(np.float32)
    y32 = np.asarray(jax.jit(functools.partial(model32.apply, train=False))(variables, x))
    y16 = jax.jit(functools.partial(model16.apply, train=False))(variables, x)
    assert y16.dtype == jnp.float32  # logits come back float32
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(lambda a: a.dtype == jnp.float32, variables))
    y16 = np.asarray(y16)
    assert np.isfinite(y16).all()
    rel = np.abs(y16 - y32).max() / np.abs(y32).max()
    assert rel < 0.1, rel
    assert np.corrcoef(y16.ravel(), y32.ravel())[0, 1] > 0.99


def test_train_mode_batch_stats_match_torch(torch_reference):
    """One train-mode forward of the encoder (drop-connect off): features and running stats as torch's."""
    torch.manual_seed(0)
    tenc = smp.encoders.get_encoder("efficientnet-b0", in_channels=1, weights=None)
    torch_reference.randomize_norms(tenc)
    tenc._drop_connect_rate = 0.0
    unet = create_model("unet", "efficientnet-b0")
    sd = {"encoder." + k: v for k, v in torch_reference.state_dict(tenc).items()}
    sd.update({k: v for k, v in torch_reference.state_dict(
        smp.Unet("efficientnet-b0", encoder_weights=None, in_channels=1, classes=4)).items() if not k.startswith("encoder.")})
    variables = convert_smp_state_dict(sd, unet)
    enc_vars = {c: variables[c]["encoder"] for c in ("params", "batch_stats")}
    encoder = EfficientNetEncoder("efficientnet-b0", in_channels=1, drop_connect_rate=0.0)
    x = RNG.randn(2, 64, 96, 1).astype(np.float32)
    feats, upd = jax.jit(lambda v, x: encoder.apply(v, x, train=True, mutable=["batch_stats"]))(enc_vars, x)
    tenc.train()
    ref = tenc(_nchw(x))
    for f, r in zip(feats, ref):
        r = _nhwc(r)
        np.testing.assert_allclose(f, r, rtol=1e-4, atol=1e-4 * max(1.0, float(np.abs(r).max())))
    tsd = torch_reference.state_dict(tenc)
    for path, stat in [(("_bn0",), "mean"), (("_blocks_5", "_bn1"), "var"), (("_blocks_15", "_bn2"), "var"),
                       (("_blocks_10", "_bn0"), "mean")]:
        ours = upd["batch_stats"]
        for p in path:
            ours = ours[p]
        key = ".".join(p.replace("_blocks_", "_blocks.") for p in path) + ".running_" + stat
        np.testing.assert_allclose(ours[stat], tsd[key], rtol=1e-5, atol=1e-5)


def _random_variables(model, seed=0):
    """Random variables of the model's shapes without compiling ``init`` (BN variances positive)."""
    rng = np.random.RandomState(seed)
    return jax.tree_util.tree_map_with_path(
        lambda path, s: (np.ones(s.shape, np.float32) if path[-1].key == "var"
                         else (0.1 * rng.randn(*s.shape)).astype(np.float32)),
        expected_variables(model))


def test_train_mode_runs_with_dropout_and_drop_connect():
    model = create_model("unet", "efficientnet-b0", dropout=0.5)
    x = jnp.asarray(RNG.randn(2, 64, 64, 1), jnp.float32)
    variables = _random_variables(model)

    @jax.jit
    def step(v, x, key):
        return model.apply(v, x, train=True, rngs={"dropout": key}, mutable=["batch_stats"])

    y1, upd1 = step(variables, x, jax.random.PRNGKey(1))
    y2, _ = step(variables, x, jax.random.PRNGKey(2))
    y1b, _ = step(variables, x, jax.random.PRNGKey(1))
    assert y1.shape == (2, 64, 64, 4) and np.isfinite(np.asarray(y1)).all()
    assert not np.allclose(y1, y2)  # dropout / drop-connect use the key
    np.testing.assert_array_equal(y1, y1b)  # and nothing else is random
    before = variables["batch_stats"]["decoder"]["blocks_0"]["conv1_1"]["var"]
    after = upd1["batch_stats"]["decoder"]["blocks_0"]["conv1_1"]["var"]
    assert not np.allclose(before, after)
    with pytest.raises(Exception, match="dropout"):  # no rng: an error, not silently deterministic
        jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"])).lower(variables, x)


@pytest.mark.slow
def test_train_mode_gradients_reach_every_parameter():
    model = create_model("fpn", "efficientnet-b0", dropout=0.2)
    x = jnp.asarray(RNG.randn(2, 64, 64, 1), jnp.float32)
    variables = _random_variables(model)

    @jax.jit
    def grad(p, key):
        def loss(p):
            y, _ = model.apply({"params": p, "batch_stats": variables["batch_stats"]}, x, train=True,
                               rngs={"dropout": key}, mutable=["batch_stats"])
            return jnp.mean(y ** 2)
        return jax.grad(loss)(p)

    norms = [float(jnp.abs(g).sum()) for g in jax.tree_util.tree_leaves(grad(variables["params"], jax.random.PRNGKey(3)))]
    assert all(np.isfinite(norms)) and sum(n > 0 for n in norms) > 0.9 * len(norms)


def test_registry_knows_every_smp_encoder_name():
    from segmentation_models_pytorch.encoders import encoders as smp_encoders

    from severjax.models.encoders import encoder_constructor, encoder_names, encoder_torch_ignored

    assert len(encoder_names()) == 11
    for name in encoder_names():
        assert name in smp_encoders
        assert callable(encoder_constructor(name))
        assert all(p.startswith("encoder.") for p in encoder_torch_ignored(name))


def test_a_family_that_fails_to_import_fails_only_its_own_names(monkeypatch):
    from severjax.models import encoders

    monkeypatch.setitem(encoders.ENCODERS, "broken-b0", ("no_such_family", "Encoder", {}))
    with pytest.raises(ImportError, match=r"severjax\.models\.encoders\.no_such_family failed to import"):
        encoders.get_encoder("broken-b0", in_channels=1)
    assert "broken-b0" in encoders.encoder_names()
    assert encoders.get_encoder("efficientnet-b0", in_channels=1).variant == "efficientnet-b0"


def test_registry_errors_name_the_fault():
    with pytest.raises(KeyError, match="efficientnet-b9"):
        create_model("unet", "efficientnet-b9")
    with pytest.raises(ValueError, match="deeplab"):
        create_model("deeplab", "efficientnet-b0")
    with pytest.raises(TypeError, match="decoder_merge_policy"):
        create_model("unet", "efficientnet-b0", decoder_merge_policy="cat")
    with pytest.raises(ValueError, match="multiples of 32"):
        model = create_model("fpn", "efficientnet-b0")
        model.init(jax.random.PRNGKey(0), jnp.zeros((1, 100, 128, 1)), train=False)
