"""Reading and writing the files Kaggle ships and accepts for the Severstal competition.

Two CSV layouts exist and both are read:
- competition layout: ``ImageId_ClassId,EncodedPixels`` with four rows an image (``<id>.jpg_1`` .. ``_4``),
  empty ones included;
- post-competition layout: ``ImageId,ClassId,EncodedPixels`` with defect rows only. An image in
  ``train_images/`` that has no row is defect-free and is kept (with four empty masks): dropping such
  images was a bug of the original solution's loader (about 47% of the real images are defect-free).

Annotations are ``{image_id: [rle_1, rle_2, rle_3, rle_4]}`` with "" for an empty class; every problem
is reported with the file, the row and the value at fault.
"""

from __future__ import annotations

import csv
import os
from typing import Iterable, Mapping, Sequence

import cv2
import numpy as np

from severjax.data.rle import KAGGLE_SHAPE, parse_runs, rle_decode

NUM_CLASSES = 4
COMPETITION_HEADER = ("ImageId_ClassId", "EncodedPixels")
POST_HEADER = ("ImageId", "ClassId", "EncodedPixels")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
# The longest possible RLE (a checkerboard 256x1600 mask) is ~3 MB; csv's default field limit is 128 KiB.
MAX_FIELD_CHARS = 16 * 1024 * 1024

Annotations = dict[str, list[str]]


def read_train_csv(csv_path: str, image_dir: str | None = None, shape=KAGGLE_SHAPE) -> Annotations:
    """Reads a Kaggle ``train.csv`` (either layout) into ``{image_id: [4 RLE strings]}``.

    With ``image_dir``, images present there but absent from the CSV are added as defect-free, and an
    image named by the CSV but missing from the folder is an error.
    """
    annotations = _read_rows(csv_path, shape, require_all_classes=False)
    if image_dir is not None:
        on_disk = list_images(image_dir)
        missing = sorted(set(annotations) - set(on_disk))
        if missing:
            raise FileNotFoundError(
                f"{csv_path}: {len(missing)} image(s) named in the CSV are not in {image_dir}: "
                f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
        for image_id in on_disk:
            annotations.setdefault(image_id, [""] * NUM_CLASSES)
    return dict(sorted(annotations.items()))


def read_submission(csv_path: str, shape=KAGGLE_SHAPE) -> Annotations:
    """Reads a submission or truth CSV in either layout into ``{image_id: [4 RLE strings]}``.

    In the competition layout every image must have all four class rows.
    """
    return _read_rows(csv_path, shape, require_all_classes=True)


def read_pair(truth_csv: str, submission_csv: str, truth_images: str | None = None
              ) -> tuple[Annotations, Annotations]:
    """Reads a truth and a submission CSV for scoring; a side in the post layout is completed with empty rows.

    The post layout (defect rows only) cannot say which images it covers: a post-layout truth without
    ``truth_images`` (its image folder) takes the submission's images it does not mention as defect-free,
    and a post-layout submission predicts "no defect" for the truth's images it does not mention.
    Competition-layout files list every image, so there an image one side lacks stays missing (and
    ``severjax.metrics.score_annotations`` names it).
    """
    submission = read_submission(submission_csv)
    truth = read_train_csv(truth_csv, truth_images) if truth_images else read_submission(truth_csv)
    if not truth_images and is_post_layout(truth_csv):
        for image_id in submission:
            truth.setdefault(image_id, [""] * NUM_CLASSES)
    if is_post_layout(submission_csv):
        for image_id in truth:
            submission.setdefault(image_id, [""] * NUM_CLASSES)
    return truth, submission


def read_truth_for(csv_path: str, ids: Sequence[str], require_all: bool = False) -> Annotations:
    """The truth RLEs ``{image_id: [4 RLE]}`` of exactly ``ids``; an image the CSV does not list is empty.

    ``require_all``: a competition-layout CSV lists every image it covers, so there an image it lacks is an
    error naming the CSV and the images (a post-layout CSV lists defect rows only: absent means empty).
    """
    truth = read_submission(csv_path)
    if require_all and not is_post_layout(csv_path):
        missing = [i for i in ids if i not in truth]
        if missing:
            raise ValueError(f"{csv_path}: {len(missing)} image(s) have no truth rows: {', '.join(missing[:5])}")
    return {i: truth.get(i, [""] * NUM_CLASSES) for i in ids}


def is_post_layout(csv_path: str) -> bool:
    """Whether a CSV's header is the post-competition layout's (``ImageId,ClassId,EncodedPixels``)."""
    with open(csv_path, newline="", errors="replace") as f:
        return f.readline().strip().lstrip("\ufeff").replace(" ", "") == ",".join(POST_HEADER)


def write_submission(path: str, rows: Mapping[str, Sequence[str]], layout: str = "competition",
                     order: Sequence[str] | None = None) -> None:
    """Writes ``{image_id: [4 RLE]}`` as a Kaggle CSV.

    ``layout="competition"``: ``ImageId_ClassId,EncodedPixels``, four rows an image (the format the
    competition scored); ``"post"``: ``ImageId,ClassId,EncodedPixels``, defect rows only.
    ``order``: image ids in the order to write (e.g. sample_submission's); every id must be in ``rows``.
    """
    if layout not in ("competition", "post"):
        raise ValueError(f"unknown submission layout {layout!r}: use 'competition' or 'post'")
    ids = list(order) if order is not None else sorted(rows)
    absent = [i for i in ids if i not in rows]
    if absent:
        raise KeyError(f"{len(absent)} image(s) of the requested order have no prediction: {absent[:5]}")
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        if layout == "competition":
            writer.writerow(COMPETITION_HEADER)
            for image_id in ids:
                rles = _check_four(rows[image_id], image_id)
                for c, rle in enumerate(rles, start=1):
                    writer.writerow((f"{image_id}_{c}", rle))
        else:
            writer.writerow(POST_HEADER)
            for image_id in ids:
                for c, rle in enumerate(_check_four(rows[image_id], image_id), start=1):
                    if rle:
                        writer.writerow((image_id, c, rle))
    os.replace(tmp, path)


def load_image(path: str, shape=KAGGLE_SHAPE) -> np.ndarray:
    """Loads a Kaggle image (3 identical channels) as uint8 ``(H, W, 1)``: channel 0, as the original did."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image {path} does not exist")
    image = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    if image is None:
        raise ValueError(f"image {path} could not be decoded (not a readable JPEG/PNG)")
    if image.ndim == 3:
        image = image[..., 0]  # cv2 gives BGR; the channels are identical copies of the grey image
    if image.dtype != np.uint8:
        raise ValueError(f"image {path} has dtype {image.dtype}, expected 8-bit")
    if image.shape != tuple(shape):
        raise ValueError(f"image {path} is {image.shape[0]}x{image.shape[1]}, expected {shape[0]}x{shape[1]}")
    return image[..., None]


def masks_from_rles(rles: Sequence[str], shape=KAGGLE_SHAPE) -> np.ndarray:
    """Decodes four RLE strings into a uint8 ``(H, W, 4)`` mask stack (1 = defect of that class)."""
    rles = _check_four(rles, "masks_from_rles")
    return np.stack([rle_decode(r, shape) for r in rles], axis=-1).astype(np.uint8)


def list_images(image_dir: str) -> list[str]:
    """Sorted image file names (ids) in a folder; an absent or empty folder is an error."""
    if not os.path.isdir(image_dir):
        raise FileNotFoundError(f"image folder {image_dir} does not exist")
    names = sorted(n for n in os.listdir(image_dir) if n.lower().endswith(IMAGE_EXTENSIONS))
    if not names:
        raise FileNotFoundError(f"image folder {image_dir} holds no .jpg/.png images")
    return names


def _read_rows(csv_path: str, shape, require_all_classes: bool) -> Annotations:
    if not os.path.isfile(csv_path):
        raise FileNotFoundError(f"CSV {csv_path} does not exist")
    if csv.field_size_limit() < MAX_FIELD_CHARS:
        csv.field_size_limit(MAX_FIELD_CHARS)
    with open(csv_path, newline="") as f:
        reader = csv.reader(f)
        header = tuple(h.strip().lstrip("\ufeff") for h in next(_checked(csv_path, reader, reader), ()))
        if header == COMPETITION_HEADER:
            rows = _competition_rows(csv_path, reader)
        elif header == POST_HEADER:
            rows = _post_rows(csv_path, reader)
        else:
            raise ValueError(
                f"{csv_path}: header {','.join(header) or '(empty file)'} is neither the competition layout "
                f"{','.join(COMPETITION_HEADER)} nor the post-competition layout {','.join(POST_HEADER)}")
        annotations: Annotations = {}
        seen_rows: dict[tuple[str, int], int] = {}
        for line, image_id, class_id, rle in _checked(csv_path, reader, rows):
            key = (image_id, class_id)
            if key in seen_rows:
                raise ValueError(
                    f"{csv_path}:{line}: duplicate row for image {image_id} class {class_id} "
                    f"(first at line {seen_rows[key]})")
            seen_rows[key] = line
            try:
                parse_runs(rle, shape)
            except ValueError as err:
                raise ValueError(f"{csv_path}:{line}: bad RLE for image {image_id} class {class_id}: {err}") from None
            annotations.setdefault(image_id, [""] * NUM_CLASSES)[class_id - 1] = rle
    if require_all_classes and header == COMPETITION_HEADER:
        for image_id in annotations:
            absent = [c for c in range(1, NUM_CLASSES + 1) if (image_id, c) not in seen_rows]
            if absent:
                raise ValueError(f"{csv_path}: image {image_id} lacks rows for class(es) {absent}")
    return annotations


def _checked(csv_path: str, reader, items: Iterable):
    """``items`` one by one, the csv module's and the text decoder's errors turned into ValueErrors that name
    the file and the line (``reader`` counts the lines)."""
    try:
        yield from items
    except csv.Error as err:
        raise ValueError(f"{csv_path}:{reader.line_num}: not readable as CSV: {err}") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"{csv_path}: not UTF-8 text (byte {err.start} of a block is "
                         f"{err.object[err.start:err.start + 1]!r})") from None


def _competition_rows(csv_path: str, reader: Iterable[list[str]]):
    for line, row in enumerate(reader, start=2):
        if not row:
            continue
        if len(row) not in (1, 2):
            raise ValueError(f"{csv_path}:{line}: expected 2 fields (ImageId_ClassId,EncodedPixels), got {row!r}")
        key = row[0].strip()
        image_id, sep, class_text = key.rpartition("_")
        if not sep or not image_id:
            raise ValueError(f"{csv_path}:{line}: ImageId_ClassId {key!r} is not '<image>_<class>'")
        yield line, image_id, _class_id(csv_path, line, class_text), (row[1].strip() if len(row) > 1 else "")


def _post_rows(csv_path: str, reader: Iterable[list[str]]):
    for line, row in enumerate(reader, start=2):
        if not row:
            continue
        if len(row) != 3:
            raise ValueError(f"{csv_path}:{line}: expected 3 fields (ImageId,ClassId,EncodedPixels), got {row!r}")
        image_id = row[0].strip()
        if not image_id:
            raise ValueError(f"{csv_path}:{line}: empty ImageId")
        yield line, image_id, _class_id(csv_path, line, row[1]), row[2].strip()


def _class_id(csv_path: str, line: int, text: str) -> int:
    try:
        value = int(text.strip())
    except ValueError:
        raise ValueError(f"{csv_path}:{line}: class {text!r} is not an integer 1..4") from None
    if not 1 <= value <= NUM_CLASSES:
        raise ValueError(f"{csv_path}:{line}: class {value} is outside 1..{NUM_CLASSES}")
    return value


def _check_four(rles: Sequence[str], where: str) -> list[str]:
    rles = ["" if r is None else str(r) for r in rles]
    if len(rles) != NUM_CLASSES:
        raise ValueError(f"{where}: expected {NUM_CLASSES} RLE strings (one a class), got {len(rles)}")
    return rles
