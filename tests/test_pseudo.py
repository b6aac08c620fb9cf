"""Pseudo labels: the selection rules, severjax-pseudo-label, and (slow) classifier -> pseudo labels ->
training with the fixed share -> prediction gated by the classifier, end to end on synthetic data."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from severjax import config as severjax_config
from severjax.cli import pseudo_label as tool
from severjax.data import kaggle
from severjax.export import save_model
from severjax.data.synthetic import make_dataset
from severjax.models import create_model
from severjax.predict.postprocess import PostprocessConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NORMALIZE = {"mean": 0.3439, "std": 0.196}
FULL = "1 409600"  # a class-3 mask covering the whole 256x1600 image


def _config(name):
    return severjax_config.load(os.path.join(ROOT, "configs", f"{name}.py"))


def _constant_model(directory, arch, head_bias):
    """Exports an efficientnet-b0 model whose logits are ``head_bias`` everywhere (zero head kernel)."""
    spec = dict(arch=arch, encoder="efficientnet-b0", classes=4, in_channels=1)
    if arch == "unet":
        spec["decoder_channels"] = [16, 8, 8, 8, 8]
    shapes = jax.eval_shape(lambda: create_model(**spec).init(jax.random.key(0), jnp.zeros((1, 64, 64, 1))))
    variables = jax.tree_util.tree_map_with_path(
        lambda path, leaf: (np.ones if path[-1].key in ("scale", "var") else np.zeros)(leaf.shape, np.float32),
        {"params": shapes["params"], "batch_stats": shapes["batch_stats"]})
    head = "segmentation_head_0" if arch == "unet" else "classification_head_3"
    variables["params"][head]["bias"] = np.asarray(head_bias, np.float32)
    save_model(str(directory), variables, {**spec, "normalize": NORMALIZE})
    return str(directory)


# ------------------------------------------------------------------------------------ selection rules


def test_classifier_verdict():
    probs = np.array([[0.95, 0.02, 0.05, 0.01],   # sure, agrees
                      [0.95, 0.02, 0.50, 0.01],   # unsure (class 3 at 0.5)
                      [0.95, 0.02, 0.05, 0.99],   # sure, but class 4 absent from the mask
                      [0.05, 0.02, 0.05, 0.01]])  # sure, class 1 in the mask but p < 0.5
    present = np.array([[1, 0, 0, 0], [1, 0, 0, 0], [1, 0, 0, 0], [1, 0, 0, 0]], bool)
    sure, agrees = tool.classifier_verdict(probs, present, hi=0.9, lo=0.1)
    assert sure.tolist() == [True, False, True, True]
    assert agrees.tolist() == [True, True, False, False]
    with pytest.raises(ValueError, match="differ"):
        tool.classifier_verdict(probs[:, :3], present, 0.9, 0.1)


def test_segmentation_confidence():
    config = PostprocessConfig(min_area=(10, 10, 10, 10))
    probs = np.zeros((3, 8, 8, 4), np.float32)
    masks = np.zeros((3, 8, 8, 4), bool)
    probs[0, :2, :, 2], masks[0, :2, :, 2] = 0.8, True       # 16 predicted pixels at 0.8
    probs[0, 2, :4, 2], masks[0, 2, :4, 2] = 0.6, True        # and 4 at 0.6
    probs[1, 0, :5, 1] = 0.7                                  # empty prediction, 5 candidates of 10
    conf = tool.segmentation_confidence(probs, masks, config)
    np.testing.assert_allclose(conf, [(16 * 0.8 + 4 * 0.6) / 20, 0.5, 1.0], rtol=1e-6)
    quantised = np.round(probs * 255).astype(np.uint8)
    np.testing.assert_allclose(tool.segmentation_confidence(quantised, masks, config), conf, atol=2e-3)


def test_bad_arguments_fail_before_loading_models(tmp_path):
    base = ["--checkpoint", str(tmp_path / "none"), "--images", str(tmp_path), "--out", str(tmp_path / "p.csv")]
    with pytest.raises(ValueError, match="--lo"):
        tool.main(base + ["--hi", "0.4"])
    with pytest.raises(ValueError, match="--seg_conf"):
        tool.main(base + ["--seg_conf", "1.5"])
    with pytest.raises(ValueError, match="--out_images"):
        tool.main(base + ["--layout", "post"])


# ---------------------------------------------------------------------------------------------- tool


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("pseudo")
    make_dataset(root / "data", n_train=0, n_test=3, seed=11)
    models = {"seg": _constant_model(root / "seg", "unet", [-8.0, -8.0, 8.0, -8.0]),
              "sure": _constant_model(root / "sure", "classifier", [-8.0, -8.0, 8.0, -8.0]),
              "unsure": _constant_model(root / "unsure", "classifier", [-8.0, -8.0, 1.0, -8.0])}
    return root, models


def test_tool_keeps_confident_images_and_writes_both_layouts(folder, capsys):
    root, models = folder
    images = str(root / "data" / "test_images")
    common = ["--checkpoint", models["seg"], "--images", images, "--tta", "none", "--quiet", "--batch_size", "2"]
    out = root / "kept.csv"
    summary = tool.main(common + ["--classifier", models["sure"], "--seg_conf", "0.99", "--out", str(out),
                                  "--out_images", str(root / "kept.txt"),
                                  "--truth", str(root / "data" / "test_truth.csv")])
    assert summary["images"] == 3 and summary["kept"] == 3 and summary["kept_per_class"] == [0, 0, 3, 0]
    assert summary["rules"] == ["classifier", "segmentation"]
    assert summary["rejected"] == {"classifier_unsure": 0, "classifier_disagrees": 0, "segmentation_unsure": 0}
    rows = kaggle.read_submission(str(out))
    assert sorted(rows) == kaggle.list_images(images) and all(r == ["", "", FULL, ""] for r in rows.values())
    assert open(root / "kept.txt").read().split() == sorted(rows)
    assert summary["score_kept"] == summary["score_all"] is not None
    printed = capsys.readouterr().out
    assert "kept 3 / 3 images" in printed and "3: 3" in printed

    # An unsure classifier keeps nothing; the post layout then holds the header only.
    summary = tool.main(common + ["--classifier", models["unsure"], "--out", str(root / "none.csv"),
                                  "--layout", "post", "--out_images", str(root / "none.txt")])
    assert summary["kept"] == 0 and summary["rejected"]["classifier_unsure"] == 3
    assert open(root / "none.csv").read().strip() == "ImageId,ClassId,EncodedPixels"
    assert open(root / "none.txt").read() == ""


# --------------------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_end_to_end_classifier_pseudo_labels_training_and_gated_prediction(tmp_path):
    """Tiny runs: a classifier and a U-Net train on synthetic data; the ensemble pseudo-labels the test
    images; a second U-Net trains on labelled + pseudo images at a fixed share; predict gates with the
    classifier. Checks that every stage completes and hands the next one what it needs."""
    from severjax.cli import predict
    from severjax.data import pipeline, sampling
    from severjax.train import train_and_evaluate

    data = tmp_path / "data"
    make_dataset(data, n_train=40, n_test=12, seed=5)

    def small(config, workdir, **data_overrides):
        config.data.dir = str(data)
        config.data.tfds_dir = str(tmp_path / "tfds")
        config.data.synthetic = None
        config.data.crop = (64, 128)
        config.data.limit_val = 8
        config.batch_size = 4
        config.eval_batch_size = 4
        config.epochs = 1
        config.steps_per_epoch = 4
        config.steps_per_call = 1  # one program to compile (calls of several steps: tests/test_train.py)
        config.optim.flat_epochs = 0
        config.progress_bar = False
        for key, value in data_overrides.items():
            config.data[key] = value
        return train_and_evaluate(config, str(tmp_path / workdir))

    cls = small(_config("cls_b0_quick"), "cls")
    assert cls["step"] == 4 and cls["score_name"] == "auc_mean"
    assert set(cls["val"]) >= {"accuracy", "auc", "auc_mean"}
    seg_config = _config("quickstart")
    seg = small(seg_config, "seg")
    assert seg["step"] == 4

    pseudo_csv = tmp_path / "pseudo.csv"
    images = str(data / "test_images")
    summary = tool.main(["--checkpoint", str(tmp_path / "seg"), "--classifier", str(tmp_path / "cls"),
                         "--images", images, "--out", str(tmp_path / "confident.csv"), "--quiet", "--tta", "none",
                         "--batch_size", "4"])
    assert summary["images"] == 12 and 0 <= summary["kept"] <= 12
    summary = tool.main(["--checkpoint", str(tmp_path / "seg"), "--images", images, "--out", str(pseudo_csv),
                         "--quiet", "--tta", "none", "--batch_size", "4"])
    assert summary["kept"] == 12  # no rule: every image, defect-free ones included
    assert len(kaggle.read_submission(str(pseudo_csv))) == 12

    config = _config("quickstart")
    config.data.dir, config.data.tfds_dir, config.data.synthetic = str(data), str(tmp_path / "tfds"), None
    config.data.crop, config.batch_size = (64, 128), 4
    config.data.pseudo_csv, config.data.pseudo_images, config.data.pseudo_alpha = str(pseudo_csv), images, 0.0
    loader = pipeline.train_loader(config, process_index=0, process_count=1)
    n_labelled = loader.num_records - 12
    assert sampling.FixedRatioSampler(n_labelled, 12, 4, 0.0, config.seed).counts == (3, 1)
    batch = next(iter(loader))
    assert batch["image"].shape == (4, 64, 128, 1) and batch["mask"].shape == (4, 64, 128, 4)
    mixed = small(_config("quickstart"), "seg_pseudo", pseudo_csv=str(pseudo_csv), pseudo_images=images,
                  pseudo_alpha=0.0)
    assert mixed["step"] == 4 and np.isfinite(mixed["best_val_score"])

    gated = predict.main(["--checkpoint", str(tmp_path / "seg_pseudo"), "--classifier", str(tmp_path / "cls"),
                          "--images", images, "--out", str(tmp_path / "sub.csv"), "--quiet",
                          "--truth", str(data / "test_truth.csv"), "--tta", "none", "--batch_size", "4"])
    assert gated["images"] == 12 and 0.0 <= gated["score"] <= 1.0
