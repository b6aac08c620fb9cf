"""Input pipeline: TFDS builder without TF, albumentations transforms, stratified split, grain loaders."""

from __future__ import annotations

import csv
import os
import shutil
import sys

import ml_collections
import numpy as np
import pytest

from severjax.data import augment, kaggle, pipeline, sampling, synthetic, tfds_severstal

N_TRAIN, N_TEST = 24, 4
MEAN, STD = 0.3439, 0.196


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("severstal"))
    synthetic.make_dataset(out, N_TRAIN, N_TEST, seed=3)
    return out


@pytest.fixture(scope="module")
def builder(folder, tmp_path_factory):
    return tfds_severstal.load(str(tmp_path_factory.mktemp("tfds")), folder)


def make_config(folder, builder, **data):
    config = ml_collections.ConfigDict()
    config.seed = 7
    config.batch_size = 4
    config.eval_batch_size = 4
    config.data = ml_collections.ConfigDict(dict(
        dir=folder, tfds_dir=os.path.dirname(os.path.dirname(builder.data_dir)), synthetic=None,
        crop=(128, 256), image_shape=(256, 1600), val_fraction=0.2, split_seed=0, mean=MEAN, std=STD,
        workers=0, limit_train=0, limit_val=0, pseudo_csv="", pseudo_images="", pseudo_alpha=-0.15))
    config.data.update(data)
    config.aug = ml_collections.ConfigDict(dict(
        crop_nonempty_p=0.5, clahe_clip=(1.0, 4.0), blur=3, sharpen_alpha=(0.2, 0.3), oneof=(0.5, 0.3, 0.3),
        hflip=0.5, vflip=0.5))
    return config


def identity_aug(config):
    """Full-size crop, a 1x1 'blur', no flips: the train transform reduces to normalisation."""
    config.data.crop = (256, 1600)
    config.aug.update(dict(blur=1, oneof=(0.0, 1.0, 0.0), hflip=0.0, vflip=0.0))
    return config


def normalised(folder, image_id):
    return (kaggle.load_image(os.path.join(folder, "train_images", image_id)) / 255.0 - MEAN) / STD


def identify(batch_images, refs):
    """Image ids of a batch of identity-augmented images, by matching ``refs`` {id: normalised image}."""
    ids = []
    for image in batch_images:
        match = [i for i, ref in refs.items() if np.allclose(image, ref, atol=1e-4)]
        assert len(match) == 1, "each batch row must be exactly one training image"
        ids.append(match[0])
    return ids


# --- TFDS builder -------------------------------------------------------------------------------

def test_builder_round_trips_images_and_masks_without_tensorflow(folder, builder):
    annotations = kaggle.read_train_csv(os.path.join(folder, "train.csv"), os.path.join(folder, "train_images"))
    source = builder.as_data_source("train")
    assert len(source) == N_TRAIN == len(annotations)
    with open(os.path.join(folder, "train.csv")) as f:
        with_rows = {row["ImageId"] for row in csv.DictReader(f)}
    defect_free = set(annotations) - with_rows
    assert defect_free, "the synthetic set should hold defect-free images (no CSV row)"
    seen = set()
    for i in range(len(source)):
        record = tfds_severstal.decode_record(source[i])
        image_id = record["image_id"]
        seen.add(image_id)
        assert image_id == builder.info.metadata["image_ids"][i]
        assert record["image"].dtype == np.uint8 and record["image"].shape == (256, 1600, 1)
        np.testing.assert_array_equal(record["image"], kaggle.load_image(os.path.join(folder, "train_images", image_id)))
        np.testing.assert_array_equal(record["mask"], kaggle.masks_from_rles(annotations[image_id]))
        assert record["n_classes"] == sum(bool(r) for r in annotations[image_id])
    assert seen == set(annotations) and defect_free <= seen
    assert "tensorflow" not in sys.modules


def test_builder_is_prepared_once_and_refuses_a_changed_folder(folder, builder, tmp_path):
    shards = sorted(p for p in os.listdir(builder.data_dir) if "array_record" in p)
    stamps = [os.stat(os.path.join(builder.data_dir, p)).st_mtime_ns for p in shards]
    again = tfds_severstal.load(os.path.dirname(os.path.dirname(builder.data_dir)), folder)
    assert [os.stat(os.path.join(again.data_dir, p)).st_mtime_ns for p in shards] == stamps

    copy = str(tmp_path / "copy")
    shutil.copytree(folder, copy, ignore=shutil.ignore_patterns("tfds"))
    data_dir = str(tmp_path / "tfds")
    tfds_severstal.load(data_dir, copy)
    os.remove(os.path.join(copy, "train_images", kaggle.list_images(os.path.join(copy, "train_images"))[-1]))
    with pytest.raises(ValueError, match="prepared from different data"):
        tfds_severstal.load(data_dir, copy)


# --- augmentation -------------------------------------------------------------------------------

def _sample(seed=0):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (256, 1600, 1), dtype=np.uint8)
    mask = np.zeros((256, 1600, 4), np.uint8)
    mask[200:230, 1500:1560, 2] = 1  # a small defect in a corner: a random crop mostly misses it
    return image, mask


def test_train_transform_shapes_dtypes_and_seed_determinism():
    transform = augment.train_transform((128, 256), mean=MEAN, std=STD)
    image, mask = _sample()
    out_image, out_mask = augment.apply(transform, image, mask, np.random.default_rng(5))
    assert out_image.shape == (128, 256, 1) and out_image.dtype == np.float32
    assert out_mask.shape == (128, 256, 4) and out_mask.dtype == np.float32
    assert set(np.unique(out_mask)) <= {0.0, 1.0}
    again = augment.apply(transform, image, mask, np.random.default_rng(5))
    np.testing.assert_array_equal(again[0], out_image)
    np.testing.assert_array_equal(again[1], out_mask)
    others = [augment.apply(transform, image, mask, np.random.default_rng(s))[0] for s in range(6, 10)]
    assert not all(np.array_equal(o, out_image) for o in others)


def test_crop_non_empty_contains_the_mask():
    image, mask = _sample()
    always = augment.train_transform((128, 256), mean=MEAN, std=STD, crop_nonempty_p=1.0)
    never = augment.train_transform((128, 256), mean=MEAN, std=STD, crop_nonempty_p=0.0)
    hits = [augment.apply(always, image, mask, np.random.default_rng(s))[1].sum() > 0 for s in range(30)]
    assert all(hits)
    misses = [augment.apply(never, image, mask, np.random.default_rng(s))[1].sum() == 0 for s in range(30)]
    assert any(misses)
    empty = np.zeros_like(mask)
    out = augment.apply(always, image, empty, np.random.default_rng(0))
    assert out[0].shape == (128, 256, 1) and out[1].sum() == 0


@pytest.mark.parametrize("flip, axis", [("hflip", 1), ("vflip", 0)])
def test_flips_move_image_and_mask_together(flip, axis):
    image, mask = _sample(1)
    off = augment.train_transform((128, 256), mean=MEAN, std=STD, crop_nonempty_p=1.0, hflip=0.0, vflip=0.0)
    on = augment.train_transform((128, 256), mean=MEAN, std=STD, crop_nonempty_p=1.0,
                                 **{"hflip": 0.0, "vflip": 0.0, flip: 1.0})
    for seed in range(3):
        base_image, base_mask = augment.apply(off, image, mask, np.random.default_rng(seed))
        flipped_image, flipped_mask = augment.apply(on, image, mask, np.random.default_rng(seed))
        assert base_mask.sum() > 0 and not np.array_equal(base_mask, flipped_mask)
        np.testing.assert_array_equal(flipped_image, np.flip(base_image, axis))
        np.testing.assert_array_equal(flipped_mask, np.flip(base_mask, axis))


def test_eval_transform_only_normalises():
    image, mask = _sample()
    out_image, out_mask = augment.apply(augment.eval_transform(mean=MEAN, std=STD), image, mask)
    np.testing.assert_allclose(out_image, (image / 255.0 - MEAN) / STD, atol=1e-4)
    np.testing.assert_array_equal(out_mask, mask)


# --- split --------------------------------------------------------------------------------------

def test_split_is_stratified_disjoint_and_seeded():
    sizes = {0: 470, 1: 400, 2: 110, 3: 20}
    annotations = {f"{c}_{i:04d}.jpg": c for c, n in sizes.items() for i in range(n)}
    train, val = pipeline.split_ids(annotations, 0.2, seed=4)
    assert not set(train) & set(val) and set(train) | set(val) == set(annotations)
    for c, n in sizes.items():
        assert sum(annotations[i] == c for i in val) == round(0.2 * n)
    assert pipeline.split_ids(annotations, 0.2, seed=4) == (train, val)
    assert pipeline.split_ids(annotations, 0.2, seed=5)[1] != val
    as_rles = {i: ["1 1"] * c + [""] * (4 - c) for i, c in annotations.items()}
    assert pipeline.split_ids(as_rles, 0.2, seed=4) == (train, val)
    with pytest.raises(ValueError, match="val_fraction"):
        pipeline.split_ids(annotations, 1.0, seed=0)


# --- loaders ------------------------------------------------------------------------------------

def test_train_batches_shapes(folder, builder):
    config = make_config(folder, builder)
    batch = next(iter(pipeline.train_loader(config, process_index=0, process_count=2, builder=builder)))
    assert set(batch) == {"image", "mask"}
    assert batch["image"].shape == (2, 128, 256, 1) and batch["image"].dtype == np.float32
    assert batch["mask"].shape == (2, 128, 256, 4) and batch["mask"].dtype == np.float32


def test_two_processes_read_disjoint_shards_reshuffled_each_epoch(folder, builder):
    config = identity_aug(make_config(folder, builder))
    train_ids, _ = pipeline.split_ids(pipeline.record_annotations(builder), 0.2, 0)
    refs = {i: normalised(folder, i) for i in train_ids}
    shards = []
    for p in range(2):
        loader = pipeline.train_loader(config, process_index=p, process_count=2, builder=builder)
        shard_size = len(train_ids) // 2
        iterator = iter(loader)
        ids = []
        while len(ids) < 2 * shard_size:
            ids += identify(next(iterator)["image"], refs)
        first, second = ids[:shard_size], ids[shard_size:2 * shard_size]
        assert len(set(first)) == shard_size and set(first) == set(second)  # one epoch = each once
        assert first != second  # reshuffled
        shards.append(set(first))
    assert not shards[0] & shards[1]


def test_resume_from_state_gives_the_identical_next_batch(folder, builder):
    config = make_config(folder, builder)
    iterator = iter(pipeline.train_loader(config, process_index=0, process_count=1, builder=builder))
    for _ in range(3):
        next(iterator)
    state = iterator.get_state()
    expected = [next(iterator) for _ in range(2)]
    resumed = iter(pipeline.train_loader(config, process_index=0, process_count=1, builder=builder,
                                         start_state=state))
    for want in expected:
        got = next(resumed)
        np.testing.assert_array_equal(got["image"], want["image"])
        np.testing.assert_array_equal(got["mask"], want["mask"])
    iterator.set_state(state)
    np.testing.assert_array_equal(next(iterator)["image"], expected[0]["image"])


@pytest.mark.slow
def test_worker_processes_resume_exactly(folder, builder):
    config = make_config(folder, builder, workers=1)
    iterator = iter(pipeline.train_loader(config, process_index=0, process_count=1, builder=builder))
    next(iterator)
    state = iterator.get_state()
    want = next(iterator)
    assert want["image"].shape == (4, 128, 256, 1) and want["mask"].shape == (4, 128, 256, 4)
    resumed = iter(pipeline.train_loader(config, process_index=0, process_count=1, builder=builder,
                                         start_state=state))
    got = next(resumed)
    np.testing.assert_array_equal(got["image"], want["image"])
    np.testing.assert_array_equal(got["mask"], want["mask"])
    del iterator, resumed


def test_val_batches_are_padded_with_zero_weight(folder, builder):
    config = make_config(folder, builder)
    _, val_ids = pipeline.split_ids(pipeline.record_annotations(builder), 0.2, 0)
    assert len(val_ids) == 5
    rows = []
    for p in range(2):
        batches = list(pipeline.val_batches(config, process_index=p, process_count=2, builder=builder))
        assert len(batches) == 2  # 5 images over 2 processes: 3 rows each after padding, batch 2
        for batch in batches:
            assert batch["image"].shape == (2, 256, 1600, 1) and batch["mask"].shape == (2, 256, 1600, 4)
            assert batch["weight"].shape == (2,) and batch["weight"].dtype == np.float32
            for image, mask, weight in zip(batch["image"], batch["mask"], batch["weight"]):
                if weight == 0:
                    assert not image.any() and not mask.any()
                else:
                    rows.append((image, mask))
    assert len(rows) == len(val_ids)
    annotations = kaggle.read_train_csv(os.path.join(folder, "train.csv"), os.path.join(folder, "train_images"))
    for (image, mask), image_id in zip(rows, val_ids):  # processes take contiguous slices, in order
        np.testing.assert_allclose(image, normalised(folder, image_id), atol=1e-4)
        np.testing.assert_array_equal(mask, kaggle.masks_from_rles(annotations[image_id]))


def test_pseudo_labels_fill_a_fixed_count_per_batch(folder, builder, tmp_path):
    pseudo_ids = kaggle.list_images(os.path.join(folder, "test_images"))
    truth = kaggle.read_submission(os.path.join(folder, "test_truth.csv"))
    pseudo_csv = str(tmp_path / "pseudo.csv")
    kaggle.write_submission(pseudo_csv, truth)
    config = identity_aug(make_config(folder, builder, pseudo_csv=pseudo_csv,
                                      pseudo_images=os.path.join(folder, "test_images"), pseudo_alpha=0.5))
    config.batch_size = 8
    _, want = sampling.samples_per_batch((19, len(pseudo_ids)), 8, 0.5)  # 19 labelled train images
    assert want >= 2
    iterator = iter(pipeline.train_loader(config, process_index=0, process_count=1, builder=builder))
    refs = {i: (kaggle.load_image(os.path.join(folder, "test_images", i)) / 255.0 - MEAN) / STD for i in pseudo_ids}
    for _ in range(2):
        images = next(iterator)["image"]
        n_pseudo = sum(any(np.allclose(im, ref, atol=1e-4) for ref in refs.values()) for im in images)
        assert n_pseudo == want


def test_prepare_data_generates_synthetic_or_explains_the_missing_folder(tmp_path):
    config = make_config(str(tmp_path / "absent"), type("B", (), {"data_dir": "/x/severstal/1.0.0"}))
    config.data.tfds_dir = ""
    with pytest.raises(FileNotFoundError, match="kaggle competitions download"):
        pipeline.prepare_data(config)
    config.data.dir = str(tmp_path / "quick")
    config.data.synthetic = ml_collections.ConfigDict(dict(n_train=6, n_test=2, seed=1))
    builder = pipeline.prepare_data(config)
    assert len(builder.as_data_source("train")) == 6
    assert builder.data_dir.startswith(str(tmp_path / "quick" / "tfds"))
