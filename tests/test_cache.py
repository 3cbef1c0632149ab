"""The code-cache format alone (no tokenizer): shards read back exactly, the loader's order, resume and rank
sharding, refusal of a foreign cache, and the checks behind verify-cache."""
import json

import numpy as np
import pytest

from stage2_generator.cache_check import check_cache
from stage2_generator.cache_format import CacheError, code_dtype, manifest_header, write_manifest
from stage2_generator.cache_loader import CacheLoader
from stage2_generator.cache_reader import CodeCache, open_shard
from stage2_generator.cache_writer import CacheWriter, ShardContent, caption_table, token_feature_tensors
from stage2_generator.conditionings import TextTokens
from synthetic_cache import EMBED_DIM, FINGERPRINT, MAX_TOKENS, header_for, make_cache

# ---------------------------------------------------------------- format round trip ------------
def test_shards_read_back_exactly_by_random_access(tmp_path):
    truth = make_cache(tmp_path, num_images=11, images_per_shard=4, aug="flip", text=True, skipped=(5,))
    cache = CodeCache(tmp_path)
    assert len(cache) == 20 and len(cache.shards) == 3  # 11 images - 1 unreadable, 2 views each
    order = np.random.default_rng(1).permutation(len(cache))
    np.testing.assert_array_equal(cache.codes(order), truth["codes"][order])
    np.testing.assert_array_equal(cache.labels(order), truth["labels"][order])
    np.testing.assert_array_equal(cache.image_index(order), truth["image_index"][order])
    np.testing.assert_array_equal(cache.view(order), truth["view"][order])
    np.testing.assert_array_equal(cache.text_embeddings(order), truth["embeddings"][order])
    assert [cache.caption(int(i)) for i in order] == list(truth["captions"][order])
    assert 5 not in cache.image_index(range(len(cache)))
    batch = cache.batch(order[:7], text=True)
    assert batch.codes.dtype.is_floating_point is False and batch.codes.shape == (7, 6)
    np.testing.assert_array_equal(batch.codes.numpy(), truth["codes"][order[:7]])
    np.testing.assert_array_equal(batch.index.numpy(), order[:7])
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["totals"] == {"images": 10, "skipped": 1, "sequences": 20, "tokens": 120}
    assert [r["skipped"] for r in manifest["shards"]] == [[], [5], []]


def test_token_features_read_back_left_padded_with_their_masks(tmp_path):
    truth = make_cache(tmp_path, num_images=11, images_per_shard=4, aug="flip", text="tokens", skipped=(5,))
    cache = CodeCache(tmp_path)
    order = np.random.default_rng(2).permutation(len(cache))
    features, mask = cache.text_embeddings(order)
    assert features.shape == (len(cache), MAX_TOKENS, EMBED_DIM) and mask.dtype == bool
    np.testing.assert_array_equal(features, truth["embeddings"][order])  # exact: the values are float16's
    np.testing.assert_array_equal(mask, truth["masks"][order])
    assert mask[:, -1].all() and 0 < mask.sum() < mask.size  # every caption ends the prefix; some padding
    batch = cache.batch(order[:3], text=True)
    assert isinstance(batch.text_embeddings, TextTokens)
    np.testing.assert_array_equal(batch.text_embeddings.mask.numpy(), truth["masks"][order[:3]])
    # only the tokens are stored: the token table holds sum(lengths) rows
    shard = open_shard(tmp_path / "shards" / "00000.safetensors")
    assert shard["text_token_features"].dtype == np.float16 and "text_embeddings" not in shard
    lengths = np.diff(shard["text_token_offsets"])
    assert len(shard["text_token_features"]) == lengths.sum() < len(lengths) * MAX_TOKENS
    assert check_cache(tmp_path).problems == []


def test_the_writer_refuses_right_padded_or_empty_token_masks(tmp_path):
    features = np.ones((2, 3, 4), np.float32)
    with pytest.raises(ValueError, match="left-padded"):
        token_feature_tensors(features, np.array([[True, False, False], [True, True, True]]))
    with pytest.raises(ValueError, match="at least one"):
        token_feature_tensors(features, np.array([[False, False, False], [True, True, True]]))
    with pytest.raises(ValueError, match="float16"):
        token_feature_tensors(features * 1e6, np.ones((2, 3), bool))


def test_a_source_with_its_own_shards_gets_one_cache_shard_each(tmp_path):
    """WebDataset tars of 4, 0 (unreadable) and 3 images: three cache shards with those image ranges."""
    header = manifest_header(
        tokenizer_fingerprint=FINGERPRINT, tokenizer_path="/nowhere", downsample_factor=8, codebook_size=10,
        grid=(1, 2), resolution=8, augmentation="none", base_resolution=8,
        dataset={"source": "tars", "split": "train", "max_images": 0, "num_images": 7, "class_names": ["x"],
                 "caption_source": "webdataset"},
        text_encoder=None, images_per_shard=8192, batch_size=2, shard_boundaries=[0, 4, 4, 7])
    assert header["sharding"]["num_shards"] == 3
    writer = CacheWriter(tmp_path, header)
    assert writer.prepare() == [0, 1, 2]
    for s, (begin, end) in enumerate([(0, 4), (4, 4), (4, 7)]):
        images = np.arange(begin, end)
        ids, table = caption_table(["x"] * len(images))
        writer.write_shard(s, ShardContent(codes=np.zeros((len(images), 1, 2)), labels=np.zeros(len(images)),
                                           image_index=images, view=np.zeros(len(images)), caption_ids=ids,
                                           captions=table, text_embeddings=None, image_range=(begin, end)))
    writer.finish()
    assert check_cache(tmp_path).problems == [] and len(CodeCache(tmp_path)) == 7
    with pytest.raises(ValueError, match="rise from 0"):
        manifest_header(**{**dict(tokenizer_fingerprint=FINGERPRINT, tokenizer_path="/", downsample_factor=8,
                                  codebook_size=10, grid=(1, 2), resolution=8, augmentation="none",
                                  base_resolution=8, dataset=header["dataset"], text_encoder=None,
                                  images_per_shard=1, batch_size=1), "shard_boundaries": [0, 5, 4, 7]})


@pytest.mark.parametrize("k, dtype", [(65536, np.uint16), (65537, np.int32), (262144, np.int32)])
def test_codes_are_uint16_up_to_65536_entries_else_int32(tmp_path, k, dtype):
    assert code_dtype(k) == dtype
    truth = make_cache(tmp_path, num_images=5, codebook_size=k)
    cache = CodeCache(tmp_path)
    assert cache.shards[0]["codes"].dtype == dtype and cache.manifest["dtype"] == np.dtype(dtype).name
    np.testing.assert_array_equal(cache.codes(range(5)), truth["codes"])


def test_writer_refuses_a_code_outside_the_codebook(tmp_path):
    content = ShardContent(codes=np.full((1, 2, 2), 64), labels=np.zeros(1), image_index=np.zeros(1),
                           view=np.zeros(1), caption_ids=np.zeros(1), captions=["x"], text_embeddings=None,
                           image_range=(0, 1))
    with pytest.raises(ValueError, match=r"codes outside \[0, 64\)"):
        CacheWriter(tmp_path, header_for(1, 1, codebook_size=64)).write_shard(0, content)


def test_a_shard_whose_images_were_all_unreadable_is_empty_but_valid(tmp_path):
    make_cache(tmp_path, num_images=6, images_per_shard=3, skipped=(3, 4, 5))
    cache = CodeCache(tmp_path)
    assert len(cache) == 3 and cache.shards[1]["codes"].shape == (0, 6)
    assert check_cache(tmp_path).problems == []


# ---------------------------------------------------------------- refusals ---------------------
def test_cache_of_another_tokenizer_or_codebook_size_is_refused_naming_both(tmp_path):
    make_cache(tmp_path, codebook_size=1000)
    with pytest.raises(CacheError, match=r"codebook of size 1,000; the caller expects codebook size 4,096"):
        CodeCache(tmp_path, expect_codebook_size=4096)
    with pytest.raises(CacheError, match=rf"made by tokenizer {FINGERPRINT}; the caller expects tokenizer ffff"):
        CodeCache(tmp_path, expect_tokenizer="ffff")
    assert len(CodeCache(tmp_path, expect_codebook_size=1000, expect_tokenizer=FINGERPRINT)) == 10


def test_incomplete_or_unknown_caches_are_refused(tmp_path):
    CacheWriter(tmp_path / "partial", header_for(10, 4), overwrite=False).prepare()
    with pytest.raises(CacheError, match="incomplete .* re-run the same"):
        CodeCache(tmp_path / "partial")
    with pytest.raises(CacheError, match="manifest.json is missing"):
        CodeCache(tmp_path)
    make_cache(tmp_path / "future")
    manifest = json.loads((tmp_path / "future" / "manifest.json").read_text())
    write_manifest(tmp_path / "future", {**manifest, "format_version": 99})
    with pytest.raises(CacheError, match="format version 99"):
        CodeCache(tmp_path / "future")


def test_output_folder_holding_another_cache_is_refused_unless_overwrite(tmp_path):
    make_cache(tmp_path / "c", codebook_size=1000)
    (tmp_path / "c" / "notes.txt").write_text("mine")
    other = header_for(10, 4, codebook_size=4096)
    with pytest.raises(CacheError, match=r"(?s)codebook_size: the cache has 1000, this run has 4096.*overwrite=true"):
        CacheWriter(tmp_path / "c", other, overwrite=False).prepare()
    CacheWriter(tmp_path / "c", other, overwrite=True).prepare()
    assert not list((tmp_path / "c" / "shards").iterdir())
    assert json.loads((tmp_path / "c" / "manifest.json").read_text()) == other
    assert (tmp_path / "c" / "notes.txt").read_text() == "mine"  # only the cache's own files are removed
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "photo.png").write_bytes(b"x")
    with pytest.raises(CacheError, match="not empty and holds no cache manifest"):
        CacheWriter(tmp_path / "d", other, overwrite=False).prepare()


def test_same_cache_resumes_and_stale_temporary_files_are_removed(tmp_path):
    header = header_for(10, 4)
    CacheWriter(tmp_path, header, overwrite=False).prepare()
    stale = tmp_path / "shards" / ".00001.safetensors.abc.tmp"
    stale.write_bytes(b"half a shard")
    CacheWriter(tmp_path, {**header, "tokenizer": {**header["tokenizer"], "path": "/moved"}}, overwrite=False).prepare()
    assert not stale.exists()


# ---------------------------------------------------------------- the loader -------------------
def all_batches(loader):
    return [b for b in loader]


def test_loader_order_is_a_function_of_seed_and_epoch(tmp_path):
    truth = make_cache(tmp_path, num_images=23, images_per_shard=5)
    cache = CodeCache(tmp_path)
    a, b = CacheLoader(cache, 4, seed=7), CacheLoader(cache, 4, seed=7)
    for epoch in (0, 3):
        a.set_epoch(epoch), b.set_epoch(epoch)
        first, second = all_batches(a), all_batches(b)
        order = np.concatenate([x.index.numpy() for x in first])
        assert np.array_equal(order, np.concatenate([x.index.numpy() for x in second]))
        assert sorted(order) == list(range(23))  # every sequence once per epoch
        np.testing.assert_array_equal(np.concatenate([x.codes.numpy() for x in first]), truth["codes"][order])
        np.testing.assert_array_equal(np.concatenate([x.labels.numpy() for x in first]), truth["labels"][order])
    a.set_epoch(0)
    epoch0 = a.epoch_order()
    a.set_epoch(1)
    assert not np.array_equal(epoch0, a.epoch_order())
    assert not np.array_equal(epoch0, CacheLoader(cache, 4, seed=8).epoch_order())
    np.testing.assert_array_equal(CacheLoader(cache, 4, shuffle=False).epoch_order(), np.arange(23))


@pytest.mark.parametrize("new_batch_size", [5, 3])
def test_resumed_loader_yields_exactly_the_tail(tmp_path, new_batch_size):
    make_cache(tmp_path, num_images=23, images_per_shard=5, text=True)
    cache = CodeCache(tmp_path)
    straight = CacheLoader(cache, 5, seed=1, text=True)
    straight.set_epoch(2)
    full = all_batches(straight)
    interrupted = CacheLoader(cache, 5, seed=1, text=True)
    interrupted.set_epoch(2)
    consumed = [batch for _, batch in zip(range(2), interrupted)]
    state = json.loads(json.dumps(interrupted.state_dict()))  # survives a checkpoint as JSON
    assert state["position"] == 10 and state["epoch"] == 2
    resumed = CacheLoader(cache, new_batch_size, seed=1, text=True)
    resumed.load_state_dict(state)
    assert len(resumed) == -(-13 // new_batch_size)
    tail = all_batches(resumed)
    for name in ("index", "codes", "labels", "text_embeddings"):
        expected = np.concatenate([getattr(b, name).numpy() for b in full])
        got = np.concatenate([getattr(b, name).numpy() for b in consumed + tail])
        np.testing.assert_array_equal(got, expected)


def test_loader_state_of_another_setup_is_refused(tmp_path):
    make_cache(tmp_path, num_images=8)
    cache = CodeCache(tmp_path)
    state = CacheLoader(cache, 4, seed=1, world_size=2, rank=0).state_dict()
    with pytest.raises(CacheError, match=r"seed: saved 1, now 2; world_size: saved 2, now 1"):
        CacheLoader(cache, 4, seed=2).load_state_dict(state)


@pytest.mark.parametrize("n, world, drop_last", [(24, 3, False), (23, 3, False), (23, 3, True), (5, 4, False)])
def test_ranks_partition_the_epoch(tmp_path, n, world, drop_last):
    make_cache(tmp_path, num_images=n, images_per_shard=7)
    cache = CodeCache(tmp_path)
    loaders = [CacheLoader(cache, 4, seed=3, rank=r, world_size=world, drop_last=drop_last) for r in range(world)]
    for loader in loaders:
        loader.set_epoch(1)
    per_rank = [np.concatenate([b.index.numpy() for b in all_batches(loader)]) for loader in loaders]
    assert len({len(p) for p in per_rank}) == 1  # equal shares: every rank takes the same number of steps
    order = loaders[0].epoch_order()
    interleaved = np.stack(per_rank, axis=1).ravel()  # rank r holds positions r, r + world, ...
    np.testing.assert_array_equal(interleaved, order)
    if drop_last:
        assert len(interleaved) == n // world * world and len(set(interleaved)) == len(interleaved)
    else:
        assert set(interleaved) == set(range(n))  # everything, the first few repeated as padding
        np.testing.assert_array_equal(interleaved[n:], order[:len(interleaved) - n])


# ---------------------------------------------------------------- checks (verify-cache) ---------
def test_check_passes_a_good_cache_and_counts_the_codes(tmp_path):
    truth = make_cache(tmp_path, num_images=9, aug="tencrop", text=True, codebook_size=50)
    check = check_cache(tmp_path)
    assert check.problems == [] and check.sequences == 90 and check.shards == 3
    np.testing.assert_array_equal(check.code_counts, np.bincount(truth["codes"].ravel(), minlength=50))


def test_check_names_a_shard_with_a_flipped_byte(tmp_path):
    make_cache(tmp_path, num_images=12, images_per_shard=4)
    path = tmp_path / "shards" / "00001.safetensors"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # inside the tensors: the file still parses, its content differs
    path.write_bytes(bytes(data))
    problems = check_cache(tmp_path).problems
    assert problems[0].startswith("shards/00001.safetensors: sha256")
    assert all(p.startswith("shards/00001.safetensors: ") for p in problems)


def test_check_names_a_shard_holding_a_code_past_the_codebook(tmp_path):
    """A writer bug (a code >= K under a valid checksum) is caught by the range check, not the checksum."""
    make_cache(tmp_path, num_images=8, images_per_shard=4, codebook_size=100)
    cache = CodeCache(tmp_path)
    shard = {name: np.array(array) for name, array in cache.shards[1].items()}
    shard["codes"][3, 2] = 100
    manifest = cache.manifest
    content = ShardContent(codes=shard["codes"].reshape(-1, 2, 3), labels=shard["labels"],
                           image_index=shard["image_index"], view=shard["view"], caption_ids=shard["caption_ids"],
                           captions=["x"] * manifest["shards"][1]["captions"], text_embeddings=None, image_range=(4, 8))
    believes_101 = CacheWriter(tmp_path, {**manifest, "codebook_size": 101})  # the writer believes K = 101
    record = believes_101.write_shard(1, content)
    write_manifest(tmp_path, {**manifest, "shards": [manifest["shards"][0], record, *manifest["shards"][2:]]})
    problems = check_cache(tmp_path).problems
    assert problems == ["shards/00001.safetensors: 1 code(s) outside [0, 100), e.g. 100"]


def test_check_names_a_missing_or_truncated_shard(tmp_path):
    make_cache(tmp_path, num_images=12, images_per_shard=4)
    (tmp_path / "shards" / "00002.safetensors").unlink()
    path = tmp_path / "shards" / "00000.safetensors"
    path.write_bytes(path.read_bytes()[:-10])
    problems = check_cache(tmp_path).problems
    assert problems[0].startswith("shards/00000.safetensors: ") and "bytes, the manifest records" in problems[0]
    assert "shards/00002.safetensors: missing" in problems
    with pytest.raises(CacheError, match="00000.safetensors is .* bytes; the manifest records"):
        CodeCache(tmp_path)


def test_shards_are_standard_safetensors_files(tmp_path):
    from safetensors.numpy import load_file

    make_cache(tmp_path, num_images=6, images_per_shard=6, aug="flip", text=True)
    ours = CodeCache(tmp_path).shards[0]
    theirs = load_file(tmp_path / "shards" / "00000.safetensors")
    assert theirs.keys() == ours.keys()
    for name in ours:
        assert theirs[name].dtype == ours[name].dtype, name
        np.testing.assert_array_equal(theirs[name].reshape(ours[name].shape), ours[name])


def test_a_directory_of_another_kind_is_named_when_given_as_a_cache(tmp_path):
    from simvq_common.errors import ArtifactError
    from simvq_common.run_dir import RunDir

    make_cache(tmp_path / "cache")
    assert (tmp_path / "cache" / "kind.txt").read_text() == "code-cache\n"
    RunDir(tmp_path / "run", kind="tokenizer-run")
    with pytest.raises(ArtifactError, match=r"run is a tokenizer training run .*, not a code cache"):
        CodeCache(tmp_path / "run")
