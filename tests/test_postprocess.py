"""Post-processing: the jit pipeline equals the plain numpy/scipy reference mask for mask."""

import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from severjax.data.rle import masks_to_rles, rle_encode
from severjax.predict.components import component_sizes, label_components, remove_small_components
from severjax.predict.postprocess import (PostprocessConfig, finish_rles, gated_min_area, postprocess,
                                          postprocess_for_rle, reference_postprocess)


def smooth_probs(seed, shape=(3, 40, 64, 4), sigma=2.5):
    """Blobby random probability maps (noise blurred, stretched to [0, 1]): components of many sizes."""
    rng = np.random.default_rng(seed)
    x = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=(0, sigma, sigma, 0))
    x /= x.std()
    return (1.0 / (1.0 + np.exp(-2.0 * x))).astype(np.float32)


CONFIGS = {
    "default-scaled": PostprocessConfig(min_area=(60, 60, 100, 200)),
    "thresholds": PostprocessConfig(thresholds=(0.3, 0.55, 0.7, 0.45), min_area=(0, 50, 10, 300)),
    "components8": PostprocessConfig(thresholds=(0.5, 0.4, 0.6, 0.5), min_area=(30, 30, 30, 30), min_component=25),
    "components4": PostprocessConfig(min_area=(0, 0, 0, 0), min_component=12, connectivity=4),
    "dilate3": PostprocessConfig(min_area=(40, 40, 40, 40), dilate=3),
    "dilate5-components": PostprocessConfig(thresholds=(0.6,) * 4, min_area=(10, 10, 10, 10), min_component=8,
                                            dilate=5),
    "all-classes": PostprocessConfig(thresholds=(0.4,) * 4, min_area=(20, 20, 20, 20), one_class_per_pixel=False),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_matches_reference(name):
    config = CONFIGS[name]
    for seed in range(2):
        probs = smooth_probs(seed)
        got = np.asarray(postprocess(jnp.asarray(probs), config))
        want = reference_postprocess(probs, config)
        assert got.dtype == bool and got.shape == probs.shape
        np.testing.assert_array_equal(got, want)
        assert want.any() and not want.all(), "the case must exercise both outcomes"


@pytest.mark.parametrize("c_factor", [1.0, 5.0, 3.5])
def test_gating_matches_reference(c_factor):
    probs = smooth_probs(7, shape=(4, 40, 64, 4))
    class_probs = np.random.default_rng(3).random((4, 4)).astype(np.float32)
    config = PostprocessConfig(min_area=(100, 150, 200, 250), c_factor=c_factor, min_component=5)
    got = np.asarray(postprocess(probs, config, class_probs=class_probs))
    np.testing.assert_array_equal(got, reference_postprocess(probs, config, class_probs))
    # Gating only ever wipes more than the plain minimum area (p <= 1).
    plain = reference_postprocess(probs, config)
    assert not (got & ~plain).any()


def test_gated_min_area_example_from_the_write_up():
    got = np.asarray(gated_min_area((600, 600, 1000, 2000), np.array([[0.2, 0.5, 0.5, 0.8]]), 5))
    np.testing.assert_allclose(got, [[2520, 1800, 3000, 3600]], rtol=1e-6)


def test_one_class_per_pixel_and_min_area_edges():
    probs = np.zeros((1, 4, 5, 4), np.float32)
    probs[0, :2, :, 0] = 0.9  # class 1: 10 pixels
    probs[0, :2, :, 2] = 0.95  # class 3 more probable on the same pixels
    probs[0, 2:, :, 1] = 0.6  # class 2: 10 pixels alone
    probs[0, 3, :, 3] = 0.6  # class 4 ties class 2 on row 3: the lower class wins
    out = np.asarray(postprocess(probs, PostprocessConfig(min_area=(1, 10, 10, 1))))
    assert not out[..., 0].any() and not out[..., 3].any()
    assert out[0, :2, :, 2].all() and out[..., 2].sum() == 10
    assert out[..., 1].sum() == 10  # exactly min_area pixels: kept
    out = np.asarray(postprocess(probs, PostprocessConfig(min_area=(1, 11, 10, 1))))
    assert not out[..., 1].any()  # one pixel short: wiped


def test_component_sizes_match_scipy_label():
    rng = np.random.default_rng(0)
    for connectivity, structure in ((8, np.ones((3, 3))), (4, None)):
        for shape in ((2, 3, 31, 45),):  # odd sizes exercise the 2x2-block padding
            planes = rng.random(shape) < 0.45
            got = np.asarray(component_sizes(jnp.asarray(planes), connectivity))
            labels = np.asarray(label_components(jnp.asarray(planes), connectivity))
            for idx in np.ndindex(shape[:2]):
                ref, _ = ndimage.label(planes[idx], structure=structure)
                np.testing.assert_array_equal(got[idx], np.where(ref > 0, np.bincount(ref.ravel())[ref], 0))
                # Same partition: the pairs (ours, scipy's) are a bijection on the foreground.
                pairs = set(zip(labels[idx][ref > 0].tolist(), ref[ref > 0].tolist()))
                assert len(pairs) == len({a for a, _ in pairs}) == len({b for _, b in pairs}) == ref.max()


@pytest.mark.parametrize("connectivity", [4, 8])
def test_component_removal_methods_agree(connectivity):
    """Host runs (CPU default), plane by plane and all planes at once (accelerator default): same masks."""
    masks = jnp.asarray(smooth_probs(5, shape=(2, 30, 44, 4), sigma=1.5) > 0.6)
    masks = masks.at[1, :, :, 2].set(False)  # an empty plane: skipped by the per-plane path
    masks = masks.at[0, :, :, 3].set(True)  # a full one
    got = {m: np.asarray(remove_small_components(masks, 9, connectivity, m)) for m in ("host", "per_plane", "all")}
    np.testing.assert_array_equal(got["host"], got["per_plane"])
    np.testing.assert_array_equal(got["host"], got["all"])
    assert 0 < got["host"].sum() < np.asarray(masks).sum()
    with pytest.raises(ValueError, match="unknown component method"):
        remove_small_components(masks, 9, connectivity, "cv2")


def test_long_snake_component():
    """A one-pixel-wide serpentine is one component however long: the loop must run to convergence."""
    planes = np.zeros((1, 1, 33, 64), bool)
    planes[0, 0, ::2, :] = True
    for r in range(1, 33, 2):
        planes[0, 0, r, 63 if (r // 2) % 2 == 0 else 0] = True
    sizes = np.asarray(component_sizes(jnp.asarray(planes), 4))
    assert (sizes[planes] == planes.sum()).all()


def rles_of(masks):
    return [[rle_encode(m[:, :, c]) for c in range(m.shape[-1])] for m in masks]


@pytest.mark.parametrize("on_host", [True, False], ids=["host-components", "device-components"])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_submission_path_matches_reference(name, on_host):
    """postprocess_for_rle + finish_rles: the reference's masks, their areas and their RLE."""
    config = CONFIGS[name]
    for seed in range(2):
        probs = smooth_probs(seed)
        want = reference_postprocess(probs, config)
        runs = postprocess_for_rle(jnp.asarray(probs), config, components_on_host=on_host)
        assert runs.min_component == (config.min_component if on_host and config.dilate <= 1 else 0)
        rles, areas, masks = finish_rles(runs, keep_masks=True)
        np.testing.assert_array_equal(masks, want)
        np.testing.assert_array_equal(areas, want.sum(axis=(1, 2)))
        assert rles == rles_of(want)
        assert finish_rles(runs).masks is None


@pytest.mark.parametrize("on_host", [True, False])
def test_submission_path_gating(on_host):
    probs = smooth_probs(7, shape=(4, 40, 64, 4))
    class_probs = np.random.default_rng(3).random((4, 4)).astype(np.float32)
    config = PostprocessConfig(min_area=(100, 150, 200, 250), c_factor=3.5, min_component=5)
    want = reference_postprocess(probs, config, class_probs)
    rles, areas, _ = finish_rles(postprocess_for_rle(probs, config, class_probs, components_on_host=on_host))
    assert rles == rles_of(want) and any(r for row in rles for r in row) and any(not r for row in rles for r in row)
    np.testing.assert_array_equal(areas, want.sum(axis=(1, 2)))


@pytest.mark.parametrize("connectivity", [4, 8])
def test_host_components_corners_and_snakes(connectivity):
    """Runs join across columns by overlap (4) or overlap and corners (8); a serpentine is one component."""
    plane = np.zeros((33, 64), bool)
    plane[::2, :] = True
    for r in range(1, 33, 2):
        plane[r, 63 if (r // 2) % 2 == 0 else 0] = True
    corners = np.zeros((33, 64), bool)
    corners[np.arange(10), np.arange(10)] = True  # a diagonal: 10 pixels (8) or 10 singles (4)
    corners[20:23, 20] = corners[23:26, 21] = True  # vertical runs meeting at a corner only
    corners[0, 63] = corners[32, 0] = True  # single pixels at the plane's corners
    probs = np.zeros((2, 33, 64, 4), np.float32)
    probs[0, ..., 1] = 0.9 * plane
    probs[1, ..., 2] = 0.9 * corners
    probs[1, 30:, 40:, 3] = 0.8  # a second class beside, untouched
    for size in (2, 4, 7, int(plane.sum()), int(plane.sum()) + 1):
        config = PostprocessConfig(min_area=(0, 0, 0, 0), min_component=size, connectivity=connectivity)
        want = reference_postprocess(probs, config)
        rles, areas, masks = finish_rles(postprocess_for_rle(probs, config, components_on_host=True), True)
        np.testing.assert_array_equal(masks, want)
        assert rles == rles_of(want)


def test_submission_path_full_size_and_empty_batches():
    probs = smooth_probs(11, shape=(2, 256, 1600, 4), sigma=20)
    probs[..., 1] *= 0.4  # class 2 never passes: empty masks too
    config = PostprocessConfig()
    masks = np.asarray(postprocess(probs, config))
    rles, areas, _ = finish_rles(postprocess_for_rle(probs, config))
    np.testing.assert_array_equal(areas, masks.sum(axis=(1, 2)))
    assert any(r for row in rles for r in row) and any(not r for row in rles for r in row)
    assert rles == rles_of(masks) == masks_to_rles(masks, areas)
    for batch in (np.zeros((0, 8, 6, 4), np.float32), np.zeros((3, 8, 6, 4), np.float32)):
        rles, areas, masks = finish_rles(postprocess_for_rle(batch, PostprocessConfig(min_component=3)), True)
        assert rles == [[""] * 4] * len(batch) and areas.shape == (len(batch), 4) and not masks.any()


@pytest.mark.parametrize("kwargs, match", [
    (dict(thresholds=(0.5, 0.5)), "one value a class"),
    (dict(thresholds=(1.5, 0.5, 0.5, 0.5)), r"\[0, 1\]"),
    (dict(min_area=(-1, 0, 0, 0)), ">= 0"),
    (dict(dilate=4), "odd"),
    (dict(connectivity=6), "4 or 8"),
    (dict(c_factor=0.5), ">= 1"),
])
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PostprocessConfig(**kwargs)


def test_shape_errors():
    with pytest.raises(ValueError, match=r"\(B, H, W, 4\)"):
        postprocess(np.zeros((1, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match="classifier probabilities"):
        postprocess(np.zeros((2, 8, 8, 4), np.float32), class_probs=np.zeros((2, 3), np.float32))
