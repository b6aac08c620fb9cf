"""grain input pipeline: prepared TFDS records -> split -> per-process shuffled, augmented batches.

    prepare_data(config)            Kaggle folder (or a synthetic one made on the spot) -> TFDS builder
    split_ids(annotations, f, seed) stratified train/validation ids
    train_loader(config, ...)       infinite, sharded, shuffled, augmented per-process batches
    val_batches(config, ...)        full-size, normalised, zero-padded per-process batches

Every process reads only its shard of the records (``grain.ShardOptions``), so the global batch of
``config.batch_size`` is ``batch_size // process_count`` rows from each process. Records are decoded
one at a time from array_record files; nothing holds the data set in memory.

The seam for the issue-6 pseudo-label sampler is ``train_loader(..., sampling=...)``: a callable
``(labelled_source, shard_options, global_batch, seed) -> (source, sampler)`` returning any grain
random-access source whose records carry uint8 ``image`` (H, W, 1) and ``mask`` (H, W, 4), and a grain
``Sampler`` over it. grain's DataLoader asks the sampler for global index ``i * shard_count +
shard_index`` for this process's i-th record and batches ``global_batch // shard_count`` of them; the
sampler must give each ``RecordMetadata`` an ``rng`` so the augmentation stays reproducible, and a
stable ``__repr__`` (grain checks it on resume). :func:`default_sampling` is the plain shuffled
sampler; :func:`pseudo_sampling` mixes in pseudo-labelled images at a fixed count per batch
(``severjax.data.sampling``) and is used when ``config.data.pseudo_csv`` is set.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import grain
import jax
from absl import flags
import numpy as np

from severjax.config import KAGGLE_HINT
from severjax.data import augment, kaggle, tfds_severstal

# Per-worker read-ahead: decoded records are ~2 MB each (image + 4-channel mask), so grain's default of
# 500 buffered records per worker would hold ~1 GB; a few batches ahead keep the augmenting thread busy.
READ_THREADS = 4
READ_AHEAD_BATCHES = 2

Sampling = Callable[[Any, grain.sharding.ShardOptions, int, int], tuple[Any, Any]]


def prepare_data(config: Any):
    """Returns the prepared ``severstal`` TFDS builder for ``config.data.dir``.

    When ``config.data.synthetic`` is set and the folder has no ``train.csv``, the synthetic set is
    generated there first; a missing real-data folder is an error saying how to get the Kaggle data.
    The TFDS set is written once to ``config.data.tfds_dir`` (default ``<data.dir>/tfds``; set it when
    the data folder is read-only, as on Kaggle) and reused. A lock file there serialises processes that
    share the folder: the first prepares, the others wait and reuse.
    """
    folder = os.path.abspath(os.path.expanduser(config.data.dir))
    tfds_dir = os.path.expanduser(config.data.tfds_dir) if config.data.tfds_dir else os.path.join(folder, "tfds")
    synthetic = config.data.synthetic
    if synthetic is None and not os.path.isfile(os.path.join(folder, "train.csv")):
        raise FileNotFoundError(f"no Kaggle Severstal data at {folder} (no train.csv): {KAGGLE_HINT}")
    os.makedirs(tfds_dir, exist_ok=True)
    with open(os.path.join(tfds_dir, ".prepare.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not os.path.isfile(os.path.join(folder, "train.csv")):
                from severjax.data import synthetic as synthetic_lib  # only needed for the quickstart

                synthetic_lib.make_dataset(folder, int(synthetic.n_train), int(synthetic.n_test), int(synthetic.seed))
            return tfds_severstal.load(tfds_dir, folder)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def split_ids(annotations: Mapping[str, Any], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Splits image ids into (train, val), stratified by the number of defect classes per image.

    ``annotations`` maps image id to either its four RLE strings or its class count. In each stratum
    ``round(n * val_fraction)`` ids, drawn with ``seed``, go to validation. Both lists come back sorted.
    """
    if not 0.0 <= float(val_fraction) < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    strata: dict[int, list[str]] = {}
    for image_id in sorted(annotations):
        value = annotations[image_id]
        count = int(value) if isinstance(value, (int, np.integer)) else tfds_severstal.count_classes(value)
        strata.setdefault(count, []).append(image_id)
    rng = np.random.default_rng(seed)
    train, val = [], []
    for count in sorted(strata):
        ids = strata[count]
        order = rng.permutation(len(ids))
        n_val = int(round(len(ids) * float(val_fraction)))
        val.extend(ids[i] for i in order[:n_val])
        train.extend(ids[i] for i in order[n_val:])
    return sorted(train), sorted(val)


class TrainLoader:
    """Iterable over this process's training batches; each ``iter()`` starts at ``start_state``.

    The iterator (grain's) is infinite and yields {"image": float32 (b, h, w, 1), "mask": float32
    (b, h, w, 4)}; ``it.get_state()`` -> bytes and ``it.set_state(bytes)`` resume it exactly. The stream
    is a pure function of (seed, split, process index/count, ``config.data.workers``): grain hands
    records to workers round-robin and each batches its own, so resuming needs the same worker count
    (grain checks it, and the sampler and source, against the state).
    """

    def __init__(self, loader: grain.DataLoader, num_records: int, batch_size: int, start_state: bytes | None):
        self.loader = loader
        self.num_records = num_records  # training records over all processes
        self.batch_size = batch_size  # rows a batch on this process
        self.start_state = start_state

    def __iter__(self):
        iterator = iter(self.loader)
        if self.start_state is not None:
            iterator.set_state(self.start_state)
        return iterator


def train_loader(
    config: Any,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
    seed: int | None = None,
    start_state: bytes | None = None,
    builder: Any = None,
    sampling: Sampling | None = None,
) -> TrainLoader:
    """Returns this process's infinite, shuffled, augmented training batches (see :class:`TrainLoader`).

    ``process_index``/``process_count`` default to JAX's; ``seed`` to ``config.seed``; ``builder`` to
    :func:`prepare_data` (config); ``sampling`` to :func:`default_sampling`. The shuffle is reshuffled
    every epoch and each record's augmentation draws from the rng grain derives from (seed, index).
    """
    index, count = _process(process_index, process_count)
    batch = _per_process(config.batch_size, count, "batch_size")
    seed = int(config.seed if seed is None else seed)
    if not 0 <= seed < 2**32:
        raise ValueError(f"the train seed must be in [0, 2**32), got {seed}")
    builder = prepare_data(config) if builder is None else builder
    train, _ = _split(config, builder)
    labelled = RecordSubset(builder.as_data_source("train"), _record_indices(builder, train), "train")
    shard = grain.sharding.ShardOptions(shard_index=index, shard_count=count, drop_remainder=True)
    if int(config.data.workers) > 0:
        _absl_flags_parsed()
    if sampling is None:
        sampling = pseudo_sampling(config) if config.data.pseudo_csv else default_sampling
    source, sampler = sampling(labelled, shard, int(config.batch_size), seed)
    loader = grain.DataLoader(
        data_source=source,
        sampler=sampler,
        operations=[_Augment(config), grain.transforms.Batch(batch_size=batch, drop_remainder=True)],
        worker_count=int(config.data.workers),
        shard_options=shard,
        read_options=_read_options(batch),
    )
    return TrainLoader(loader, num_records=len(source), batch_size=batch, start_state=start_state)


def default_sampling(source: Any, shard: grain.sharding.ShardOptions, batch: int, seed: int) -> tuple[Any, Any]:
    """The labelled source alone, shuffled anew each epoch, endless; ``batch`` is unused here.

    grain's ``IndexSampler`` gives process p the contiguous p-th of the records for good
    (``drop_remainder``: every process the same count, the few left over are never read), reshuffles
    them each epoch and seeds record i's augmentation rng with seed + i.
    """
    del batch
    return source, grain.samplers.IndexSampler(
        num_records=len(source), shard_options=shard, shuffle=True, num_epochs=None, seed=seed)


def pseudo_sampling(config: Any) -> Sampling:
    """Fixed-ratio mixing of the labelled records with the pseudo-labelled images of
    ``config.data.pseudo_csv`` (a submission CSV, either layout) found in ``config.data.pseudo_images``:
    every global batch holds the same number of each (``config.data.pseudo_alpha``; see
    ``severjax.data.sampling``). The pseudo images are read straight from the folder, not via TFDS.
    """
    from severjax.data import sampling as sampling_lib

    if not config.data.pseudo_images:
        raise ValueError(f"config.data.pseudo_csv={config.data.pseudo_csv!r} needs config.data.pseudo_images, "
                         "the folder holding its images")
    pseudo = KaggleFolderSource(os.path.expanduser(config.data.pseudo_csv),
                                os.path.expanduser(config.data.pseudo_images))
    alpha = float(config.data.pseudo_alpha)

    def sampling(labelled: Any, shard: grain.sharding.ShardOptions, batch: int, seed: int) -> tuple[Any, Any]:
        del shard  # grain's DataLoader shards the sampler's global record stream
        fixed = sampling_lib.FixedRatioSampler(len(labelled), len(pseudo), batch, alpha, seed)
        return sampling_lib.ConcatSource(labelled, pseudo), sampling_lib.GrainFixedRatioSampler(fixed)

    return sampling


class KaggleFolderSource:
    """Records {"image", "mask", "image_id"} read from a Kaggle CSV (either layout) and an image folder.

    Random access, decoding one JPEG at a time; every image the CSV names must be in the folder.
    """

    def __init__(self, csv_path: str, image_dir: str):
        self.csv_path, self.image_dir = csv_path, image_dir
        annotations = kaggle.read_submission(csv_path)
        on_disk = set(kaggle.list_images(image_dir))
        missing = sorted(set(annotations) - on_disk)
        if missing:
            raise FileNotFoundError(f"{csv_path}: {len(missing)} image(s) it names are not in {image_dir}: "
                                    f"{', '.join(missing[:5])}")
        self.ids = sorted(annotations)
        self.rles = [annotations[i] for i in self.ids]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        image_id = self.ids[int(i)]
        return {"image": kaggle.load_image(os.path.join(self.image_dir, image_id)),
                "mask": kaggle.masks_from_rles(self.rles[int(i)]), "image_id": image_id}

    def __repr__(self) -> str:
        digest = hashlib.sha256("\n".join(self.ids).encode()).hexdigest()[:12]
        return f"KaggleFolderSource({os.path.basename(self.csv_path)}, n={len(self.ids)}, ids={digest})"


def val_batches(
    config: Any,
    *,
    process_index: int | None = None,
    process_count: int | None = None,
    builder: Any = None,
) -> Iterator[dict[str, np.ndarray]]:
    """Yields this process's validation batches: full 256x1600 images, normalised only.

    Each batch is {"image": (b, 256, 1600, 1), "mask": (b, 256, 1600, 4), "weight": (b,)} float32 with
    b = ``eval_batch_size // process_count``; the validation ids are split evenly over processes and
    padded with zero rows of weight 0 so that every batch has the same shape and every process yields
    the same number of batches (a pmapped eval step compiles once and never waits on a missing host).
    """
    index, count = _process(process_index, process_count)
    batch = _per_process(config.eval_batch_size, count, "eval_batch_size")
    builder = prepare_data(config) if builder is None else builder
    _, val = _split(config, builder)
    if not val:
        raise ValueError(f"no validation images (val_fraction={config.data.val_fraction}, limit_val="
                         f"{config.data.limit_val})")
    indices = _record_indices(builder, val)
    start, stop = len(indices) * index // count, len(indices) * (index + 1) // count
    per_process = -(-len(indices) // count)
    n_rows = -(-per_process // batch) * batch
    source = _Padded(RecordSubset(builder.as_data_source("train"), indices[start:stop], "val"), n_rows)
    loader = grain.DataLoader(
        data_source=source,
        sampler=grain.samplers.SequentialSampler(n_rows, grain.sharding.NoSharding()),
        operations=[_Normalize(config), grain.transforms.Batch(batch_size=batch, drop_remainder=False)],
        worker_count=0,  # decoding runs in grain's read threads; normalising is cheap
        shard_options=grain.sharding.NoSharding(),
        read_options=_read_options(batch),
    )
    yield from loader


def record_annotations(builder: Any) -> dict[str, int]:
    """{image_id: number of defect classes} of the prepared set, from its metadata (no decoding)."""
    metadata = builder.info.metadata
    return dict(zip(metadata["image_ids"], (int(n) for n in metadata["n_classes"])))


class RecordSubset:
    """The records of the TFDS ``source`` at ``indices``, decoded (``tfds_severstal.decode_record``), as
    a grain random-access source.

    Its ``repr`` names the subset by a digest of its indices, so grain rejects resuming a loader
    state on a different split.
    """

    def __init__(self, source: Any, indices: Sequence[int], name: str):
        self.source = source
        self.indices = np.asarray(indices, dtype=np.int64)
        self.name = name

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return tfds_severstal.decode_record(self.source[int(self.indices[i])])

    def __repr__(self) -> str:
        digest = hashlib.sha256(self.indices.tobytes()).hexdigest()[:12]
        return f"RecordSubset({self.name}, n={len(self.indices)}, indices={digest})"


class _Padded:
    """``source`` followed by empty placeholder records up to ``length`` rows."""

    def __init__(self, source: RecordSubset, length: int):
        self.source, self.length = source, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.source[i] if i < len(self.source) else {"padding": True}

    def __repr__(self) -> str:
        return f"Padded({self.source!r}, length={self.length})"


class _Augment(grain.transforms.RandomMap):
    """Decoded record -> augmented float32 crop; randomness only from grain's per-record rng."""

    def __init__(self, config: Any):
        self.kwargs = augment.train_kwargs(config)
        self._transform = None

    def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
        if self._transform is None:  # built lazily: once per worker process
            self._transform = augment.train_transform(**self.kwargs)
        image, mask = augment.apply(self._transform, element["image"], element["mask"], rng)
        return {"image": image, "mask": mask}


class _Normalize(grain.transforms.Map):
    """Decoded record (or padding placeholder) -> normalised full image, mask and weight."""

    def __init__(self, config: Any):
        self.mean, self.std = float(config.data.mean), float(config.data.std)
        self.shape = tuple(int(v) for v in config.data.image_shape)
        self._transform = None

    def map(self, element: dict[str, Any]) -> dict[str, np.ndarray]:
        height, width = self.shape
        if element.get("padding"):
            return {"image": np.zeros((height, width, 1), np.float32),
                    "mask": np.zeros((height, width, kaggle.NUM_CLASSES), np.float32),
                    "weight": np.float32(0.0)}
        if self._transform is None:
            self._transform = augment.eval_transform(mean=self.mean, std=self.std)
        image, mask = augment.apply(self._transform, element["image"], element["mask"])
        return {"image": image, "mask": mask, "weight": np.float32(1.0)}


def _split(config: Any, builder: Any) -> tuple[list[str], list[str]]:
    train, val = split_ids(record_annotations(builder), config.data.val_fraction, config.data.split_seed)
    if config.data.limit_train:
        train = train[: int(config.data.limit_train)]
    if config.data.limit_val:
        val = val[: int(config.data.limit_val)]
    if not train:
        raise ValueError(f"no training images in {config.data.dir} after the split and limit_train")
    return train, val


def _record_indices(builder: Any, ids: Sequence[str]) -> np.ndarray:
    position = {image_id: i for i, image_id in enumerate(builder.info.metadata["image_ids"])}
    return np.asarray([position[i] for i in ids], dtype=np.int64)


def _absl_flags_parsed() -> None:
    """grain 0.2.18's worker pool reads an absl flag without a default fallback; outside ``absl.app``
    (scripts, notebooks, pytest) nobody parsed flags, so mark them parsed with their defaults."""
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _read_options(batch: int) -> grain.ReadOptions:
    return grain.ReadOptions(num_threads=READ_THREADS,
                             prefetch_buffer_size=max(READ_THREADS, READ_AHEAD_BATCHES * batch))


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    index = jax.process_index() if process_index is None else int(process_index)
    count = jax.process_count() if process_count is None else int(process_count)
    if not 0 <= index < count:
        raise ValueError(f"process_index {index} is outside [0, process_count={count})")
    return index, count


def _per_process(global_batch: int, count: int, name: str) -> int:
    if global_batch % count:
        raise ValueError(f"config.{name}={global_batch} is not divisible by the {count} processes")
    return global_batch // count
