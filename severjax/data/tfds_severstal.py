"""TFDS builder ``severstal``: the labelled Kaggle images as array_record shards, built without TensorFlow.

``manual_dir`` is a Kaggle-layout folder (``train.csv`` in either layout + ``train_images/``). Split
``train`` holds every labelled image, defect-free ones included (an image in ``train_images/`` with no
CSV row has four empty masks). Features of a record:

- ``image_id``: the file name, e.g. ``"0002cc93b.jpg"`` (read back as ``bytes``);
- ``image``: uint8 (256, 1600, 1), channel 0 of the JPEG, exactly as ``kaggle.load_image`` reads it;
- ``rles``: the four classes' Kaggle RLE strings ("" = empty), as in the CSV (read back as ``bytes``);
- ``n_classes``: int32, how many classes have a defect in the image (the split's strata).

:func:`decode_record` turns a record read back into {"image_id": str, "image", "mask": uint8
(256, 1600, 4) exactly ``kaggle.masks_from_rles``, "n_classes"}.

Storage, chosen by read speed: ``image`` is a raw-bytes ``tfds.features.Tensor`` (400 KiB a record,
about 5 GB for the 12,568 real images; read back with ``np.frombuffer``, no decoding); masks are kept as
RLE text (bytes a record; nothing to decode when empty). Decoding PNG images or compressed 4-channel
masks would cost more than the augmentation itself (docs/performance.md, "Input pipeline"). Everything
is exact by construction.

Working without TensorFlow: TFDS needs TF only to encode or decode *images* (``tfds.features.Image``);
``Tensor`` and ``Text`` features are written and read with numpy, and ``builder.as_data_source(split)``
reads records without TF. Two further workarounds, both here:
- ``dataset_info_from_configs`` would look for metadata files next to this module, so ``_info``
  builds ``tfds.core.DatasetInfo`` directly;
- TFDS locates a builder's source with ``importlib_resources`` (a backport that is not a dependency
  here) when the package is installed editable; ``code_path`` returns this file instead.

Shuffling at write time is disabled: record ``i`` is ``info.metadata["image_ids"][i]`` (sorted ids), and
``info.metadata["n_classes"][i]`` its stratum, so splits and subsets are chosen without decoding a
single image. ``info.metadata["fingerprint"]`` identifies the source folder (CSV bytes + image names);
:func:`load` refuses a prepared set whose folder has changed since.
"""

from __future__ import annotations

import collections
import concurrent.futures
import hashlib
import os
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from severjax.data import kaggle

IMAGE_SHAPE = (256, 1600)
NUM_CLASSES = 4
_ENCODE_AHEAD = 32  # records decoded ahead of the writer (bounded memory)

MANUAL_INSTRUCTIONS = """\
Download the Kaggle data with
    kaggle competitions download -c severstal-steel-defect-detection
unzip it, and pass the folder holding train.csv and train_images/ as manual_dir
(--config.data.dir for training)."""


class Severstal(tfds.core.GeneratorBasedBuilder):
    """Severstal steel defect images with their 4-class masks (labelled train images only)."""

    VERSION = tfds.core.Version("2.0.0")
    RELEASE_NOTES = {
        "1.0.0": "Images and masks as PNG, records in sorted image-id order.",
        "2.0.0": "Raw-bytes image tensor and the masks as RLE text: faster to read than PNG.",
    }
    MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_INSTRUCTIONS

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        """This file (TFDS's own lookup needs the ``importlib_resources`` backport for editable installs)."""
        return epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        height, width = IMAGE_SHAPE
        return tfds.core.DatasetInfo(
            builder=self,
            description="Severstal: Steel Defect Detection (Kaggle), labelled training images.",
            features=tfds.features.FeaturesDict(
                {
                    "image_id": tfds.features.Text(),
                    "image": tfds.features.Tensor(shape=(height, width, 1), dtype=np.uint8,
                                                  encoding=tfds.features.Encoding.BYTES),
                    "rles": tfds.features.Sequence(tfds.features.Text(), length=NUM_CLASSES),
                    "n_classes": tfds.features.Scalar(np.int32),
                }
            ),
            homepage="https://www.kaggle.com/c/severstal-steel-defect-detection",
            disable_shuffling=True,
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Iterator]:
        folder = os.fspath(dl_manager.manual_dir)
        csv_path = os.path.join(folder, "train.csv")
        image_dir = os.path.join(folder, "train_images")
        if not os.path.isfile(csv_path) or not os.path.isdir(image_dir):
            raise FileNotFoundError(
                f"{folder} is not a Kaggle Severstal folder (needs train.csv and train_images/).\n"
                + MANUAL_INSTRUCTIONS)
        annotations = kaggle.read_train_csv(csv_path, image_dir)
        ids = sorted(annotations)
        self.info.metadata["image_ids"] = ids
        self.info.metadata["n_classes"] = [count_classes(annotations[i]) for i in ids]
        self.info.metadata["fingerprint"] = source_fingerprint(folder)
        return {"train": self._generate_examples(image_dir, annotations)}

    def _generate_examples(self, image_dir: str, annotations: Mapping[str, list[str]]):
        workers = max(1, min(8, os.cpu_count() or 1))
        pending: collections.deque = collections.deque()
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:  # JPEG decoding releases the GIL
            for key, image_id in enumerate(sorted(annotations)):
                pending.append((key, pool.submit(_read_example, image_dir, image_id, annotations[image_id])))
                if len(pending) >= _ENCODE_AHEAD:
                    done_key, future = pending.popleft()
                    yield done_key, future.result()  # integer keys: records keep sorted-id order
            while pending:
                done_key, future = pending.popleft()
                yield done_key, future.result()


def load(data_dir: str, manual_dir: str) -> tfds.core.DatasetBuilder:
    """Returns the ``severstal`` builder under ``data_dir``, preparing it from ``manual_dir`` once.

    A set already prepared is reused; one prepared from a different folder content (CSV or image
    list changed) is an error naming both, rather than silently training on stale data.
    """
    builder = Severstal(data_dir=data_dir, file_format="array_record")
    if not builder.is_prepared():
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=manual_dir),
        )
        builder = Severstal(data_dir=data_dir, file_format="array_record")
    stored = builder.info.metadata.get("fingerprint")
    current = source_fingerprint(manual_dir)
    if stored != current:
        raise ValueError(
            f"the TFDS set in {builder.data_dir} was prepared from different data than {manual_dir} now holds "
            f"(fingerprint {stored} != {current}); delete {builder.data_dir} or use another data.tfds_dir")
    return builder


def decode_record(record: Mapping[str, Any]) -> dict[str, Any]:
    """A record read back from the set -> {"image_id": str, "image": uint8 (H, W, 1), "mask": uint8
    (H, W, 4), "n_classes": int}."""
    rles = [r.decode() if isinstance(r, bytes) else str(r) for r in record["rles"]]
    image_id = record["image_id"]
    return {
        "image_id": image_id.decode() if isinstance(image_id, bytes) else str(image_id),
        "image": record["image"],
        "mask": kaggle.masks_from_rles(rles, IMAGE_SHAPE),
        "n_classes": int(record["n_classes"]),
    }


def count_classes(rles: Any) -> int:
    """Number of non-empty classes among four RLE strings (the split stratum)."""
    return sum(1 for r in rles if r and str(r).strip())


def source_fingerprint(folder: str) -> str:
    """Short hash of ``train.csv`` bytes and the sorted image names of ``train_images/``."""
    digest = hashlib.sha256()
    with open(os.path.join(folder, "train.csv"), "rb") as f:
        digest.update(f.read())
    digest.update("\n".join(kaggle.list_images(os.path.join(folder, "train_images"))).encode())
    return digest.hexdigest()[:16]


def _read_example(image_dir: str, image_id: str, rles: list[str]) -> dict[str, Any]:
    return {
        "image_id": image_id,
        "image": kaggle.load_image(os.path.join(image_dir, image_id), IMAGE_SHAPE),
        "rles": list(rles),
        "n_classes": count_classes(rles),
    }
