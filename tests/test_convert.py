"""PyTorch (SMP) state dict -> Flax variables: name rules, first-conv recycling, errors, the CLI."""

import copy
import functools

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
smp = pytest.importorskip("segmentation_models_pytorch")

from severjax.cli import convert_weights  # noqa: E402
from severjax.models import create_model  # noqa: E402
from severjax.models.convert import (ConversionError, convert_encoder_state_dict, convert_smp_state_dict,  # noqa: E402
                                     expected_variables, flax_path_to_torch_key, recycle_first_conv,
                                     torch_key_to_flax_path)

RNG = np.random.RandomState(0)


@pytest.fixture(scope="module")
def smp_unet_b0_rgb():
    torch.manual_seed(0)
    return smp.Unet("efficientnet-b0", encoder_weights=None, in_channels=3, classes=4).eval()


def test_name_rule():
    assert torch_key_to_flax_path("encoder._blocks.3._bn1.weight") == (("encoder", "_blocks_3", "_bn1"), "weight")
    assert torch_key_to_flax_path("decoder.seg_blocks.0.block.1.block.0.weight") == (
        ("decoder", "seg_blocks_0", "block_1", "block_0"), "weight")
    assert torch_key_to_flax_path("segmentation_head.0.bias") == (("segmentation_head_0",), "bias")
    assert torch_key_to_flax_path("decoder.blocks.0.conv1.0.weight") == (("decoder", "blocks_0", "conv1_0"), "weight")
    # literal "_<digits>" in a torch name (Inception-v4) is left alone: only ".<digits>" is rewritten
    assert torch_key_to_flax_path("encoder.features.21.branch1_0.conv.weight") == (
        ("encoder", "features_21", "branch1_0", "conv"), "weight")
    assert torch_key_to_flax_path("encoder.layer2.0.downsample.0.weight") == (
        ("encoder", "layer2_0", "downsample_0"), "weight")
    assert flax_path_to_torch_key("batch_stats", ("encoder", "_blocks_3", "_bn1", "var")) == "encoder._blocks.3._bn1.running_var"


def test_full_key_coverage_b0(smp_unet_b0_rgb, torch_reference):
    """Every variable comes from the state dict; the only dropped keys are the declared unused ones."""
    sd = torch_reference.state_dict(smp_unet_b0_rgb)
    model = create_model("unet", "efficientnet-b0", in_channels=3)
    variables = convert_smp_state_dict(sd, model)
    n_leaves = len(jax.tree_util.tree_leaves(variables))
    dropped = [k for k in sd if k.endswith("num_batches_tracked") or k.startswith(model.torch_ignored)]
    assert n_leaves == len(sd) - len(dropped)
    assert all(k.startswith(("encoder._conv_head", "encoder._bn1")) for k in dropped if "num_batches" not in k)
    stem = sd["encoder._conv_stem.weight"]
    np.testing.assert_array_equal(variables["params"]["encoder"]["_conv_stem"]["kernel"], stem.transpose(2, 3, 1, 0))
    dw = sd["encoder._blocks.1._depthwise_conv.weight"]  # (C, 1, k, k) -> (k, k, 1, C)
    assert variables["params"]["encoder"]["_blocks_1"]["_depthwise_conv"]["kernel"].shape == (3, 3, 1, dw.shape[0])
    np.testing.assert_array_equal(variables["batch_stats"]["decoder"]["blocks_2"]["conv2_1"]["var"],
                                  sd["decoder.blocks.2.conv2.1.running_var"])


def test_first_conv_recycling_modes(smp_unet_b0_rgb, torch_reference):
    sd = torch_reference.state_dict(smp_unet_b0_rgb)
    stem = sd["encoder._conv_stem.weight"]  # (32, 3, 3, 3)
    model = create_model("unet", "efficientnet-b0", in_channels=1)
    expected = {"r": stem[:, 0:1], "g": stem[:, 1:2], "b": stem[:, 2:3], "sum": stem.sum(1, keepdims=True),
                "mean": stem.mean(1, keepdims=True)}
    for mode, want in expected.items():
        np.testing.assert_allclose(recycle_first_conv(stem, mode), want, rtol=1e-6)
    for mode in ("r", "sum"):
        variables = convert_smp_state_dict(sd, model, first_conv=mode)
        kernel = variables["params"]["encoder"]["_conv_stem"]["kernel"]
        np.testing.assert_allclose(kernel, expected[mode].transpose(2, 3, 1, 0), rtol=1e-6)
    with pytest.raises(ValueError, match="first_conv"):
        convert_smp_state_dict(sd, model, first_conv="red")


def test_sum_recycling_equals_smp_in_channels_1(smp_unet_b0_rgb, torch_reference):
    """SMP's own rule for a 1-channel model made from 3-channel weights (patch_first_conv) == first_conv="sum"."""
    from segmentation_models_pytorch.encoders._utils import patch_first_conv

    rgb = torch_reference.randomize_norms(copy.deepcopy(smp_unet_b0_rgb))
    sd = torch_reference.state_dict(rgb)
    gray = copy.deepcopy(rgb)
    patch_first_conv(gray.encoder, new_in_channels=1, pretrained=True)
    model = create_model("unet", "efficientnet-b0", in_channels=1)
    variables = convert_smp_state_dict(sd, model, first_conv="sum")
    x = RNG.randn(1, 64, 96, 1).astype(np.float32)
    with torch.no_grad():
        ref = torch_reference.nhwc(gray(torch_reference.nchw(x)))
    out = np.asarray(jax.jit(functools.partial(model.apply, train=False))(variables, x))
    assert np.abs(out - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())


def test_wrong_encoder_lists_all_faults(torch_reference):
    torch.manual_seed(0)
    sd_b1 = torch_reference.state_dict(smp.Unet("efficientnet-b1", encoder_weights=None, in_channels=1, classes=4))
    model = create_model("unet", "efficientnet-b0", in_channels=1)
    with pytest.raises(ConversionError) as err:
        convert_smp_state_dict(sd_b1, model)
    msg = str(err.value)
    assert "unexpected" in msg and "encoder._blocks.22._project_conv.weight" in msg  # b1 has 23 blocks, b0 16
    assert "wrong shape" not in msg or "model wants" in msg


def test_missing_unexpected_wrong_shape_all_reported(smp_unet_b0_rgb, torch_reference):
    sd = dict(torch_reference.state_dict(smp_unet_b0_rgb))
    model = create_model("unet", "efficientnet-b0", in_channels=3)
    del sd["decoder.blocks.1.conv1.1.running_var"], sd["encoder._blocks.4._se_reduce.bias"]
    sd["decoder.blocks.9.conv1.0.weight"] = np.zeros((1,), np.float32)
    sd["encoder._blocks.2._bn1.gamma"] = np.zeros((1,), np.float32)
    sd["segmentation_head.0.weight"] = np.zeros((5, 16, 3, 3), np.float32)
    sd["encoder._blocks.0._se_expand.bias"] = np.zeros((7,), np.float32)
    with pytest.raises(ConversionError) as err:
        convert_smp_state_dict(sd, model)
    msg = str(err.value)
    for name in ("decoder.blocks.1.conv1.1.running_var", "encoder._blocks.4._se_reduce.bias",  # missing
                 "decoder.blocks.9.conv1.0.weight", "encoder._blocks.2._bn1.gamma",  # unexpected
                 "segmentation_head.0.weight", "encoder._blocks.0._se_expand.bias"):  # wrong shape
        assert name in msg, name
    assert "2 missing" in msg and "2 unexpected" in msg and "2 wrong shape" in msg


def test_encoder_only_state_dict(torch_reference):
    """ImageNet-style encoder files (no ``encoder.`` prefix, an ``_fc`` head) fill the encoder only."""
    torch.manual_seed(0)
    tenc = torch_reference.randomize_norms(smp.encoders.get_encoder("efficientnet-b0", in_channels=3, weights=None))
    sd = torch_reference.state_dict(tenc)
    sd["_fc.weight"], sd["_fc.bias"] = np.zeros((1000, 1280), np.float32), np.zeros((1000,), np.float32)
    model = create_model("fpn", "efficientnet-b0", in_channels=1)
    init = jax.tree_util.tree_map(lambda s: np.full(s.shape, 0.5, np.float32), expected_variables(model))
    variables = convert_encoder_state_dict(sd, model, init, first_conv="r")
    np.testing.assert_array_equal(variables["params"]["decoder"]["p5"]["kernel"], init["params"]["decoder"]["p5"]["kernel"])
    np.testing.assert_array_equal(variables["batch_stats"]["encoder"]["_blocks_3"]["_bn0"]["mean"],
                                  sd["_blocks.3._bn0.running_mean"])
    np.testing.assert_array_equal(variables["params"]["encoder"]["_conv_stem"]["kernel"],
                                  sd["_conv_stem.weight"][:, :1].transpose(2, 3, 1, 0))
    del sd["_blocks.3._bn0.running_mean"]
    with pytest.raises(ConversionError, match=r"_blocks\.3\._bn0\.running_mean"):
        convert_encoder_state_dict(sd, model, init)


def test_convert_weights_cli_roundtrip(tmp_path, torch_reference, monkeypatch):
    from severjax.export import load_model

    torch.manual_seed(0)
    tm = torch_reference.randomize_norms(smp.FPN("efficientnet-b0", encoder_weights=None, in_channels=1, classes=4,
                                                 decoder_merge_policy="cat").eval())
    path = tmp_path / "fpn.pth"
    torch.save({"epoch": 3, "state_dict": {"module." + k: v for k, v in tm.state_dict().items()}}, path)
    convert_weights.main(["--weights", str(path), "--arch", "fpn", "--encoder", "efficientnet-b0",
                          "--in_channels", "1", "--decoder_merge_policy", "cat", "--dropout", "0.2",
                          "--normalize", "0.3439,0.0383", "--out", str(tmp_path / "export")])
    monkeypatch.chdir(tmp_path)  # relative paths load too (orbax itself wants absolute ones)
    module, variables, spec = load_model("export")
    assert spec["decoder_merge_policy"] == "cat" and spec["normalize"] == {"mean": 0.3439, "std": 0.0383}
    x = RNG.randn(1, 64, 96, 1).astype(np.float32)
    with torch.no_grad():
        ref = torch_reference.nhwc(tm(torch_reference.nchw(x)))
    y = np.asarray(jax.jit(functools.partial(module.apply, train=False))(variables, x))
    assert np.abs(y - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max())


def test_load_state_dict_formats(tmp_path):
    from safetensors.numpy import save_file

    arrays = {"encoder._bn0.weight": np.arange(3, dtype=np.float32)}
    save_file(arrays, str(tmp_path / "w.safetensors"))
    np.testing.assert_array_equal(convert_weights.load_state_dict(str(tmp_path / "w.safetensors"))["encoder._bn0.weight"],
                                  arrays["encoder._bn0.weight"])
    torch.save({"model.encoder._bn0.weight": torch.ones(2)}, tmp_path / "bare.pth")
    assert list(convert_weights.load_state_dict(str(tmp_path / "bare.pth"))) == ["encoder._bn0.weight"]
    torch.save({"epoch": 1}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="bad.pth"):
        convert_weights.load_state_dict(str(tmp_path / "bad.pth"))
