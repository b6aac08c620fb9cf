"""Fixed-ratio labelled/pseudo batch sampler: the original's shares, order, determinism, sharding, grain."""

from __future__ import annotations

import numpy as np
import pytest

from severjax.data import sampling
from severjax.data.sampling import LABELLED, PSEUDO, FixedRatioSampler


@pytest.mark.parametrize("batch_size, labelled, pseudo", [(18, 16, 2), (36, 32, 4), (32, 29, 3)])
def test_original_splits(batch_size, labelled, pseudo):
    sampler = FixedRatioSampler(10_054, 1_801, batch_size, alpha=-0.15, seed=1)
    assert sampler.counts == (labelled, pseudo)
    assert sampler.steps_per_epoch == 11_855 // batch_size
    for step in (0, 1, 657, 5_000):
        sources = sampler.batch_array(step)[:, 0]
        assert (sources == PSEUDO).sum() == pseudo and (sources == LABELLED).sum() == labelled


def test_original_weights():
    np.testing.assert_allclose(sampling.source_weights((10_054, 1_801), -0.15), [0.9003, 0.0997], atol=1e-4)


def test_each_index_once_before_any_repeats():
    # 49 labelled at 7 per batch, 11 pseudo at 1 per batch: cycles line up with batches
    sampler = FixedRatioSampler(49, 11, 8, alpha=0.0, seed=3)
    assert sampler.counts == (7, 1)
    batches = [sampler.batch_array(s) for s in range(33)]
    labelled = np.concatenate([b[b[:, 0] == LABELLED, 1] for b in batches])
    pseudo = np.concatenate([b[b[:, 0] == PSEUDO, 1] for b in batches])
    for stream, n in ((labelled, 49), (pseudo, 11)):
        for cycle in range(len(stream) // n):
            assert sorted(stream[cycle * n:(cycle + 1) * n]) == list(range(n))
    assert not np.array_equal(labelled[:49], labelled[49:98])  # a new cycle is a new order


def test_counts_stay_balanced_when_cycles_straddle_batches():
    sampler = FixedRatioSampler(50, 11, 8, alpha=0.0, seed=3)
    k_l, k_p = sampler.counts
    for steps in (1, 7, 8, 23, 40):
        rows = np.concatenate([sampler.batch_array(s) for s in range(steps)])
        for source, n, k in ((LABELLED, 50, k_l), (PSEUDO, 11, k_p)):
            seen = np.bincount(rows[rows[:, 0] == source, 1], minlength=n)
            assert seen.sum() == steps * k and seen.max() - seen.min() <= 1


def test_deterministic_and_seeded():
    a = FixedRatioSampler(100, 20, 12, seed=7)
    b = FixedRatioSampler(100, 20, 12, seed=7)
    c = FixedRatioSampler(100, 20, 12, seed=8)
    for step in (0, 3, 99):
        assert a.batch_indices(step) == b.batch_indices(step)
    assert any(a.batch_indices(s) != c.batch_indices(s) for s in range(3))
    # a pure function of the step: asking out of order changes nothing (exact resume)
    later = a.batch_indices(41)
    [a.batch_indices(s) for s in range(5)]
    assert a.batch_indices(41) == later


def test_batch_is_shuffled_within():
    sampler = FixedRatioSampler(1_000, 200, 16, alpha=1.0, seed=0)
    firsts = {tuple(sampler.batch_array(s)[:8, 0]) for s in range(20)}
    assert len(firsts) > 1  # the pseudo places move around the batch


@pytest.mark.parametrize("shard_count", [1, 2, 3, 6])
def test_shards_partition_the_global_batch(shard_count):
    sampler = FixedRatioSampler(300, 40, 18, seed=5)
    for step in (0, 7, 123):
        parts = [sampler.shard(step, p, shard_count) for p in range(shard_count)]
        assert all(len(p) == 18 // shard_count for p in parts)
        np.testing.assert_array_equal(np.concatenate(parts), sampler.batch_array(step))


def test_alpha_edges():
    natural = FixedRatioSampler(300, 100, 8, alpha=0.0)
    assert natural.counts == (6, 2)  # 3:1, as the sizes
    uniform = FixedRatioSampler(300, 100, 8, alpha=1.0)
    assert uniform.counts == (4, 4)


def test_no_pseudo_degenerates_to_plain_batches():
    sampler = FixedRatioSampler(40, 0, 8, alpha=-0.15, seed=2)
    assert sampler.counts == (8, 0)
    assert sampler.steps_per_epoch == 5
    epoch = np.concatenate([sampler.batch_array(s) for s in range(5)])
    assert (epoch[:, 0] == LABELLED).all()
    assert sorted(epoch[:, 1]) == list(range(40))


def test_record_keys_index_the_concatenation():
    sampler = FixedRatioSampler(30, 10, 8, alpha=0.5, seed=4)
    batch, keys = sampler.batch_array(2), sampler.record_keys(2)
    source = sampling.ConcatSource([("l", i) for i in range(30)], [("p", i) for i in range(10)])
    assert [source[k] for k in keys] == [("lp"[s], i) for s, i in batch]


@pytest.mark.parametrize("kwargs, match", [
    (dict(n_labelled=0, n_pseudo=5, batch_size=4), "n_labelled"),
    (dict(n_labelled=10, n_pseudo=-1, batch_size=4), "n_pseudo"),
    (dict(n_labelled=10, n_pseudo=5, batch_size=0), "batch_size"),
    (dict(n_labelled=10, n_pseudo=5, batch_size=4, seed=-1), "seed"),
    (dict(n_labelled=10, n_pseudo=5, batch_size=4, alpha=5.0), "outside"),
    (dict(n_labelled=10_000, n_pseudo=10, batch_size=4, alpha=0.0), "never be sampled"),
    (dict(n_labelled=10_000, n_pseudo=10, batch_size=4, alpha=-0.15), "outside"),
    (dict(n_labelled=10.0, n_pseudo=5, batch_size=4), "int"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        FixedRatioSampler(**kwargs)


def test_bad_shards_and_steps():
    sampler = FixedRatioSampler(100, 20, 18)
    with pytest.raises(ValueError, match="divisible"):
        sampler.shard(0, 0, 4)
    with pytest.raises(ValueError, match="shard_index"):
        sampler.shard(0, 3, 3)
    with pytest.raises(ValueError, match="step"):
        sampler.batch_array(-1)


def _sources():
    labelled = [{"id": np.int64(i), "pseudo": np.int64(0)} for i in range(30)]
    pseudo = [{"id": np.int64(i), "pseudo": np.int64(1)} for i in range(7)]
    return labelled, pseudo


def _as_rows(batch):
    return [(int(s), int(i)) for s, i in zip(batch["pseudo"], batch["id"])]


def test_grain_dataloader_shards_union_is_global_batch():
    grain = pytest.importorskip("grain.python")
    labelled, pseudo = _sources()
    sampler = FixedRatioSampler(30, 7, 6, alpha=0.0, seed=9)
    shard_count, steps = 2, 4
    per_process = []
    for p in range(shard_count):
        loader = grain.DataLoader(
            data_source=sampling.ConcatSource(labelled, pseudo),
            sampler=sampling.GrainFixedRatioSampler(sampler, num_steps=steps),
            operations=[grain.Batch(6 // shard_count, drop_remainder=True)],
            shard_options=grain.ShardOptions(shard_index=p, shard_count=shard_count),
            worker_count=0)
        per_process.append([_as_rows(b) for b in loader])
    assert all(len(batches) == steps for batches in per_process)
    for step in range(steps):
        union = sorted(sum((batches[step] for batches in per_process), []))
        assert union == sorted(sampler.batch_indices(step))


def test_grain_sampler_resume_and_bounds():
    pytest.importorskip("grain.python")
    sampler = FixedRatioSampler(30, 7, 6, seed=9)
    full = sampling.GrainFixedRatioSampler(sampler, num_steps=5)
    resumed = sampling.GrainFixedRatioSampler(sampler, num_steps=3, start_step=2)
    assert len(full) == 30 and len(resumed) == 18
    for j in range(18):
        a, b = full[12 + j], resumed[j]
        assert a.record_key == b.record_key
        assert a.rng.integers(1 << 30) == b.rng.integers(1 << 30)
    with pytest.raises(IndexError):
        full[30]


def test_fixed_ratio_map_dataset_per_process():
    pytest.importorskip("grain")
    labelled, pseudo = _sources()
    sampler = FixedRatioSampler(30, 7, 6, alpha=0.0, seed=9)
    for p in range(3):
        ds = sampling.fixed_ratio_dataset(labelled, pseudo, sampler, num_steps=3, shard_index=p,
                                          shard_count=3, start_step=1).batch(2, drop_remainder=True)
        for j, batch in enumerate(ds):
            assert _as_rows(batch) == [tuple(r) for r in sampler.shard(1 + j, p, 3).tolist()]
