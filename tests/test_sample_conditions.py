"""The class plan of `simvq sample` and `simvq run`: class_order interleaves counts exactly (round robin when
they are equal), and largest_remainder allocates a reference's class histogram to N samples (hand-checked)."""
import numpy as np
import pytest

from pipelines.conditions import class_order, largest_remainder

EMOJI_VAL = [8, 15, 27, 14, 26, 226, 17, 22, 22]  # the bundled emoji's val split, 377 images


def test_class_order_interleaves_each_class_count_times():
    assert class_order([2, 2, 2]).tolist() == [0, 1, 2, 0, 1, 2]  # equal counts: round robin
    # class c's k-th sample at (k + 1/2) / count, ties to the lower class: 1/6 (1), 1/2 (0), 1/2 (1), 5/6 (1)
    assert class_order([1, 3]).tolist() == [1, 0, 1, 1]
    assert class_order([2, 0, 1]).tolist() == [0, 2, 0]
    order = class_order(EMOJI_VAL)
    assert order.dtype == np.int64 and np.bincount(order).tolist() == EMOJI_VAL
    for prefix in (10, 50, 100, 200):  # any prefix is close to the mix: within 1.5 samples of each class's share
        share = np.array(EMOJI_VAL) * prefix / sum(EMOJI_VAL)
        assert np.abs(np.bincount(order[:prefix], minlength=9) - share).max() < 1.5


def test_largest_remainder_gives_the_reference_counts_at_its_size_and_sums_to_n_otherwise():
    assert largest_remainder(EMOJI_VAL, 377) == EMOJI_VAL
    # N = 100: floors of 100 c / 377 sum to 94; the 6 left go to the largest remainders (in 377ths):
    # 369 (class 1), 357 (5), 338 (4), 315 (7), 315 (8), 269 (3); not to 192 (6), 61 (2), 46 (0)
    assert largest_remainder(EMOJI_VAL, 100) == [2, 4, 7, 4, 7, 60, 4, 6, 6]
    assert largest_remainder(EMOJI_VAL, 754) == [2 * c for c in EMOJI_VAL]
    assert largest_remainder([1, 1, 1], 2) == [1, 1, 0]  # a tie goes to the lower class id
    assert largest_remainder([0, 5, 0], 7) == [0, 7, 0]  # a class the reference lacks gets none
    assert largest_remainder(EMOJI_VAL, 0) == [0] * 9
    for n in (1, 8, 377, 1000, 50_000):
        got = largest_remainder(EMOJI_VAL, n)
        assert sum(got) == n and all(abs(g - n * c / 377) < 1 for g, c in zip(got, EMOJI_VAL))
    with pytest.raises(ValueError, match="positive sum"):
        largest_remainder([0, 0], 4)
