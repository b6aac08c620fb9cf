"""The full parity matrix against SMP 0.6.0: {unet, fpn} x {b0, b5, se_resnext50, inceptionv4} x in_channels {1, 3},
each at 1x256x416 (the training crops) and 1x256x1600 (the full images prediction sees).

One SMP model per case (random weights, ``encoder_weights=None``, every norm given distinct statistics,
eval mode), moved by ``convert_smp_state_dict``, checked at both sizes: max |logit difference| <=
1e-4 * max(1, max |logit|). FPN uses merge "cat", as the configs train it; the fast group checks "add" on
efficientnet-b0. The whole matrix is the slow group (32 forwards, 32 compiles), which CI runs.
"""

import pytest

pytest.importorskip("torch")
pytest.importorskip("segmentation_models_pytorch")

ENCODERS = ("efficientnet-b0", "efficientnet-b5", "se_resnext50_32x4d", "inceptionv4")
SIZES = ((256, 416), (256, 1600))
MATRIX = [(arch, encoder, in_channels) for arch in ("unet", "fpn") for encoder in ENCODERS for in_channels in (1, 3)]


@pytest.mark.slow
@pytest.mark.parametrize("arch,encoder,in_channels", MATRIX, ids=[f"{a}-{e}-in{c}" for a, e, c in MATRIX])
def test_model_parity_at_crop_and_full_image(torch_reference, arch, encoder, in_channels):
    kw = {"decoder_merge_policy": "cat"} if arch == "fpn" else {}
    torch_reference.check_smp_parity(arch, encoder, in_channels, SIZES, **kw)
