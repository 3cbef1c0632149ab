"""scripts/package_ready_made.py: model directories packaged in their storage load with the fingerprints their
cards give, generators record the packaged tokenizer's, a packaged tokenizer is kept as it is, and a generator
trained over another tokenizer or a budget overrun is refused."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from simvq_common.config import load_config
from simvq_common.ready_made import READY_MADE
from stage1_tokenizer.tokenizer import Tokenizer
from stage2_generator.config import SamplingConfig
from stage2_generator.model import Generator
from test_sample import random_generator
from tiny_models import tiny_tokenizer

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "package_ready_made.py"


def package(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    tokenizer = tiny_tokenizer(0)
    tokenizer.save_pretrained(root / "tokenizer")
    (root / "tokenizer" / "eval.json").write_text(json.dumps({"rfid": 12.5, "psnr": 20.25}))
    for name, conditioning, kw in [("class", "class", {}), ("text", "text", {"text_dim": 384})]:
        random_generator(conditioning, tokenizer, root / "tokenizer", **kw).save_pretrained(root / name)
    tiny_tokenizer(1).save_pretrained(root / "other_tokenizer")
    random_generator("class", tiny_tokenizer(1), root / "other_tokenizer").save_pretrained(root / "foreign")
    (root / "metrics.json").write_text(json.dumps({"fid": 99.125}))
    return root


def test_models_are_stored_as_asked_and_load_with_the_fingerprints_their_cards_give(sources, tmp_path):
    out = tmp_path / "models"
    done = package("--tokenizer", sources / "tokenizer", "--class-generator", sources / "class", "--text-generator",
                   sources / "text", "--class-metrics", sources / "metrics.json", "--storage", "emoji-class=int8",
                   "fp16", "--class-sampling", "guidance_scale=2.5", "--retrain", "emoji-class=make it",
                   "emoji-class=then this", "--card-note", "emoji-class=int8 moves FID by 0.3", "--out", out)
    assert done.returncode == 0, done.stderr
    tokenizer = Tokenizer.from_pretrained(out / READY_MADE["emoji-tokenizer"])
    stored = {name: load_file(str(out / READY_MADE[name] / "model.safetensors"))
              for name in ("emoji-tokenizer", "emoji-class", "emoji-text")}
    assert any(k.endswith(":int8") for k in stored["emoji-class"])
    assert not any(k.endswith(":int8") for k in stored["emoji-text"])
    assert {t.dtype.itemsize for t in stored["emoji-text"].values() if t.is_floating_point()} == {2}  # fp16
    for name in ("emoji-class", "emoji-text"):
        folder = out / READY_MADE[name]
        generator = Generator.from_pretrained(folder)
        card = (folder / "README.md").read_text()
        assert generator.fingerprint() == (folder / "fingerprint.txt").read_text().strip()
        assert generator.fingerprint() in card
        assert generator.config.tokenizer_path == "emoji-tokenizer"
        assert generator.config.tokenizer_fingerprint == tokenizer.fingerprint()
    card = (out / READY_MADE["emoji-class"] / "README.md").read_text()
    assert "FID 99.12" in card and "make it" in card and "weights stored in int8" in card
    assert "- int8 moves FID by 0.3" in card and "make it\nthen this\n" in card
    assert load_config(SamplingConfig, out / READY_MADE["emoji-class"] / "sampling.yaml").guidance_scale == 2.5
    assert "rFID 12.50" in (out / READY_MADE["emoji-tokenizer"] / "README.md").read_text()

    # the packaged tokenizer given as the source is kept as it is (its card too), and a generator re-packaged
    (out / READY_MADE["emoji-tokenizer"] / "README.md").write_text("kept")
    weights = (out / READY_MADE["emoji-class"] / "model.safetensors").read_bytes()
    again = package("--tokenizer", out / READY_MADE["emoji-tokenizer"], "--class-generator",
                    out / READY_MADE["emoji-class"], "--storage", "int8", "--out", out)
    assert again.returncode == 0, again.stderr
    assert (out / READY_MADE["emoji-tokenizer"] / "README.md").read_text() == "kept"
    assert (out / READY_MADE["emoji-class"] / "model.safetensors").read_bytes() == weights  # int8 again: the same file
    assert Generator.from_pretrained(out / READY_MADE["emoji-class"]).config.tokenizer_fingerprint == \
        tokenizer.fingerprint()


def test_a_generator_trained_over_another_tokenizer_is_refused_before_anything_is_written(sources, tmp_path):
    done = package("--tokenizer", sources / "tokenizer", "--class-generator", sources / "foreign", "--out", tmp_path)
    assert done.returncode != 0 and "trained over tokenizer" in done.stderr
    assert Tokenizer.from_pretrained(sources / "other_tokenizer").fingerprint() in done.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_new_tokenizer_under_packaged_generators_is_refused(sources, tmp_path):
    assert package("--tokenizer", sources / "tokenizer", "--class-generator", sources / "class", "--out",
                   tmp_path).returncode == 0
    before = (tmp_path / READY_MADE["emoji-tokenizer"] / "fingerprint.txt").read_text()
    done = package("--tokenizer", sources / "other_tokenizer", "--out", tmp_path)
    assert done.returncode != 0 and f"{READY_MADE['emoji-class']} records tokenizer" in done.stderr
    assert "--class-generator" in done.stderr
    assert (tmp_path / READY_MADE["emoji-tokenizer"] / "fingerprint.txt").read_text() == before


@pytest.mark.parametrize("args, message", [(["--storage", "int4"], "give a storage"),
                                           (["--storage", "emoji-cat=fp16"], "NAME one of"),
                                           (["--card-note", "emoji-cat=a line"], "NAME one of"),
                                           (["--retrain", "a command"], "give NAME=VALUE"),
                                           (["--class-generator", "emoji-cat"], "no such model directory"),
                                           (["--class-metrics", "nowhere.json"], "no such file"),
                                           (["--max-mib", "0.001"], "over the 0.001 MiB budget")])
def test_bad_storage_and_budget_overruns_are_refused(sources, tmp_path, args, message):
    done = package("--tokenizer", sources / "tokenizer", *args, "--out", tmp_path)
    assert done.returncode != 0 and message in done.stderr


def test_a_budget_overrun_leaves_the_packaged_models_as_they_were(sources, tmp_path):
    assert package("--tokenizer", sources / "tokenizer", "--class-generator", sources / "class", "--storage", "fp16",
                   "--out", tmp_path).returncode == 0
    before = {f: f.read_bytes() for f in tmp_path.rglob("*") if f.is_file()}
    done = package("--tokenizer", sources / "tokenizer", "--class-generator", sources / "class", "--text-generator",
                   sources / "text", "--storage", "fp32", "--max-mib", "0.001", "--out", tmp_path)
    assert done.returncode != 0 and "over the 0.001 MiB budget" in done.stderr
    assert {f: f.read_bytes() for f in tmp_path.rglob("*") if f.is_file()} == before  # nor a staging folder left
    # and the same packaging within the budget replaces the folders whole
    assert package("--tokenizer", sources / "tokenizer", "--class-generator", sources / "class", "--text-generator",
                   sources / "text", "--storage", "fp32", "--out", tmp_path).returncode == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        READY_MADE[name] for name in ("emoji-tokenizer", "emoji-class", "emoji-text"))
    stored = load_file(tmp_path / READY_MADE["emoji-class"] / "model.safetensors")
    assert all(t.dtype.is_floating_point and t.dtype.itemsize == 4 for t in stored.values())


def test_a_folder_set_aside_by_a_killed_packaging_is_put_back(tmp_path):
    import importlib.util
    spec = importlib.util.spec_from_file_location("package_ready_made", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    staging = tmp_path / ".packaging"
    (staging / "emoji32-class.old").mkdir(parents=True)  # killed between setting it aside and moving its successor in
    (staging / "emoji32-class.old" / "model.safetensors").write_text("the packaged weights")
    (staging / "emoji32-text.old").mkdir()  # its successor did arrive: the old one is dropped
    (tmp_path / "emoji32-text").mkdir()
    (tmp_path / "emoji32-text" / "model.safetensors").write_text("the new weights")
    module.recover(tmp_path, staging)
    assert (tmp_path / "emoji32-class" / "model.safetensors").read_text() == "the packaged weights"
    assert (tmp_path / "emoji32-text" / "model.safetensors").read_text() == "the new weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["emoji32-class", "emoji32-text"]
