"""Fixed-ratio batches drawn from two sources: labelled images and pseudo-labelled images.

Every batch holds the same number of pseudo-labelled images, so their share of the gradient is fixed
rather than left to chance (the original solution's trick; its write-up credits it for pseudo labels
helping where they hurt others).

Share. The weight of each non-empty source is ``alpha * uniform + (1 - alpha) * natural``; for two
sources that is ``w_pseudo = alpha / 2 + (1 - alpha) * n_p / (n_l + n_p)``. ``alpha`` may be negative
to under-sample the pseudo set: the original's -0.15 gives 0.0997 for 10,054 labelled + 1,801 pseudo.
Each source gets ``round(w * B)`` places per batch and the rounding remainder goes to the source with
the most places: B=18 -> 16 + 2, B=36 -> 32 + 4, B=32 -> 29 + 3. An epoch is ``(n_l + n_p) // B``
batches.

Order. Each source is an endless stream made of successive random permutations of its indices
("cycles"); batch ``s`` takes the consecutive slice ``[s*k, (s+1)*k)`` of a source's stream (k = its
places per batch) and the batch is then shuffled. A cycle's permutation is seeded by
``(seed, source, cycle)`` and the in-batch shuffle by ``(seed, step)``, so any step's batch is a pure
function of ``(seed, step)``: resuming at a step needs no stored sampler state. Every index of a source
appears once before any appears again. (The original instead reshuffled both sources at each epoch start
and re-read the head of the same permutation when a source wrapped within an epoch, so some labelled
images were seen twice in an epoch and others once; the shares are identical.)

Sharding. ``shard(step, shard_index, shard_count)`` gives process ``p`` of ``P`` the contiguous slice
``[p*B/P, (p+1)*B/P)`` of the shuffled global batch, so the union over processes is exactly the global
batch and its composition is preserved; a process then splits its slice over its local devices in order.
Because the global batch is shuffled before slicing, one process's pseudo count varies from step to step
while the global count is fixed. ``B`` must be divisible by ``P``.

grain. ``GrainFixedRatioSampler`` is a ``grain.python.Sampler`` over the concatenated source
``ConcatSource(labelled, pseudo)`` (record key = index for labelled, ``n_l + index`` for pseudo). It
yields the GLOBAL record stream (``step * B + slot``); ``grain.python.DataLoader``'s ``ShardOptions``
hands shard ``p`` the records ``p, p + P, p + 2P, ...`` of each batch (B/P of them, ``B % P == 0``), so
batching ``B / P`` records per process again gives a partition of the global batch. For the lazy
``grain.MapDataset`` API, ``fixed_ratio_dataset`` returns this process's records in batch order.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from typing import Any, Protocol, Sequence

import numpy as np

LABELLED = 0
PSEUDO = 1
_SHUFFLE_TAG = 2  # seed-sequence tag of the in-batch shuffle (sources use their own index as tag)
_RNG_TAG = 3  # seed-sequence tag of the per-record augmentation generators handed to grain


@dataclasses.dataclass(frozen=True)
class FixedRatioSampler:
    """Batches of ``batch_size`` (source, index) pairs with a fixed number from each source per batch.

    ``source`` is ``LABELLED`` (0) or ``PSEUDO`` (1); ``index`` counts within that source.
    """

    n_labelled: int
    n_pseudo: int
    batch_size: int
    alpha: float = -0.15
    seed: int = 0

    def __post_init__(self):
        for name in ("n_labelled", "n_pseudo", "batch_size", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise TypeError(f"FixedRatioSampler: {name} must be an int, got {value!r}")
        if self.n_labelled <= 0:
            raise ValueError(f"FixedRatioSampler: n_labelled must be > 0, got {self.n_labelled}")
        if self.n_pseudo < 0:
            raise ValueError(f"FixedRatioSampler: n_pseudo must be >= 0, got {self.n_pseudo}")
        if self.batch_size <= 0:
            raise ValueError(f"FixedRatioSampler: batch_size must be > 0, got {self.batch_size}")
        if self.seed < 0:
            raise ValueError(f"FixedRatioSampler: seed must be >= 0, got {self.seed}")
        counts = samples_per_batch((self.n_labelled, self.n_pseudo), self.batch_size, self.alpha)
        object.__setattr__(self, "_counts", counts)

    @property
    def counts(self) -> tuple[int, int]:
        """Places per batch: (labelled, pseudo)."""
        return self._counts

    @property
    def steps_per_epoch(self) -> int:
        """``(n_labelled + n_pseudo) // batch_size``, the original's epoch length (at least 1)."""
        return max((self.n_labelled + self.n_pseudo) // self.batch_size, 1)

    def batch_array(self, step: int) -> np.ndarray:
        """The global batch at ``step`` as int64 ``(batch_size, 2)`` rows of (source, index)."""
        if step < 0:
            raise ValueError(f"FixedRatioSampler: step must be >= 0, got {step}")
        parts = []
        for source, (count, size) in enumerate(zip(self._counts, (self.n_labelled, self.n_pseudo))):
            if count == 0:
                continue
            positions = np.arange(step * count, (step + 1) * count, dtype=np.int64)
            indices = _stream_indices(self.seed, source, size, positions)
            parts.append(np.stack([np.full(count, source, np.int64), indices], axis=1))
        batch = np.concatenate(parts, axis=0)
        order = np.random.default_rng([self.seed, _SHUFFLE_TAG, step]).permutation(self.batch_size)
        return batch[order]

    def batch_indices(self, step: int) -> list[tuple[int, int]]:
        """The global batch at ``step`` as a list of (source, index) pairs."""
        return [(int(s), int(i)) for s, i in self.batch_array(step)]

    def shard(self, step: int, shard_index: int, shard_count: int) -> np.ndarray:
        """Process ``shard_index``'s contiguous slice of the global batch at ``step``, ``(B/P, 2)``."""
        local = local_batch_size(self.batch_size, shard_index, shard_count)
        return self.batch_array(step)[shard_index * local:(shard_index + 1) * local]

    def record_keys(self, step: int) -> np.ndarray:
        """The global batch at ``step`` as keys into ``ConcatSource(labelled, pseudo)``."""
        batch = self.batch_array(step)
        return batch[:, 1] + np.where(batch[:, 0] == PSEUDO, self.n_labelled, 0)


def source_weights(sizes: Sequence[int], alpha: float) -> np.ndarray:
    """``alpha * uniform + (1 - alpha) * natural`` over the non-empty sources (empty ones weigh 0)."""
    sizes = np.asarray(sizes, dtype=np.float64)
    if sizes.ndim != 1 or sizes.size == 0 or (sizes < 0).any() or sizes.sum() == 0:
        raise ValueError(f"source sizes must be non-negative with a positive total, got {sizes.tolist()}")
    if not np.isfinite(alpha):
        raise ValueError(f"alpha must be finite, got {alpha!r}")
    nonempty = sizes > 0
    uniform = nonempty / nonempty.sum()
    weights = alpha * uniform + (1.0 - alpha) * sizes / sizes.sum()
    if (weights[nonempty] < 0).any() or (weights[nonempty] > 1).any():
        raise ValueError(
            f"alpha={alpha} gives source weights {weights.round(4).tolist()} for sizes "
            f"{sizes.astype(int).tolist()}: a weight outside [0, 1]; move alpha towards 0")
    return np.where(nonempty, weights, 0.0)


def samples_per_batch(sizes: Sequence[int], batch_size: int, alpha: float) -> tuple[int, ...]:
    """Places per batch for each source: ``round(w * B)``, the remainder to the source with most places.

    Raises when a non-empty source would get no place (it would silently never be sampled).
    """
    weights = source_weights(sizes, alpha)
    counts = np.round(weights * batch_size).astype(np.int64)
    counts[int(np.argmax(counts))] += batch_size - counts.sum()
    starved = [i for i, (n, c) in enumerate(zip(sizes, counts)) if n > 0 and c <= 0]
    if starved:
        raise ValueError(
            f"batch_size={batch_size}, alpha={alpha}, sizes={list(sizes)}: source(s) {starved} get "
            f"{counts.tolist()} places per batch, so they would never be sampled; raise the batch size "
            f"or alpha")
    return tuple(int(c) for c in counts)


def local_batch_size(batch_size: int, shard_index: int, shard_count: int) -> int:
    """``batch_size // shard_count`` after checking the shard arguments."""
    if shard_count <= 0 or not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index={shard_index} must lie in [0, shard_count={shard_count})")
    if batch_size % shard_count:
        raise ValueError(f"global batch_size={batch_size} is not divisible by shard_count={shard_count}")
    return batch_size // shard_count


class ConcatSource:
    """Random-access source over ``labelled`` then ``pseudo`` (key ``n_l + i`` is ``pseudo[i]``)."""

    def __init__(self, labelled: Any, pseudo: Any):
        self.labelled = labelled
        self.pseudo = pseudo
        self._n = len(labelled)

    def __len__(self) -> int:
        return self._n + len(self.pseudo)

    def __getitem__(self, key: int):
        key = int(key)
        if not 0 <= key < len(self):
            raise IndexError(f"ConcatSource: key {key} outside [0, {len(self)})")
        return self.labelled[key] if key < self._n else self.pseudo[key - self._n]

    def __repr__(self) -> str:
        return f"ConcatSource(labelled={self.labelled!r}, pseudo={self.pseudo!r})"


class GrainFixedRatioSampler:
    """``grain.python.Sampler`` yielding the global record stream of a ``FixedRatioSampler``.

    Record ``g`` is slot ``g % B`` of step ``g // B``; its key indexes ``ConcatSource(labelled, pseudo)``
    and its rng (for ``RandomMapTransform``s) is seeded by ``(seed, g)``. Pass the DataLoader
    ``ShardOptions(shard_index=p, shard_count=P)`` and batch ``B // P`` per process. ``num_steps``
    bounds the stream (``None``: practically endless). ``start_step`` skips whole batches (resume).
    """

    def __init__(self, sampler: FixedRatioSampler, num_steps: int | None = None, start_step: int = 0):
        if start_step < 0 or (num_steps is not None and num_steps < 0):
            raise ValueError(f"start_step={start_step} and num_steps={num_steps} must be >= 0")
        self.sampler = sampler
        self.num_steps = num_steps
        self.start_step = start_step

    def __len__(self) -> int:
        steps = self.num_steps if self.num_steps is not None else sys.maxsize // (4 * self.sampler.batch_size)
        return steps * self.sampler.batch_size

    def __getitem__(self, index: int):
        from grain import python as grain  # grain is a runtime dependency; imported where used

        if not 0 <= index < len(self):
            raise IndexError(f"GrainFixedRatioSampler: record {index} outside [0, {len(self)})")
        step, slot = divmod(int(index), self.sampler.batch_size)
        key = _cached_record_keys(self.sampler, self.start_step + step)[slot]
        record = self.start_step * self.sampler.batch_size + index
        rng = np.random.Generator(np.random.Philox(np.random.SeedSequence([self.sampler.seed, _RNG_TAG, record])))
        return grain.RecordMetadata(index=index, record_key=int(key), rng=rng)

    def __repr__(self) -> str:
        return (f"GrainFixedRatioSampler({self.sampler!r}, num_steps={self.num_steps}, "
                f"start_step={self.start_step})")


class _MapDatasetLike(Protocol):
    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Any: ...


def fixed_ratio_dataset(labelled: _MapDatasetLike, pseudo: _MapDatasetLike, sampler: FixedRatioSampler,
                        num_steps: int, shard_index: int = 0, shard_count: int = 1, start_step: int = 0):
    """A ``grain.MapDataset`` of this process's records for steps ``[start_step, start_step + num_steps)``.

    Element ``j`` is slot ``j % (B/P)`` of this process's contiguous slice of step ``start_step + j //
    (B/P)``; ``.batch(B // P)`` (drop_remainder) then yields exactly this process's part of each
    global batch. ``labelled`` / ``pseudo`` are random-access sources or ``MapDataset``s whose lengths
    must match the sampler's.
    """
    import grain

    if len(labelled) != sampler.n_labelled or len(pseudo) != sampler.n_pseudo:
        raise ValueError(f"sources have {len(labelled)} labelled / {len(pseudo)} pseudo records, the "
                         f"sampler expects {sampler.n_labelled} / {sampler.n_pseudo}")
    local = local_batch_size(sampler.batch_size, shard_index, shard_count)
    source = ConcatSource(labelled, pseudo)

    def key_of(j: int) -> int:
        step, slot = divmod(j, local)
        return int(_cached_record_keys(sampler, start_step + step)[shard_index * local + slot])

    return grain.MapDataset.range(num_steps * local).map(lambda j: source[key_of(j)])


@functools.lru_cache(maxsize=64)
def _cached_record_keys(sampler: FixedRatioSampler, step: int) -> np.ndarray:
    """Record keys of one step, cached: grain asks for a batch's records one at a time."""
    return sampler.record_keys(step)


@functools.lru_cache(maxsize=8)
def _permutation(seed: int, source: int, cycle: int, size: int) -> np.ndarray:
    """The ``cycle``-th shuffled order of a source's ``size`` indices."""
    return np.random.default_rng([seed, source, cycle]).permutation(size)


def _stream_indices(seed: int, source: int, size: int, positions: np.ndarray) -> np.ndarray:
    """Indices at ``positions`` of a source's endless stream of successive permutations."""
    cycles, offsets = np.divmod(positions, size)
    out = np.empty_like(positions)
    for cycle in np.unique(cycles):
        where = cycles == cycle
        out[where] = _permutation(seed, source, int(cycle), size)[offsets[where]]
    return out
