"""Kaggle file formats: both train.csv layouts, images, submissions, and the errors for bad input."""

import os
import subprocess
import sys

import cv2
import numpy as np
import pytest

from severjax.data import kaggle
from severjax.data.rle import rle_encode

SHAPE = (256, 1600)


def _masks(seed):
    rng = np.random.default_rng(seed)
    masks = np.zeros(SHAPE + (4,), np.uint8)
    c = int(rng.integers(4))
    r0, c0 = rng.integers(0, 200), rng.integers(0, 1500)
    masks[r0:r0 + 40, c0:c0 + 90, c] = 1
    return masks


@pytest.fixture
def folder(tmp_path):
    """Three images: two with defects, one defect-free; CSVs typed out by hand as other programs write them."""
    images = tmp_path / "train_images"
    images.mkdir()
    truth = {}
    for i, name in enumerate(["aaa.jpg", "bbb.jpg", "ccc.jpg"]):
        grey = np.random.default_rng(i).integers(0, 255, SHAPE, dtype=np.uint8)
        cv2.imwrite(str(images / name), np.repeat(grey[..., None], 3, axis=-1))
        truth[name] = _masks(i) if name != "bbb.jpg" else np.zeros(SHAPE + (4,), np.uint8)
    rles = {k: [rle_encode(v[..., c]) for c in range(4)] for k, v in truth.items()}
    # Post-competition layout: defect rows only, quoted fields, CRLF line ends (pandas-on-Windows style).
    post = ['ImageId,ClassId,EncodedPixels']
    for name, r in rles.items():
        post += [f'{name},{c + 1},"{r[c]}"' for c in range(4) if r[c]]
    (tmp_path / "post.csv").write_text("\r\n".join(post) + "\r\n")
    # Competition layout: four rows an image, empty ones with an empty field.
    comp = ["ImageId_ClassId,EncodedPixels"]
    for name, r in rles.items():
        comp += [f"{name}_{c + 1},{r[c]}" for c in range(4)]
    (tmp_path / "comp.csv").write_text("\n".join(comp) + "\n")
    return tmp_path, truth


def test_both_layouts_read_to_same_masks(folder):
    path, truth = folder
    post = kaggle.read_train_csv(str(path / "post.csv"), str(path / "train_images"))
    comp = kaggle.read_train_csv(str(path / "comp.csv"))
    assert sorted(post) == sorted(comp) == sorted(truth)
    for name, masks in truth.items():
        np.testing.assert_array_equal(kaggle.masks_from_rles(post[name]), masks)
        np.testing.assert_array_equal(kaggle.masks_from_rles(comp[name]), masks)


def test_defect_free_images_kept(folder):
    path, _ = folder
    ann = kaggle.read_train_csv(str(path / "post.csv"), str(path / "train_images"))
    assert ann["bbb.jpg"] == ["", "", "", ""]
    # Without the folder the post layout cannot know of bbb.jpg.
    assert "bbb.jpg" not in kaggle.read_train_csv(str(path / "post.csv"))


def test_load_image(folder):
    path, _ = folder
    image = kaggle.load_image(str(path / "train_images" / "aaa.jpg"))
    assert image.shape == (256, 1600, 1) and image.dtype == np.uint8


def test_image_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jpg"):
        kaggle.load_image(str(tmp_path / "nope.jpg"))
    (tmp_path / "junk.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match="junk.jpg.*could not be decoded"):
        kaggle.load_image(str(tmp_path / "junk.jpg"))
    cv2.imwrite(str(tmp_path / "small.jpg"), np.zeros((100, 200, 3), np.uint8))
    with pytest.raises(ValueError, match="small.jpg is 100x200"):
        kaggle.load_image(str(tmp_path / "small.jpg"))


@pytest.mark.parametrize(
    "body, message",
    [
        ("ImageId,ClassId,EncodedPixels\na.jpg,5,1 3\n", r"x.csv:2: class 5 is outside 1..4"),
        ("ImageId,ClassId,EncodedPixels\na.jpg,one,1 3\n", r"x.csv:2: class 'one'"),
        ("ImageId,ClassId,EncodedPixels\na.jpg,1,1 3\nb.jpg,2,1 3\na.jpg,1,9 2\n",
         r"x.csv:4: duplicate row for image a.jpg class 1 \(first at line 2\)"),
        ("ImageId,ClassId,EncodedPixels\na.jpg,1,1 3 9\n", r"x.csv:2: bad RLE for image a.jpg class 1: .*odd count"),
        ("ImageId_ClassId,EncodedPixels\na.jpg_1,5 2 1 1\n", r"x.csv:2: bad RLE .*out of order"),
        ("ImageId_ClassId,EncodedPixels\na.jpg_7,\n", r"x.csv:2: class 7"),
        ("Image,Pixels\n", r"neither the competition layout"),
    ],
)
def test_csv_errors_name_file_row_value(tmp_path, body, message):
    (tmp_path / "x.csv").write_text(body)
    with pytest.raises(ValueError, match=message):
        kaggle.read_train_csv(str(tmp_path / "x.csv"))


def test_csv_image_missing_from_folder(folder):
    path, _ = folder
    os.remove(path / "train_images" / "aaa.jpg")
    with pytest.raises(FileNotFoundError, match="aaa.jpg"):
        kaggle.read_train_csv(str(path / "post.csv"), str(path / "train_images"))


def test_submission_round_trip_both_layouts(tmp_path, folder):
    path, truth = folder
    rows = kaggle.read_train_csv(str(path / "post.csv"), str(path / "train_images"))
    order = ["ccc.jpg", "aaa.jpg", "bbb.jpg"]
    kaggle.write_submission(str(tmp_path / "s.csv"), rows, order=order)
    lines = (tmp_path / "s.csv").read_text().splitlines()
    assert lines[0] == "ImageId_ClassId,EncodedPixels" and len(lines) == 1 + 4 * 3
    assert [ln.split(",")[0] for ln in lines[1:5]] == [f"ccc.jpg_{c}" for c in range(1, 5)]
    assert kaggle.read_submission(str(tmp_path / "s.csv")) == rows
    kaggle.write_submission(str(tmp_path / "p.csv"), rows, layout="post")
    assert kaggle.read_train_csv(str(tmp_path / "p.csv"), str(path / "train_images")) == rows
    with pytest.raises(ValueError, match="layout"):
        kaggle.write_submission(str(tmp_path / "q.csv"), rows, layout="wide")


def test_submission_missing_class_rows(tmp_path):
    (tmp_path / "s.csv").write_text("ImageId_ClassId,EncodedPixels\na.jpg_1,\na.jpg_2,\n")
    with pytest.raises(ValueError, match=r"a.jpg lacks rows for class\(es\) \[3, 4\]"):
        kaggle.read_submission(str(tmp_path / "s.csv"))


def _score(*args):
    return subprocess.run([sys.executable, "-m", "severjax.cli.score", *args], capture_output=True, text=True)


def test_score_tool(folder, tmp_path):
    path, truth = folder
    full = kaggle.read_train_csv(str(path / "post.csv"), str(path / "train_images"))
    kaggle.write_submission(str(tmp_path / "truth.csv"), full)
    out = _score("--truth", str(tmp_path / "truth.csv"), "--submission", str(path / "comp.csv"))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "score: 1.00000"
    # All-empty submission: scores the share of empty (image, class) pairs: 10 of 12 here.
    kaggle.write_submission(str(tmp_path / "empty.csv"), {k: [""] * 4 for k in full})
    out = _score("--truth", str(path / "post.csv"), "--submission", str(tmp_path / "empty.csv"))
    assert float(out.stdout.strip().splitlines()[-1].split()[-1]) == pytest.approx(10 / 12, abs=1e-5)
    # An image that one side lacks is an error that names it.
    kaggle.write_submission(str(tmp_path / "short.csv"), {k: full[k] for k in ["aaa.jpg", "bbb.jpg"]})
    out = _score("--truth", str(tmp_path / "truth.csv"), "--submission", str(tmp_path / "short.csv"))
    assert out.returncode != 0 and "ccc.jpg" in out.stderr


def test_score_post_layout_submission_and_long_rle(folder, tmp_path):
    path, _ = folder
    full = kaggle.read_train_csv(str(path / "post.csv"), str(path / "train_images"))
    kaggle.write_submission(str(tmp_path / "truth.csv"), full)
    # A post-layout submission omits defect-free bbb.jpg: it is scored as predicted empty (correct here).
    kaggle.write_submission(str(tmp_path / "post_sub.csv"), full, layout="post")
    out = _score("--truth", str(tmp_path / "truth.csv"), "--submission", str(tmp_path / "post_sub.csv"))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "score: 1.00000"
    # A noisy mask's RLE is far longer than csv's default 128 KiB field limit.
    noisy = np.zeros(SHAPE, bool)
    noisy[::2, :] = True
    rows = dict(full, **{"aaa.jpg": [rle_encode(noisy), "", "", ""]})
    kaggle.write_submission(str(tmp_path / "long.csv"), rows)
    assert len(rows["aaa.jpg"][0]) > 131072
    assert kaggle.read_submission(str(tmp_path / "long.csv"))["aaa.jpg"][0] == rows["aaa.jpg"][0]


def test_read_truth_for_gives_exactly_the_asked_images(tmp_path):
    rle = rle_encode(np.pad(np.ones((2, 2), bool), ((0, 254), (0, 1598))))
    rows = {"a.jpg": [rle, "", "", ""], "b.jpg": ["", "", "", ""]}
    competition, post = str(tmp_path / "competition.csv"), str(tmp_path / "post.csv")
    kaggle.write_submission(competition, rows)
    kaggle.write_submission(post, rows, layout="post")
    for path in (competition, post):
        truth = kaggle.read_truth_for(path, ["b.jpg", "a.jpg", "c.jpg"])
        assert list(truth) == ["b.jpg", "a.jpg", "c.jpg"]
        assert truth["a.jpg"][0] == rle and truth["c.jpg"] == ["", "", "", ""]
    # a post-layout CSV lists defect rows only, so an unlisted image is defect-free even when all are required
    assert kaggle.read_truth_for(post, ["c.jpg"], require_all=True) == {"c.jpg": ["", "", "", ""]}
    with pytest.raises(ValueError, match=r"competition\.csv: 1 image\(s\) have no truth rows: c\.jpg"):
        kaggle.read_truth_for(competition, ["a.jpg", "c.jpg"], require_all=True)
