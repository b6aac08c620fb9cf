"""Prediction: ensembles and TTA, parity with PyTorch, the predict CLI end to end, streaming, saved probs."""

import dataclasses
import json
import os
import subprocess
import sys

import cv2
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from severjax.cli import predict, tune
from severjax.data import kaggle
from severjax.data.rle import rle_encode
from severjax.data.synthetic import make_dataset
from severjax.export import save_model
from severjax.metrics import score_annotations
from severjax.models import create_model
from severjax.predict.ensemble import Ensemble, load_members, member_probabilities, tta_probabilities
from severjax.predict.postprocess import PostprocessConfig, reference_postprocess
from severjax.predict.probs import ProbsWriter, read_saved_probs
from severjax.predict.stream import predict_images, stream_batches

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL_DECODER = [16, 8, 8, 8, 8]
NORMALIZE = {"mean": 0.3439, "std": 0.196}


def export(directory, arch="unet", seed=0, head_bias=None, **kw):
    """Exports a small random model; ``head_bias`` zeroes the last layer's kernel: constant logits.

    Variables are drawn in numpy from the shapes ``eval_shape`` gives (no compiled init): kernels
    N(0, 1/fan_in), norms identity, as a freshly initialised model.
    """
    spec = dict(arch=arch, encoder="efficientnet-b0", classes=4, in_channels=1, **kw)
    if arch == "unet":
        spec.setdefault("decoder_channels", SMALL_DECODER)
    model = create_model(**spec)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 1))))
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        name = path[-1].key
        if name == "kernel":
            return (rng.standard_normal(leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1]))).astype(np.float32)
        return (np.ones if name in ("scale", "var") else np.zeros)(leaf.shape, np.float32)

    variables = jax.tree_util.tree_map_with_path(draw, {"params": shapes["params"],
                                                       "batch_stats": shapes["batch_stats"]})
    if head_bias is not None:
        head = "segmentation_head_0" if arch == "unet" else "classification_head_3"
        variables["params"][head] = {"kernel": np.zeros_like(variables["params"][head]["kernel"]),
                                     "bias": np.asarray(head_bias, np.float32)}
    save_model(str(directory), variables, {**spec, "normalize": NORMALIZE})
    return str(directory)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic")
    make_dataset(root, n_train=0, n_test=4, seed=3)
    return root


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {"a": export(root / "a", seed=0), "b": export(root / "b", arch="fpn", seed=1),
            "const": export(root / "const", head_bias=[-8.0, -8.0, 8.0, -8.0]),
            "cls": export(root / "cls", arch="classifier", head_bias=[3.0, 3.0, -8.0, 3.0])}


# ------------------------------------------------------------------------------------------ ensemble math


class TinyConv(nn.Module):
    """A one-layer model with the models' call signature (not flip-equivariant: random 3x5 kernel)."""

    @nn.compact
    def __call__(self, x, train=False):
        return nn.Conv(4, (3, 5), use_bias=False)(x)


def test_tta_views_are_unflipped_and_averaged():
    """TTA on a small conv that is not flip-equivariant: each view's flip is undone before the mean."""
    module = TinyConv()
    x = np.random.default_rng(0).standard_normal((2, 8, 12, 1)).astype(np.float32)
    variables = module.init(jax.random.key(0), x)
    apply = lambda v: np.asarray(jax.nn.sigmoid(module.apply(variables, v)))  # noqa: E731
    views = {"none": [()], "w": [(), (2,)], "h": [(), (1,)], "hw": [(), (2,), (1,), (1, 2)]}
    for tta, flips in views.items():
        want = np.mean([np.flip(apply(np.flip(x, f)), f) if f else apply(x) for f in flips], axis=0)
        np.testing.assert_allclose(np.asarray(tta_probabilities(module, variables, x, tta)), want, atol=1e-6)
    assert not np.allclose(np.asarray(tta_probabilities(module, variables, x, "w")), apply(x), atol=1e-3)


def test_ensemble_averages_mixed_archs(models):
    """A Unet and an FPN, weighted 1:3: mean, rms and geometric mean of their own probabilities."""
    members = load_members([models["a"], models["b"]])
    assert [m.arch for m in members] == ["unet", "fpn"]
    images = np.random.default_rng(0).integers(0, 256, (2, 64, 96, 1), dtype=np.uint8)
    p = [np.asarray(member_probabilities(m, images, "none")) for m in members]
    assert p[0].shape == (2, 64, 96, 4) and not np.allclose(p[0], p[1], atol=1e-3)
    w = np.array([0.25, 0.75])
    expected = {"mean": w[0] * p[0] + w[1] * p[1], "rms": np.sqrt(w[0] * p[0] ** 2 + w[1] * p[1] ** 2),
                "geo": np.exp(w[0] * np.log(p[0]) + w[1] * np.log(p[1]))}
    for average, want in expected.items():
        got, class_probs = Ensemble(members, tta="none", average=average, weights=[1, 3]).probabilities(images)
        assert class_probs is None
        np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, err_msg=average)


def test_ensemble_argument_errors(models):
    members = load_members([models["a"]])
    with pytest.raises(ValueError, match="one weight a model"):
        Ensemble(members, weights=[1, 2])
    with pytest.raises(ValueError, match="unknown TTA"):
        Ensemble(members, tta="x")
    with pytest.raises(ValueError, match="uint8"):
        Ensemble(members)(np.zeros((1, 64, 64, 1), np.float32))
    with pytest.raises(ValueError, match="expected a classifier"):
        load_members([models["a"]], classifier=True)
    with pytest.raises(ValueError, match="expected a segmentation model"):
        load_members([models["cls"]])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_members([models["a"] + "-nope"])


# --------------------------------------------------------------------------------------- torch parity


def test_matches_pytorch_smp_with_numpy_postprocessing(data, tmp_path, torch_reference):
    torch = pytest.importorskip("torch")
    smp = pytest.importorskip("segmentation_models_pytorch")
    from severjax.models.convert import convert_smp_state_dict

    torch.manual_seed(0)
    tm = torch_reference.randomize_norms(smp.Unet("efficientnet-b0", encoder_weights=None, in_channels=1,
                                                  classes=4).eval())
    spec = dict(arch="unet", encoder="efficientnet-b0", classes=4, in_channels=1)
    variables = convert_smp_state_dict(torch_reference.state_dict(tm), create_model(**spec))
    save_model(str(tmp_path / "m"), variables, {**spec, "normalize": NORMALIZE})
    config = PostprocessConfig(thresholds=(0.5, 0.45, 0.55, 0.5), min_area=(600, 600, 1000, 2000), min_component=50)

    names = kaggle.list_images(str(data / "test_images"))[:2]
    images = np.stack([kaggle.load_image(str(data / "test_images" / n)) for n in names])
    ensemble = Ensemble(load_members([str(tmp_path / "m")]), tta="w", postprocess=config)
    probs, _ = ensemble.probabilities(images)
    got = np.stack([r.masks for r in predict_images(ensemble, [str(data / "test_images" / n) for n in names], 2,
                                                    keep_masks=True)])

    x = (images.astype(np.float32) - np.float32(NORMALIZE["mean"] * 255)) * np.float32(1 / (NORMALIZE["std"] * 255))
    with torch.no_grad():
        t = torch_reference.nchw(x)
        ref_probs = (torch.sigmoid(tm(t)) + torch.flip(torch.sigmoid(tm(torch.flip(t, [3]))), [3])) / 2
    ref_probs = torch_reference.nhwc(ref_probs)
    np.testing.assert_allclose(np.asarray(probs), ref_probs, atol=1e-4)
    want = reference_postprocess(ref_probs, config)
    assert want.sum() > 10_000, "the case must predict defects"
    differ = got != want
    assert differ.sum() <= 20, f"{differ.sum()} pixels differ"
    # Where masks differ, the probability sits at a threshold or a class tie, within float noise.
    near = np.abs(ref_probs - np.asarray(config.thresholds)).min(axis=-1) < 1e-4
    top2 = np.sort(ref_probs, axis=-1)
    near |= (top2[..., -1] - top2[..., -2]) < 1e-4
    assert near[differ.any(axis=-1)].all()


# ---------------------------------------------------------------------------------------- predict CLI


def test_cli_end_to_end_scores_as_score_tool(data, models, tmp_path, capsys):
    out = tmp_path / "sub.csv"
    sample = data / "sample_submission.csv"
    common = ["--checkpoint", models["const"], "--images", str(data / "test_images"), "--batch_size", "3",
              "--truth", str(data / "test_truth.csv"), "--quiet", "--min_area", "600,600,100000,2000"]
    summary = predict.main(common + ["--out", str(out), "--sample_submission", str(sample),
                                     "--save_overlays", str(tmp_path / "ov"), "--save_probs", str(tmp_path / "p.npz")])
    assert summary["images"] == 4 and summary["bad"] == 0 and summary["defects_per_class"] == [0, 0, 4, 0]
    printed = capsys.readouterr().out
    assert f"score: {summary['score']:.5f}" in printed
    # The row order is sample_submission's; every class-3 mask is the whole image.
    written = kaggle.read_submission(str(out))
    assert list(written) == list(kaggle.read_submission(str(sample)))
    assert all(r == ["", "", "1 409600", ""] for r in written.values())
    run = subprocess.run([sys.executable, "-m", "severjax.cli.score", "--truth",
                          str(data / "test_truth.csv"), "--submission", str(out)], capture_output=True, text=True,
                         check=True)
    assert run.stdout.strip().splitlines()[-1] == f"score: {summary['score']:.5f}"
    truth = kaggle.read_submission(str(data / "test_truth.csv"))
    assert summary["score"] == pytest.approx(score_annotations(truth, written)[1])
    # Overlays: one PNG an image, the predicted class-3 fill tints every pixel.
    pngs = sorted(os.listdir(tmp_path / "ov"))
    assert len(pngs) == 4
    overlay = cv2.imread(str(tmp_path / "ov" / pngs[0]))
    assert overlay.shape == (256, 1600, 3) and (overlay[..., 0] > overlay[..., 2]).mean() > 0.9
    # Saved probabilities: quantised sigmoid(+-8), ids in order.
    meta, chunks = read_saved_probs(str(tmp_path / "p.npz"))
    assert list(meta.image_ids) == list(written) and meta.valid.all() and meta.class_probs is None
    probs = np.concatenate(list(chunks(3)))
    assert probs.shape == (4, 256, 1600, 4) and (probs[..., 2] == 255).all() and (probs[..., 0] == 0).all()

    # A classifier sure there is no class 3 lifts its minimum area past the image: class 3 wiped.
    gated = predict.main(common + ["--out", str(tmp_path / "gated.csv"), "--classifier", models["cls"],
                                   "--layout", "post", "--tta", "none"])
    assert gated["defects_per_class"] == [0, 0, 0, 0]
    assert open(tmp_path / "gated.csv").read().strip() == "ImageId,ClassId,EncodedPixels"


def test_cli_bad_inputs(data, models, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    base = ["--checkpoint", models["const"], "--images", str(images), "--out", str(tmp_path / "s.csv"), "--quiet"]
    with pytest.raises(FileNotFoundError, match="holds no .jpg/.png images"):
        predict.main(base)
    for name in sorted(os.listdir(data / "test_images"))[:2]:
        os.symlink(data / "test_images" / name, images / name)
    with pytest.raises(FileNotFoundError, match="missing' does not exist"):
        predict.main(base[:1] + [str(tmp_path / "missing")] + base[2:])
    with pytest.raises(ValueError, match="expected a classifier"):
        predict.main(base + ["--classifier", models["const"]])
    (images / "0broken.jpg").write_bytes(b"not a jpeg")
    cv2.imwrite(str(images / "1small.png"), np.zeros((100, 100), np.uint8))
    with pytest.raises(ValueError, match="0broken.jpg could not be decoded"):
        predict.main(base)
    (images / "0broken.jpg").unlink()
    with pytest.raises(ValueError, match=r"1small.png is 100x100, expected 256x1600"):
        predict.main(base)
    (images / "0broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match="--thresholds"):
        predict.main(base + ["--thresholds", "0.5,x"])
    assert not os.path.exists(tmp_path / "s.csv")

    summary = predict.main(base + ["--skip_bad", "--batch_size", "3", "--tta", "none"])
    assert summary["images"] == 4 and summary["bad"] == 2 and summary["defects_per_class"] == [0, 0, 2, 0]
    rows = kaggle.read_submission(str(tmp_path / "s.csv"))
    assert rows["0broken.jpg"] == ["", "", "", ""] and rows["1small.png"] == ["", "", "", ""]
    assert sum(r[2] == "1 409600" for r in rows.values()) == 2


def test_cli_help_explains_every_flag():
    run = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "predict.py"), "--help"], capture_output=True,
                         text=True, check=True)
    for flag in ("--checkpoint", "--classifier", "--images", "--out", "--batch_size", "--tta", "--average",
                 "--weights", "--thresholds", "--min_area", "--min_component", "--dilate", "--c_factor", "--layout",
                 "--sample_submission", "--truth", "--save_overlays", "--save_probs", "--skip_bad"):
        assert flag in run.stdout
    run = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "predict.py"), "--checkpoint", "/nonexistent",
                          "--images", "/nonexistent", "--out", "/tmp/x.csv"], capture_output=True, text=True)
    assert run.returncode == 2 and "error: image folder /nonexistent does not exist" in run.stderr


# ------------------------------------------------------------------------------------------- streaming


def test_stream_batches_order_padding_and_errors():
    def loader(path, shape):
        if path.endswith("bad"):
            raise ValueError(f"image {path} is broken")
        return np.full((*shape, 1), int(path[1:]), np.uint8)

    paths = ["p1", "p2", "xbad", "p3", "p4"]
    batches = list(stream_batches(paths, 2, skip_bad=True, shape=(2, 3), loader=loader))
    assert [b.entries for b in batches] == [[("p1", None), ("p2", None)],
                                            [("xbad", "ValueError: image xbad is broken"), ("p3", None)],
                                            [("p4", None)]]
    assert [b.images[:, 0, 0, 0].tolist() for b in batches] == [[1, 2], [3, 0], [4, 0]]
    with pytest.raises(ValueError, match="image xbad is broken"):
        list(stream_batches(paths, 2, shape=(2, 3), loader=loader))
    # Leaving early stops the reader thread.
    stream = stream_batches(paths * 50, 1, shape=(2, 3), loader=lambda p, s: np.zeros((*s, 1), np.uint8))
    next(stream)
    stream.close()


def test_probs_writer_refuses_short_files(tmp_path):
    writer = ProbsWriter(str(tmp_path / "p.npz"), 2, shape=(4, 5))
    writer.write("a", np.ones((4, 5, 4), np.uint8))
    with pytest.raises(ValueError, match="1 images written, 2 announced"):
        writer.close()
    assert not os.listdir(tmp_path)


# ---------------------------------------------------------------------------------------------- tuning


def write_tuning_case(tmp_path, n=24, shape=(32, 48), seed=0):
    """Saved probabilities and truth where class 3's true masks score 0.7 and spurious 20-pixel blobs 0.53."""
    rng = np.random.default_rng(seed)
    writer = ProbsWriter(str(tmp_path / "p.npz"), n, shape=shape)
    truth = {}
    for i in range(n):
        probs = np.full((*shape, 4), 0.1, np.float32)
        masks = np.zeros((*shape, 4), bool)
        if i % 2:
            r, c = rng.integers(0, shape[0] - 10), rng.integers(0, shape[1] - 20)
            masks[r:r + 10, c:c + 20, 2] = True
            probs[..., 2][masks[..., 2]] = 0.7
        r, c = rng.integers(0, shape[0] - 4), rng.integers(0, shape[1] - 5)
        if not masks[r:r + 4, c:c + 5, 2].any():
            probs[r:r + 4, c:c + 5, 2] = 0.53
        probs[..., 0] = rng.random(shape) * 0.4  # class 1 never passes 0.5 ...
        probs[..., 0][probs[..., 0] > 0.38] = 0.6  # ... but for scattered single pixels
        writer.write(f"{i:03d}.jpg", np.round(probs * 255).astype(np.uint8))
        truth[f"{i:03d}.jpg"] = [rle_encode(masks[..., k]) for k in range(4)]
    writer.close()
    kaggle.write_submission(str(tmp_path / "truth.csv"), truth)
    return str(tmp_path / "p.npz"), str(tmp_path / "truth.csv")


def test_tune_finds_the_separating_setting(tmp_path, capsys):
    probs, truth = write_tuning_case(tmp_path)
    report = tune.main(["--probs", probs, "--truth", truth, "--min_area", "0,0,0,0", "--area_grid", "0,5,10,30",
                        "--threshold_grid", "0.5,0.55,0.6", "--folds", "3", "--quiet", "--bootstrap", "500",
                        "--out", str(tmp_path / "r.json")])
    assert report["base"]["score"] < 0.8
    assert report["tuned"]["score"] == 1.0
    t, a = report["tuned"]["thresholds"], report["tuned"]["min_area"]
    assert t[2] >= 0.53 or a[2] > 20  # class 3: the spurious blobs go, by threshold or by area
    assert t[0] >= 0.6 or a[0] >= 5  # class 1: the scattered pixels go
    assert not report["gain"]["within_noise"] and report["gain"]["ci95"][0] > 0
    assert report["class_gain"][1]["mean"] == 0 and report["class_gain"][1]["within_noise"]
    assert report["cross_validated_gain"]["mean"] > 0
    out = capsys.readouterr().out
    assert "a real gain" in out and "within noise" in out and "predict.py flags: --thresholds" in out
    assert json.load(open(tmp_path / "r.json"))["tuned"] == report["tuned"]


def test_tune_statistics_equal_exact_post_processing(tmp_path):
    """The per-image numbers the search uses give the same Dice as the jit post-processing, gating included."""
    shape, n = (32, 48), 6
    rng = np.random.default_rng(1)
    writer = ProbsWriter(str(tmp_path / "p.npz"), n, shape=shape)
    truth = {}
    for i in range(n):
        probs = ndimage_blobs(rng, shape)
        writer.write(f"{i}.jpg", np.round(probs * 255).astype(np.uint8), rng.random(4).astype(np.float32))
        truth[f"{i}.jpg"] = [rle_encode(probs[..., k] > 0.55) for k in range(4)]
    writer.close()
    kaggle.write_submission(str(tmp_path / "t.csv"), truth)
    data = tune.Data(str(tmp_path / "p.npz"), str(tmp_path / "t.csv"), chunk=4)
    grid_t, grid_a = np.array([0.4, 0.45, 0.5, 0.6]), np.array([0, 20, 60])
    # Class c's column depends on its own (threshold, area) and the others' thresholds only.
    base = PostprocessConfig(thresholds=(0.5, 0.45, 0.5, 0.6), min_area=(0, 0, 0, 0), c_factor=2.0)
    stats = tune.gather_stats(data, base, base.thresholds, grid_t, "test")
    for c, (ti, ai) in enumerate([(0, 1), (3, 2), (1, 0), (2, 1)]):
        thresholds = list(base.thresholds)
        thresholds[c] = float(grid_t[ti])
        config = dataclasses.replace(base, thresholds=tuple(thresholds), min_area=(int(grid_a[ai]),) * 4)
        dice = tune.stats_dice(stats, c, grid_a, base.c_factor, data.class_probs)
        np.testing.assert_allclose(dice[:, ti, ai], tune.exact_dice(data, config)[0][:, c], atol=1e-6)
    # With small-component removal: every class at once, at the base thresholds.
    base = PostprocessConfig(thresholds=(0.5,) * 4, min_area=(0, 0, 0, 0), min_component=6, c_factor=3.0)
    stats = tune.gather_stats(data, base, base.thresholds, grid_t, "test")
    exact = tune.exact_dice(data, dataclasses.replace(base, min_area=(20, 60, 0, 20)))[0]
    for c, ai in enumerate([1, 2, 0, 1]):
        dice = tune.stats_dice(stats, c, grid_a, base.c_factor, data.class_probs)
        np.testing.assert_allclose(dice[:, 2, ai], exact[:, c], atol=1e-6)
    assert 0 < exact.mean() < 1


def ndimage_blobs(rng, shape):
    from scipy import ndimage

    x = ndimage.gaussian_filter(rng.standard_normal((*shape, 4)), sigma=(2, 2, 0))
    return (1 / (1 + np.exp(-3 * x / x.std()))).astype(np.float32)


# ---------------------------------------------------------------------------------------------- memory


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_image_count(data, models, tmp_path):
    """ru_maxrss of a predict run over 500 images is within 10% of one over 50 (same few files, linked)."""
    sources = sorted(os.listdir(data / "test_images"))
    peaks = {}
    for count in (50, 500):
        folder = tmp_path / f"n{count}"
        folder.mkdir()
        for i in range(count):
            os.symlink(data / "test_images" / sources[i % len(sources)], folder / f"{i:09x}.jpg")
        code = ("import resource, sys; from severjax.cli.predict import main; main(sys.argv[1:]); "
                "print('maxrss', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
        run = subprocess.run([sys.executable, "-c", code, "--checkpoint",
                              models["const"], "--images", str(folder), "--out", str(tmp_path / f"{count}.csv"),
                              "--tta", "none", "--batch_size", "8", "--quiet"], capture_output=True, text=True,
                             check=True)
        peaks[count] = int(run.stdout.split("maxrss")[-1])
    assert peaks[500] <= 1.1 * peaks[50], peaks
