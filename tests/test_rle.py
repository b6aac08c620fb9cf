import numpy as np
import pytest

from severjax.data.rle import format_runs, masks_to_rles, rle_decode, rle_dice, rle_encode, runs_to_rles


def test_known_example():
    mask = np.zeros((256, 1600), bool)
    mask[0, 0] = mask[1, 0] = mask[0, 1] = True
    assert rle_encode(mask) == "1 2 257 1"
    np.testing.assert_array_equal(rle_decode("1 2 257 1"), mask)


def test_empty_and_full():
    assert rle_encode(np.zeros((4, 5), bool)) == ""
    assert not rle_decode("", (4, 5)).any()
    assert rle_encode(np.ones((4, 5), bool)) == "1 20"
    assert rle_decode("1 20", (4, 5)).all()


@pytest.mark.parametrize("density", [0.001, 0.1, 0.5, 0.99])
def test_random_round_trip(density):
    rng = np.random.default_rng(int(density * 1000))
    mask = rng.random((256, 1600)) < density
    out = rle_decode(rle_encode(mask))
    assert out.dtype == bool and out.shape == (256, 1600)
    np.testing.assert_array_equal(out, mask)


def test_adjacent_runs_and_other_shape():
    # Adjacent runs are legal (another writer may not merge them) and decode to one block.
    np.testing.assert_array_equal(rle_decode("1 2 3 1", (2, 2)), np.array([[1, 1], [1, 0]], bool))
    mask = np.random.default_rng(1).random((7, 3)) < 0.5
    np.testing.assert_array_equal(rle_decode(rle_encode(mask), (7, 3)), mask)


@pytest.mark.parametrize(
    "rle, message",
    [
        ("1 2 3", "odd count"),
        ("0 2", "starts at 0"),
        ("-3 2", "starts at -3"),
        ("1 0", "length 0"),
        ("409599 3", "past the end"),
        ("5 2 6 1", "overlaps"),
        ("5 2 1 1", "out of order"),
        ("1 2 x 4", "non-numeric"),
        ("1.5 2", "non-numeric"),
    ],
)
def test_malformed_raises(rle, message):
    with pytest.raises(ValueError, match=message):
        rle_decode(rle)


@pytest.mark.parametrize("high", [10, 1000, 409_601, 10**7, 10**12])
def test_format_runs_matches_str(high):
    rng = np.random.default_rng(high % 97)
    values = rng.integers(0, high, 600)
    values[:3] = [0, high - 1, 10 ** (len(str(high)) - 1)]
    counts = [0, 3, 0, 300, 297, 0]
    bounds = np.cumsum([0] + counts)
    assert format_runs(values, counts) == [" ".join(map(str, values[a:b].tolist()))
                                           for a, b in zip(bounds[:-1], bounds[1:])]


def test_format_runs_edges():
    assert format_runs(np.zeros(0, np.int64), [0, 0]) == ["", ""]
    assert format_runs(np.array([7], np.uint8), [1]) == ["7"]
    with pytest.raises(ValueError, match="add up"):
        format_runs(np.arange(4), [3])
    with pytest.raises(ValueError, match="non-negative"):
        format_runs(np.array([1, -2]), [2])


def test_masks_to_rles_and_runs_to_rles_agree_with_rle_encode():
    rng = np.random.default_rng(2)
    masks = rng.random((3, 7, 5, 4)) < 0.4
    masks[1, ..., 2] = False  # an empty mask
    want = [[rle_encode(masks[b, :, :, c]) for c in range(4)] for b in range(3)]
    assert masks_to_rles(masks) == want == masks_to_rles(masks, masks.sum(axis=(1, 2)))
    # The same masks as vertical runs (one key a mask, column-major 0-indexed pixels), split at column ends.
    key, start, end = [], [], []
    for b in range(3):
        for c in range(4):
            column_major = masks[b, :, :, c].T.reshape(-1)
            for col in range(5):
                column = column_major[col * 7:(col + 1) * 7]
                edges = np.flatnonzero(np.diff(np.concatenate([[0], column, [0]]).astype(int)))
                for top, bottom in zip(edges[0::2], edges[1::2]):
                    key.append(b * 4 + c)
                    start.append(col * 7 + top)
                    end.append(col * 7 + bottom)
    texts = runs_to_rles(np.array(key), np.array(start), np.array(end), 12)
    assert [texts[b * 4:(b + 1) * 4] for b in range(3)] == want
    assert runs_to_rles(np.zeros(0, int), np.zeros(0, int), np.zeros(0, int), 2) == ["", ""]


def test_rle_dice():
    shape = (4, 5)
    assert rle_dice("", "", shape) == 1.0
    assert rle_dice("1 3", "", shape) == 0.0 and rle_dice("", "1 3", shape) == 0.0
    assert rle_dice("1 4", "3 4", shape) == pytest.approx(2 * 2 / 8)
