"""The unigram baseline: code frequencies counted over the whole cache, and codes drawn from them."""
import numpy as np

from pipelines.baseline import code_frequencies, unigram_codes
from stage2_generator.cache_reader import CodeCache
from synthetic_cache import make_cache


def test_frequencies_count_every_code_of_every_sequence(tmp_path):
    truth = make_cache(tmp_path / "cache", num_images=30, images_per_shard=7, codebook_size=50, grid=(2, 3))
    freq = code_frequencies(CodeCache(tmp_path / "cache"))
    expected = np.bincount(truth["codes"].ravel(), minlength=50) / truth["codes"].size
    np.testing.assert_allclose(freq, expected, rtol=0, atol=1e-15)


def test_unigram_codes_follow_the_frequencies_and_never_draw_unused_codes():
    freq = np.array([0.5, 0.0, 0.3, 0.2])
    codes = unigram_codes(freq, 5000, 8, seed=0)
    assert codes.shape == (5000, 8) and not (codes == 1).any()
    np.testing.assert_allclose(np.bincount(codes.numpy().ravel(), minlength=4) / codes.numel(), freq, atol=0.01)
    assert (unigram_codes(freq, 10, 8, seed=0) == unigram_codes(freq, 10, 8, seed=0)).all()
