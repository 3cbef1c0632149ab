"""The unigram baseline: code frequencies counted over the whole cache and per class, and each sample's codes
drawn only from the codes its class used in train."""
import numpy as np

from pipelines.baseline import class_unigram_codes, code_counts_by_class, code_frequencies
from stage2_generator.cache_reader import CodeCache
from stage2_generator.cache_writer import CacheWriter, ShardContent, caption_table
from synthetic_cache import header_for, make_cache


def test_frequencies_count_every_code_of_every_sequence(tmp_path):
    truth = make_cache(tmp_path / "cache", num_images=30, images_per_shard=7, codebook_size=50, grid=(2, 3))
    cache = CodeCache(tmp_path / "cache")
    freq = code_frequencies(cache)
    expected = np.bincount(truth["codes"].ravel(), minlength=50) / truth["codes"].size
    np.testing.assert_allclose(freq, expected, rtol=0, atol=1e-15)
    by_class = code_counts_by_class(cache)
    assert by_class.shape == (3, 50)
    for c in range(3):
        np.testing.assert_array_equal(by_class[c], np.bincount(truth["codes"][truth["labels"] == c].ravel(),
                                                               minlength=50))


def cache_of_classes(path, codes_of_class: dict[int, list[int]], images_per_class: int = 4) -> None:
    """A one-shard cache whose class-c images use only the codes codes_of_class[c] (grid 2 x 3, K = 20)."""
    labels = np.repeat(sorted(codes_of_class), images_per_class)
    header = header_for(len(labels), len(labels), codebook_size=20, grid=(2, 3))
    rng = np.random.default_rng(0)
    codes = np.stack([rng.choice(codes_of_class[c], (2, 3)) for c in labels])
    ids, table = caption_table([f"image {i}" for i in range(len(labels))])
    writer = CacheWriter(path, header, overwrite=False)
    writer.prepare()
    writer.write_shard(0, ShardContent(codes=codes, labels=labels, image_index=np.arange(len(labels)),
                                       view=np.zeros(len(labels), np.int64), caption_ids=ids, captions=table,
                                       text_embeddings=None, image_range=(0, len(labels)), skipped=[]))
    writer.finish()


def test_each_sample_draws_only_the_codes_its_class_used_in_train(tmp_path):
    used = {0: [1, 2], 1: [7, 8, 9]}  # class 2 has no train sequences
    cache_of_classes(tmp_path / "cache", used)
    counts = code_counts_by_class(CodeCache(tmp_path / "cache"))
    labels = np.array([1, 0, 2, 1, 1, 0, 2, 1])
    codes, without_codes = class_unigram_codes(counts, labels, 6, seed=0)
    assert codes.shape == (8, 6) and without_codes == [2]
    for c, allowed in used.items():
        assert set(codes[labels == c].ravel().tolist()) <= set(allowed)
    assert set(codes[labels == 2].ravel().tolist()) <= set(used[0] + used[1])  # every class's codes instead
    again, _ = class_unigram_codes(counts, labels, 6, seed=0)
    assert (codes == again).all() and not (codes == class_unigram_codes(counts, labels, 6, seed=1)[0]).all()


def test_class_unigram_codes_follow_the_class_frequencies():
    counts = np.array([[5, 0, 3, 2], [0, 1, 0, 3]])
    labels = np.array([0, 1] * 2500)
    codes, _ = class_unigram_codes(counts, labels, 8, seed=0)
    for c in range(2):
        drawn = codes[labels == c].numpy().ravel()
        np.testing.assert_allclose(np.bincount(drawn, minlength=4) / drawn.size, counts[c] / counts[c].sum(),
                                   atol=0.01)
