"""Pre-tokenization of captioned data: the emoji written as a metadata.jsonl folder and as WebDataset tars give
the bundled set's codes and captions; a tar's damaged member and a missing caption are skipped and counted;
two processes read disjoint tars and write what one writes; a run killed mid-tar resumes to the same bytes;
token features of a text encoder made here are cached, left-padded, exactly as it encodes them."""
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from test_pretokenize import cache_bytes, config, tokenizer_dir  # noqa: F401 - tokenizer_dir is a fixture
from text_encoders import tiny_t5_dir

from pipelines.pretokenize import pretokenize
from pipelines.text import TextEncoder
from simvq_common import distributed
from image_data.captioned_folder import write_captioned_folder
from image_data.emoji import EmojiDataset
from image_data.webdataset import write_webdataset
from stage2_generator.cache_check import check_cache
from stage2_generator.cache_reader import CodeCache

REPO = Path(__file__).resolve().parents[1]
N = 48  # the first 48 emoji of the train split, at 16 px (the tokenizer's resolution in these tests)
PER_TAR = 12


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    root = tmp_path_factory.mktemp("emoji_layouts")
    emoji = EmojiDataset("train", 16)
    return {"jsonl": write_captioned_folder(emoji, root / "jsonl", "jsonl", indices=range(N)),
            "sidecar": write_captioned_folder(emoji, root / "sidecar", "sidecar", indices=range(N)),
            "tars": write_webdataset(emoji, root / "tars", PER_TAR, indices=range(N))}


def rows(cache: CodeCache) -> tuple[np.ndarray, list[str]]:
    return cache.codes(np.arange(len(cache))), [cache.caption(i) for i in range(len(cache))]


@pytest.mark.parametrize("layout", ["jsonl", "sidecar", "tars"])
def test_a_captioned_copy_of_the_emoji_gives_the_bundled_sets_cache(tmp_path, tokenizer_dir, layouts, layout,
                                                                     one_thread):
    common = ["aug=flip", f"images_per_shard={PER_TAR}", "batch_size=5"]
    pretokenize(config(tokenizer_dir, tmp_path / "bundled", f"max_images={N}", *common))
    pretokenize(config(tokenizer_dir, tmp_path / layout, f"data={layouts[layout]}", *common))
    bundled, copy = CodeCache(tmp_path / "bundled"), CodeCache(tmp_path / layout)
    codes, captions = rows(bundled)
    copy_codes, copy_captions = rows(copy)
    np.testing.assert_array_equal(copy_codes, codes)
    assert copy_captions == captions and captions[0] == EmojiDataset("train", 16).captions[0]
    assert len(copy) == 2 * N and check_cache(tmp_path / layout).problems == []
    source = {"jsonl": "metadata.jsonl", "sidecar": ".txt sidecars", "tars": "webdataset"}[layout]
    assert copy.manifest["dataset"]["caption_source"] == source
    if layout == "tars":  # one cache shard per tar
        assert copy.manifest["sharding"]["boundaries"] == list(range(0, N + 1, PER_TAR))


def damaged_tars(root: Path) -> Path:
    """Three tars of 12 emoji: in the first, sample 3's caption is gone; the second is cut inside sample 20's
    image; the third is intact."""
    emoji = EmojiDataset("train", 16)
    tars = write_webdataset(emoji, root / "tars", PER_TAR, indices=range(36))
    first = tars / "00000.tar"
    with tarfile.open(first) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers() if m.name != "00000003.txt"]
    with tarfile.open(first, "w", format=tarfile.PAX_FORMAT) as tar:
        for member, data in members:
            tar.addfile(member, io.BytesIO(data))
    second = tars / "00001.tar"
    with tarfile.open(second) as tar:
        image = tar.getmember("00000020.png")
    data = second.read_bytes()
    second.write_bytes(data[:image.offset_data + image.size // 2])
    return tars


def test_a_missing_caption_and_a_truncated_member_are_skipped_and_counted(tmp_path, tokenizer_dir, one_thread):
    tars = damaged_tars(tmp_path)
    with pytest.warns(UserWarning):
        pretokenize(config(tokenizer_dir, tmp_path / "cache", f"data={tars}", "text_embeddings=true",
                           "batch_size=5"))
    cache = CodeCache(tmp_path / "cache")
    # tar 1 keeps samples 12..19 (the cut one and those after it are gone); sample 3 has no caption
    assert cache.manifest["sharding"]["boundaries"] == [0, 12, 20, 32]
    images = cache.image_index(np.arange(len(cache)))
    assert 3 not in images and len(images) == 31
    assert cache.manifest["totals"] == {"images": 31, "skipped": 1, "sequences": 31, "tokens": 31 * 64}
    assert [r["skipped"] for r in cache.manifest["shards"]] == [[3], [], []]
    emoji = EmojiDataset("train", 16)
    keys = [*range(3), *range(4, 20), *range(24, 36)]  # the samples that survive, by their emoji index
    assert [cache.caption(i) for i in range(len(cache))] == [emoji.captions[k] for k in keys]
    assert check_cache(tmp_path / "cache").problems == []


def _worker(rank, world, port, tokenizer_dir, data, out, opened):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import nccl_rules

    import image_data.webdataset as webdataset
    nccl_rules.install()
    scan = webdataset.scan_tar

    def recording_scan(path):
        with open(Path(opened) / f"rank{rank}.txt", "a") as log:
            log.write(f"{Path(path).name}\n")
        return scan(path)

    webdataset.scan_tar = recording_scan
    try:
        pretokenize(config(tokenizer_dir, out, f"data={data}", "aug=flip", "batch_size=5", "num_workers=0"))
    finally:
        distributed.shutdown()


def test_two_processes_read_disjoint_tars_and_write_what_one_writes(tmp_path, tokenizer_dir, layouts, one_thread):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp_path / "opened").mkdir()
    mp.start_processes(_worker, args=(2, port, str(tokenizer_dir), str(layouts["tars"]), str(tmp_path / "two"),
                                      str(tmp_path / "opened")), nprocs=2, start_method="spawn", join=True)
    pretokenize(config(tokenizer_dir, tmp_path / "one", f"data={layouts['tars']}", "aug=flip", "batch_size=5"))
    assert cache_bytes(tmp_path / "two") == cache_bytes(tmp_path / "one")
    opened = [set((tmp_path / "opened" / f"rank{r}.txt").read_text().split()) for r in (0, 1)]
    assert opened[0].isdisjoint(opened[1]) and opened[0] | opened[1] == {f"0000{t}.tar" for t in range(4)}


def test_a_run_killed_mid_tar_resumes_to_the_bytes_of_an_uninterrupted_one(tmp_path, tokenizer_dir, one_thread):
    emoji = EmojiDataset("train", 16)
    tars = write_webdataset(emoji, tmp_path / "tars", 64, indices=range(640))  # 10 tars
    args = ["--tokenizer", str(tokenizer_dir), "--out", str(tmp_path / "killed"), "--data", str(tars),
            "--aug", "flip", "resolution=16", "batch_size=16", "num_workers=1"]
    command = [sys.executable, "-m", "pipelines.cli", "pretokenize", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first_record = tmp_path / "killed" / "shards" / "00000.json"
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    deadline = time.monotonic() + 120
    while not first_record.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    os.killpg(process.pid, signal.SIGKILL)  # inside the second tar: its shard is not complete
    process.wait()
    done = len(list((tmp_path / "killed" / "shards").glob("*.json")))
    assert 1 <= done < 10, f"the kill landed after {done} of 10 tars: nothing to resume"
    assert subprocess.run(command, cwd=REPO, env=env, capture_output=True).returncode == 0
    pretokenize(config(tokenizer_dir, tmp_path / "straight", f"data={tars}", "aug=flip", "batch_size=16"))
    assert cache_bytes(tmp_path / "killed") == cache_bytes(tmp_path / "straight")
    runs = json.loads((tmp_path / "killed" / "provenance.json").read_text())["runs"]
    assert len(runs) == 1 and runs[0]["shards_already_complete"] == done


def test_token_features_are_cached_as_the_encoder_gives_them(tmp_path, tokenizer_dir, layouts, one_thread):
    encoder_dir = tiny_t5_dir(tmp_path / "t5")
    pretokenize(config(tokenizer_dir, tmp_path / "cache", f"data={layouts['tars']}", "aug=flip",
                       "text_embeddings=true", f"text.name={encoder_dir}", "text.max_tokens=24",
                       "text.batch_size=7"))
    cache = CodeCache(tmp_path / "cache")
    info = TextEncoder(str(encoder_dir), max_tokens=24).info
    assert cache.text_encoder == info and info["features"] == "tokens" and info["dim"] == 16
    captions = [cache.caption(i) for i in range(len(cache))]
    want = TextEncoder(str(encoder_dir), max_tokens=24, batch_size=100).encode(captions)
    features, mask = cache.text_embeddings(np.arange(len(cache)))
    np.testing.assert_array_equal(mask, want.mask)
    np.testing.assert_allclose(features, want.features.astype(np.float16).astype(np.float32), rtol=0, atol=1e-6)
    lengths = mask.sum(1)
    assert lengths.max() == 24 and lengths.min() < 24  # long names are cut, short ones padded
    assert check_cache(tmp_path / "cache").problems == []
