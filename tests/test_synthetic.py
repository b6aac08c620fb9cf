import csv
import filecmp
import os
import re
import subprocess
import sys

import cv2
import numpy as np
import pytest
from PIL import Image

from severjax.data import kaggle, synthetic
from severjax.data.rle import rle_decode

POST_MIN_AREA = (600, 600, 1000, 2000)  # the original's post-processing minimum areas
FILES = ("train.csv", "sample_submission.csv", "test_truth.csv")


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def _all_files(root):
    out = []
    for base, _, names in os.walk(root):
        out += [os.path.relpath(os.path.join(base, n), root) for n in names]
    return sorted(out)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth") / "data"
    summary = synthetic.make_dataset(out, n_train=14, n_test=5, seed=5)
    return str(out), summary


def test_layout_names_and_images(small):
    out, summary = small
    assert summary["n_train"] == 14 and summary["n_test"] == 5
    names = synthetic.image_names(5, 14, 5)
    for split, n in (("train", 14), ("test", 5)):
        files = sorted(os.listdir(os.path.join(out, f"{split}_images")))
        assert files == sorted(names[split]) and len(files) == n
        assert all(re.fullmatch(r"[0-9a-f]{9}\.jpg", f) for f in files)
    assert not set(names["train"]) & set(names["test"])
    for i, name in enumerate(names["train"][:4]):
        path = os.path.join(out, "train_images", name)
        with Image.open(path) as im:
            assert im.format == "JPEG" and im.mode == "RGB" and im.size == (1600, 256)
            rgb = np.asarray(im)
        assert rgb.dtype == np.uint8 and rgb.shape == (256, 1600, 3)
        np.testing.assert_array_equal(rgb[..., 0], rgb[..., 1])
        np.testing.assert_array_equal(rgb[..., 0], rgb[..., 2])
        loaded = kaggle.load_image(path)
        assert loaded.shape == (256, 1600, 1)
        # the JPEG holds the generator's image, up to compression error
        rendered = synthetic.render_sample(5, "train", i).image
        assert np.abs(loaded[..., 0].astype(float) - rendered).mean() < 4.0


def test_csv_masks_match_generator(small):
    out, summary = small
    names = synthetic.image_names(5, 14, 5)
    rows = _read_csv(os.path.join(out, "train.csv"))
    assert rows[0] == ["ImageId", "ClassId", "EncodedPixels"]
    by_image = {}
    for image_id, class_id, rle in rows[1:]:
        assert rle, f"train.csv row for {image_id} class {class_id} is empty (post layout lists defects only)"
        by_image.setdefault(image_id, {})[int(class_id)] = rle
    defect_free = 0
    for i, name in enumerate(names["train"]):
        masks = synthetic.render_sample(5, "train", i).masks
        assert masks.dtype == bool and masks.shape == (256, 1600, 4)
        assert masks.sum(-1).max() <= 1, f"{name}: a pixel carries two classes"
        defect_free += not masks.any()
        for c in range(4):
            rle = by_image.get(name, {}).get(c + 1, "")
            np.testing.assert_array_equal(rle_decode(rle), masks[..., c], err_msg=f"{name} class {c + 1}")
    assert summary["train_defect_free"] == defect_free
    # the lead's reader sees the same annotations, defect-free images included
    ann = kaggle.read_train_csv(os.path.join(out, "train.csv"), os.path.join(out, "train_images"))
    assert sorted(ann) == sorted(names["train"])
    for i, name in enumerate(names["train"]):
        np.testing.assert_array_equal(kaggle.masks_from_rles(ann[name]).astype(bool),
                                      synthetic.render_sample(5, "train", i).masks)


def test_test_split_csvs(small):
    out, _ = small
    names = synthetic.image_names(5, 14, 5)["test"]
    sample = _read_csv(os.path.join(out, "sample_submission.csv"))
    assert sample[0] == ["ImageId_ClassId", "EncodedPixels"]
    assert sorted(r[0] for r in sample[1:]) == sorted(f"{n}_{c}" for n in names for c in range(1, 5))
    assert all(r[1] == "1 1" for r in sample[1:])
    truth = kaggle.read_submission(os.path.join(out, "test_truth.csv"))
    assert sorted(truth) == sorted(names)
    for i, name in enumerate(names):
        np.testing.assert_array_equal(kaggle.masks_from_rles(truth[name]).astype(bool),
                                      synthetic.render_sample(5, "test", i).masks)


def test_same_seed_same_bytes_different_seed_differs(small, tmp_path):
    out, _ = small
    again = tmp_path / "again"
    synthetic.make_dataset(again, n_train=14, n_test=5, seed=5, num_workers=2)  # workers do not matter
    assert _all_files(out) == _all_files(again)
    for rel in _all_files(out):
        assert filecmp.cmp(os.path.join(out, rel), again / rel, shallow=False), rel
    other = tmp_path / "other"
    synthetic.make_dataset(other, n_train=14, n_test=5, seed=6)
    assert not set(os.listdir(other / "train_images")) & set(os.listdir(os.path.join(out, "train_images")))
    a = synthetic.render_sample(5, "train", 0).image
    b = synthetic.render_sample(6, "train", 0).image
    assert not np.array_equal(a, b)
    # train names do not depend on the test count
    assert synthetic.image_names(5, 14, 0)["train"] == synthetic.image_names(5, 14, 9)["train"]


def test_refuses_to_overwrite_unless_asked(small, tmp_path):
    out, _ = small
    with pytest.raises(FileExistsError, match="already holds a data set"):
        synthetic.make_dataset(out, 1, 1, seed=5)
    target = tmp_path / "d"
    synthetic.make_dataset(target, 3, 2, seed=1)
    summary = synthetic.make_dataset(target, 2, 1, seed=2, overwrite=True)
    assert len(os.listdir(target / "train_images")) == 2 and len(os.listdir(target / "test_images")) == 1
    assert summary["seed"] == 2
    with pytest.raises(ValueError, match="split"):
        synthetic.render_sample(0, "val", 0)
    with pytest.raises(ValueError, match="n_train=-1"):
        synthetic.make_dataset(tmp_path / "e", -1, 0, seed=0)


def test_statistics_like_kaggle(tmp_path):
    """~200 images: defect-free share, class shares, classes per image, areas and visible contrast."""
    n = 200
    summary = synthetic.make_dataset(tmp_path / "stats", n_train=n, n_test=0, seed=123)
    counts = np.asarray(summary["train_masks_per_class"], float)
    share = counts / counts.sum()
    free = summary["train_defect_free"] / n
    assert abs(free - synthetic.DEFECT_FREE_P) < 0.1, free
    assert abs(share[2] - 0.73) < 0.13, share  # class 3 dominates
    assert abs(share[0] - 0.13) < 0.08 and abs(share[3] - 0.11) < 0.08, share
    assert 0 < counts[1] and share[1] < 0.08, share  # class 2 is rare
    assert 1.0 <= counts.sum() / (n - summary["train_defect_free"]) < 1.2

    ann = kaggle.read_train_csv(str(tmp_path / "stats" / "train.csv"))
    names = synthetic.image_names(123, n, 0)["train"]
    above, total = 0, 0
    for i, name in enumerate(names[:80]):
        if name not in ann:
            continue
        sample = synthetic.render_sample(123, "train", i)
        image = sample.image.astype(np.float32)
        for c in range(4):
            mask = sample.masks[..., c]
            if not mask.any():
                continue
            total += 1
            above += mask.sum() >= POST_MIN_AREA[c]
            # the defect's texture differs clearly from the steel around it
            ring = cv2.dilate(mask.astype(np.uint8), np.ones((31, 31), np.uint8)).astype(bool) & ~sample.masks.any(-1)
            inside, around = image[mask], image[ring]
            contrast = abs(inside.mean() - around.mean()) + abs(inside.std() - around.std())
            assert contrast > 10, f"{name} class {c + 1}: contrast {contrast:.1f}"
    assert total > 20 and above / total > 0.95, (above, total)


def test_cli(tmp_path):
    from severjax.cli import make_synthetic

    help_text = subprocess.run([sys.executable, "-m", "severjax.cli.make_synthetic", "--help"], capture_output=True,
                               text=True, check=True).stdout
    assert "--seed" in help_text and "--out" in help_text
    summary = make_synthetic.main(["--out", str(tmp_path / "cli"), "--train", "3", "--test", "2", "--seed", "4",
                                   "--quiet"])
    assert summary["n_train"] == 3
    for f in FILES:
        assert os.path.isfile(tmp_path / "cli" / f)
    assert len(os.listdir(tmp_path / "cli" / "test_images")) == 2
