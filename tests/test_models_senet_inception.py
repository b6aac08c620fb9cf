"""SE-ResNeXt and InceptionV4 encoders (and Unet/FPN on them): parity against SMP 0.6.0 in PyTorch.

The equality of the grouped convolution's and the Unet decoder's implementations (no torch needed) is
tests/ops/.
"""

import copy
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
smp = pytest.importorskip("segmentation_models_pytorch")

from severjax import ops  # noqa: E402
from severjax.models.convert import convert_smp_state_dict, torch_key_to_flax_path  # noqa: E402
from severjax.models.encoders import get_encoder  # noqa: E402
from severjax.models.encoders.inception_v4 import InceptionV4Encoder  # noqa: E402
from severjax.models.encoders.senet import SENetEncoder  # noqa: E402

torch.set_num_threads(1)
ENCODERS = ("se_resnext50_32x4d", "se_resnext101_32x4d", "inceptionv4")


def _smp_encoder(torch_reference, name, in_channels, seed=0):
    torch.manual_seed(seed)
    enc = smp.encoders.get_encoder(name, in_channels=in_channels, weights=None)
    return torch_reference.randomize_norms(enc.eval(), seed=seed + 1)


def _converted_pair(torch_reference, name):
    """A 1-channel SMP encoder (random weights, distinct norms, eval), our encoder and its converted variables."""
    tenc = _smp_encoder(torch_reference, name, 1)
    enc = get_encoder(name, in_channels=1)
    return tenc, enc, convert_smp_state_dict(torch_reference.state_dict(tenc), enc)


def _check_encoder_parity(torch_reference, name, in_channels, height, width, batch=1):
    tenc = _smp_encoder(torch_reference, name, in_channels)
    enc = get_encoder(name, in_channels=in_channels)
    assert enc.out_channels == tuple(tenc.out_channels)
    state = torch_reference.state_dict(tenc)
    # ImageNet files (pretrainedmodels / SMP hub) still carry the classifier head: it must be dropped, not fail.
    state["last_linear.weight"] = np.zeros((1000, enc.out_channels[-1]), np.float32)
    state["last_linear.bias"] = np.zeros((1000,), np.float32)
    variables = convert_smp_state_dict(state, enc)
    x = np.random.RandomState(0).randn(batch, height, width, in_channels).astype(np.float32)
    with torch.no_grad():
        refs = [torch_reference.nhwc(f) for f in tenc(torch_reference.nchw(x))]
    outs = jax.jit(functools.partial(enc.apply, train=False))(variables, x)
    assert len(outs) == len(refs) == 6
    for i, (out, ref) in enumerate(zip(outs, refs)):
        assert out.shape[-1] == enc.out_channels[i]
        torch_reference.assert_close(out, ref, f"{name} feature {i}")


# ----------------------------------------------------------------------------------------------------
# encoders


@pytest.mark.parametrize("name", ["se_resnext50_32x4d", "inceptionv4"])
@pytest.mark.parametrize("in_channels", [1, 3])
def test_encoder_parity_256x416(torch_reference, name, in_channels):
    _check_encoder_parity(torch_reference, name, in_channels, 256, 416)


@pytest.mark.slow
def test_encoder_parity_se_resnext101_256x416(torch_reference):
    _check_encoder_parity(torch_reference, "se_resnext101_32x4d", 1, 256, 416)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["se_resnext50_32x4d", "inceptionv4"])
def test_encoder_parity_256x1600(torch_reference, name):
    _check_encoder_parity(torch_reference, name, 1, 256, 1600)


def test_out_channels_match_smp_tables():
    from segmentation_models_pytorch.encoders.inceptionv4 import inceptionv4_encoders
    from segmentation_models_pytorch.encoders.senet import senet_encoders

    tables = {**senet_encoders, **inceptionv4_encoders}
    for name in ENCODERS:
        smp_channels = tuple(tables[name]["params"]["out_channels"])
        assert get_encoder(name, in_channels=3).out_channels == smp_channels
        assert get_encoder(name, in_channels=1).out_channels == (1,) + smp_channels[1:]
    assert SENetEncoder(in_channels=1).layers == (3, 4, 6, 3)
    assert get_encoder("se_resnext101_32x4d", in_channels=1).layers == (3, 4, 23, 3)


def test_every_smp_tensor_has_one_flax_home(torch_reference):
    # Conversion checks names and shapes both ways (nothing missing, unexpected or ambiguous); no forward pass,
    # so se_resnext101's 23-block stage is covered here cheaply.
    for name in ENCODERS:
        tenc = smp.encoders.get_encoder(name, in_channels=1, weights=None)
        state = torch_reference.state_dict(tenc)
        variables = convert_smp_state_dict(state, get_encoder(name, in_channels=1))
        n_flax = sum(x.size for x in jax.tree_util.tree_leaves(variables))
        n_torch = sum(v.size for k, v in state.items() if not k.endswith("num_batches_tracked"))
        assert n_flax == n_torch, name


@pytest.mark.parametrize("name", ["se_resnext50_32x4d", "inceptionv4"])
def test_train_mode_odd_size_matches_torch(torch_reference, name):
    # Batch statistics, the running-stat update (unbiased variance) and sizes that are not multiples of 32
    # (SE-ResNeXt's ceil-mode pool, InceptionV4's padded stride-2 convs and pools), in one forward.
    tenc, enc, variables = _converted_pair(torch_reference, name)
    x = np.random.RandomState(1).randn(2, 67, 75, 1).astype(np.float32)
    # Batch norm over the few positions of the deep stages (2x3x3) amplifies rounding: PyTorch's own float32
    # result is ~1e-2 off float64 there. So the reference is float64 and the bound is a few times PyTorch's error.
    tenc64 = copy.deepcopy(tenc).double().train()
    tenc.train()
    with torch.no_grad():
        refs32 = [torch_reference.nhwc(f) for f in tenc(torch_reference.nchw(x))]
        refs64 = [torch_reference.nhwc(f) for f in tenc64(torch_reference.nchw(x).double())]
    outs, updates = jax.jit(lambda v, x: enc.apply(v, x, train=True, mutable=["batch_stats"]))(variables, x)
    for i, (out, ref32, ref64) in enumerate(zip(outs, refs32, refs64)):
        _assert_within_torch_noise(out, ref32, ref64, f"{name} train feature {i}")
    stats32, stats64 = torch_reference.state_dict(tenc), torch_reference.state_dict(tenc64)
    for key in stats32:
        if key.endswith(("running_mean", "running_var")):
            module, leaf = torch_key_to_flax_path(key)
            got = functools.reduce(lambda d, k: d[k], module, updates["batch_stats"])[leaf[len("running_"):]]
            _assert_within_torch_noise(got, stats32[key], stats64[key], key)


def _assert_within_torch_noise(out, ref32, ref64, what):
    """|out - float64 truth| at most 4x PyTorch float32's own error, plus 1e-5 of the scale."""
    err, torch_err = np.abs(np.asarray(out) - ref64).max(), np.abs(ref32 - ref64).max()
    bound = 4 * torch_err + 1e-5 * max(1.0, np.abs(ref64).max())
    assert err <= bound, f"{what}: max |diff| to float64 {err} > {bound} (PyTorch float32's: {torch_err})"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["se_resnext50_32x4d", "inceptionv4"])
def test_gradients_under_jit_match_torch(torch_reference, name):
    # Eval-mode gradients w.r.t. the input and every kernel: the grouped convs' implementations (on CPU taps for
    # the narrow groups of an inference-mode call), the pools' differentiability under jit (reduce_window with a
    # Python-scalar -inf init).
    tenc, enc, variables = _converted_pair(torch_reference, name)
    x = np.random.RandomState(4).randn(2, 67, 75, 1).astype(np.float32)
    xt = torch_reference.nchw(x).requires_grad_(True)
    sum(f.square().mean() for f in tenc(xt)[1:]).backward()

    def loss(params, x):
        feats = enc.apply({"params": params, "batch_stats": variables["batch_stats"]}, x, train=False)
        return sum(jnp.mean(jnp.square(f)) for f in feats[1:])

    g_params, g_x = jax.jit(jax.grad(loss, argnums=(0, 1)))(variables["params"], x)
    torch_reference.assert_close(g_x, torch_reference.nhwc(xt.grad), f"{name} d/dx", tol=1e-4)
    torch_grads = {k: p.grad.numpy() for k, p in tenc.named_parameters()}
    for key, want in torch_grads.items():
        module, leaf = torch_key_to_flax_path(key)
        got = np.asarray(functools.reduce(lambda d, k: d[k], module, g_params)["kernel" if want.ndim == 4 else
                                                                                 {"weight": "scale"}.get(leaf, leaf)])
        if want.ndim == 4:
            want = want.transpose(2, 3, 1, 0)
        scale = max(1e-3, float(np.abs(want).max()))
        assert np.abs(got - want).max() <= 1e-3 * scale, (key, float(np.abs(got - want).max()), scale)


@pytest.mark.parametrize("shape", [(2, 9, 11, 3), (1, 8, 8, 2), (1, 12, 17, 2)])
def test_max_pool_ceil_gradient_matches_torch(torch_reference, shape):
    # The gradient goes to the first maximum of each window, ties included (post-ReLU zeros, equal values).
    x = np.maximum(np.random.RandomState(6).randn(*shape), 0).astype(np.float32)
    x[0, :3, :4, 0] = 1.0
    xt = torch_reference.nchw(x).requires_grad_(True)
    yt = torch.nn.functional.max_pool2d(xt, 3, 2, ceil_mode=True)
    gy = np.random.RandomState(7).randn(*yt.shape).astype(np.float32)
    yt.backward(torch.from_numpy(gy))
    y, vjp = jax.vjp(lambda x: ops.max_pool_ceil(x, 3, 2, impl="taps_grad"), jnp.asarray(x))
    (dx,) = jax.jit(vjp)(jnp.asarray(torch_reference.nhwc(torch.from_numpy(gy))))
    np.testing.assert_array_equal(np.asarray(y), torch_reference.nhwc(yt.detach()))
    np.testing.assert_allclose(np.asarray(dx), torch_reference.nhwc(xt.grad), rtol=1e-6, atol=1e-6)


def _bf16_check(module, x, **kw):
    variables = jax.jit(functools.partial(module.init, **kw))(jax.random.PRNGKey(0), x)
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(variables)} == {jnp.dtype(jnp.float32)}
    out = jax.jit(functools.partial(module.apply, **kw))(variables, x)
    ref = jax.jit(functools.partial(module.clone(dtype=jnp.float32).apply, **kw))(variables, x)
    out, ref = (out[-1], ref[-1]) if isinstance(out, list) else (out, ref)
    assert out.dtype == jnp.bfloat16 and ref.dtype == jnp.float32
    rel = float(jnp.linalg.norm(out.astype(jnp.float32) - ref) / jnp.linalg.norm(ref))
    assert rel < 0.05, rel


def test_bfloat16_blocks_compute_in_bf16_with_float32_params():
    from severjax.models.encoders.inception_v4 import InceptionA
    from severjax.models.encoders.senet import SEResNeXtBottleneck

    rng = np.random.RandomState(2)
    _bf16_check(SEResNeXtBottleneck(planes=64, stride=2, downsample=True, dtype=jnp.bfloat16),
                rng.randn(2, 16, 20, 64).astype(np.float32), train=False)
    _bf16_check(InceptionA(dtype=jnp.bfloat16), rng.randn(1, 8, 10, 384).astype(np.float32), train=False)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["se_resnext50_32x4d", "inceptionv4"])
def test_bfloat16_encoder(name):
    x = np.random.RandomState(2).randn(1, 64, 64, 1).astype(np.float32)
    _bf16_check(get_encoder(name, in_channels=1, dtype=jnp.bfloat16), x, train=False)


def test_wrong_input_channels_named():
    x = jnp.zeros((1, 64, 64, 3))
    for enc in (SENetEncoder(in_channels=1), InceptionV4Encoder(in_channels=1)):
        with pytest.raises(ValueError, match="1 channels, got shape"):
            enc.init(jax.random.PRNGKey(0), x, train=False)


# ----------------------------------------------------------------------------------------------------
# full models


def _check_model_parity(torch_reference, arch, encoder, in_channels=1, height=256, width=416, **kw):
    torch_reference.check_smp_parity(arch, encoder, in_channels, [(height, width)], **kw)


# Fast group: each encoder and each arch once (Unet-se_resnext50 as the original trained it). The whole
# {unet, fpn} x encoder x in_channels matrix at both sizes is tests/test_parity_matrix.py (slow).
@pytest.mark.parametrize("arch,encoder,kw", [
    ("unet", "se_resnext50_32x4d", {}),
    ("fpn", "inceptionv4", {"decoder_merge_policy": "cat"}),
])
def test_model_parity_256x416(torch_reference, arch, encoder, kw):
    _check_model_parity(torch_reference, arch, encoder, **kw)


@pytest.mark.slow
def test_model_parity_fpn_add_se_resnext50(torch_reference):
    _check_model_parity(torch_reference, "fpn", "se_resnext50_32x4d", decoder_merge_policy="add")


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["unet", "fpn"])
def test_model_parity_se_resnext101(torch_reference, arch):
    _check_model_parity(torch_reference, arch, "se_resnext101_32x4d")
