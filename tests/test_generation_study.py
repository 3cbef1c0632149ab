"""`simvq generation-study` at a toy size: every tokenizer's generators are trained, sampled in the val split's class
mix and measured (each derived number recomputed here from the files: the gap, bits per image, the codebook shares),
the seed-0 tokenizers are the tokenizer comparison's own runs, another seed gives another tokenizer, the sweep rows
sample the first generator at their settings, and a second call reuses every step."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from pipelines import generation_study as study_module
from pipelines.conditions import largest_remainder
from pipelines.config import GenerationStudyConfig, StudyTokenizer
from pipelines.generation_study import code_share, reused, run_generation_study, train_log
from simvq_common.config import load_config
from simvq_common.errors import ConfigError
from stage1_tokenizer.tokenizer import Tokenizer
from stage2_generator.cache_reader import CodeCache
from studies.config import TokenizerComparisonConfig
from studies.tokenizer_comparison import run_config
from test_run_pipeline import REPO, TINY_GENERATOR, TINY_TOKENIZER


def tiny_study(tmp_path: Path, **changes) -> GenerationStudyConfig:
    comparison = tmp_path / "tokenizers.yaml"
    overrides = [o for o in TINY_TOKENIZER if "codebook_size" not in o] + ["data.resolution=16"]
    comparison.write_text(yaml.safe_dump({
        "base_config": str(REPO / "configs/tokenizer/emoji32_simvq_8k_cpu.yaml"), "overrides": overrides,
        "out_dir": str(tmp_path / "tokenizers")}))
    cfg = GenerationStudyConfig(
        tokenizer_study=str(comparison), max_images=48, num_samples=8, max_reference=8, metrics=["fid"],
        fid_source="offline-torchscript",
        tokenizers=[StudyTokenizer("simvq", 64), StudyTokenizer("simvq", 64, seed=1)],
        generator_config=str(REPO / "configs/generator/emoji32_class_tiny_cpu.yaml"),
        generator_overrides=TINY_GENERATOR, generator_seeds=[0, 1], sweep=["temperature=0.5 top_k=8"],
        sweep_tokenizers=["simvq_K64"], out_dir=str(tmp_path / "study"), results_md=str(tmp_path / "RESULTS.md"),
        figure=str(tmp_path / "fid_vs_k.png"))
    for key, value in changes.items():
        setattr(cfg, key, value)
    return cfg


@pytest.mark.slow
def test_generation_study_measures_every_tokenizer_and_resumes(tmp_path, monkeypatch, lone_process):
    monkeypatch.setenv("SIMVQ_FID_CACHE", str(tmp_path / "fid-cache"))
    cfg = tiny_study(tmp_path)
    result = run_generation_study(cfg)
    rows = {r["name"]: r for r in result["rows"]}
    assert list(rows) == ["simvq_K64", "simvq_K64_seed1"]

    # seed 0 is the comparison's own run directory; seed 1 another tokenizer
    comparison = load_config(TokenizerComparisonConfig, cfg.tokenizer_study)
    own = run_config(comparison, "simvq", 64).run.out_dir
    assert Path(own) == tmp_path / "tokenizers" / "simvq_K64"
    assert rows["simvq_K64"]["fingerprint"] == Tokenizer.from_pretrained(Path(own) / "tokenizer").fingerprint()
    assert rows["simvq_K64_seed1"]["fingerprint"] != rows["simvq_K64"]["fingerprint"]

    for name, row in rows.items():
        folder = Path(cfg.out_dir) / name
        val = CodeCache(folder / "cache_val")
        val_codes = val.codes(np.arange(len(val)))
        assert row["val_code_share"] == len(np.unique(val_codes)) / 64
        counts = largest_remainder(np.bincount(val.labels(np.arange(len(val))), minlength=9).tolist(), 8)
        gens = row["generators"]
        assert [g["seed"] for g in gens] == [0, 1] and gens[0]["fingerprint"] != gens[1]["fingerprint"]
        for g in gens:
            with np.load(Path(g["run_dir"]) / "samples" / "samples.npz") as data:
                assert np.bincount(data["labels"], minlength=9).tolist() == counts
                assert g["sample_code_share"] == len(np.unique(data["codes"])) / 64
            assert g["gap"] == pytest.approx(g["fid"] - row["rfid"])
            lines = (Path(g["run_dir"]) / "metrics.jsonl").read_text().splitlines()
            val_loss = [json.loads(x)["val_loss"] for x in lines if "val_loss" in x][-1]
            assert g["val_bits_per_image"] == pytest.approx(val_loss * 16 / math.log(2))  # 4x4 codes at 16 px
            assert g["val_perplexity"] == pytest.approx(math.exp(val_loss))
            meta = json.loads((Path(g["run_dir"]) / "samples" / "sampling.json").read_text())
            assert g["sampling_tokens_per_s"] == pytest.approx(8 * 16 / meta["draw_seconds"])
            assert 0 < meta["draw_seconds"] < meta["seconds"]  # model loading left out
        assert row["fid"]["mean"] == pytest.approx(np.mean([g["fid"] for g in gens]))

    (sweep,) = result["sweep"]
    assert sweep["tokenizer"] == "simvq_K64" and sweep["sampling"]["temperature"] == 0.5
    assert sweep["sampling"]["top_k"] == 8 and sweep["sampling"]["guidance_scale"] == cfg.sampling.guidance_scale
    meta = json.loads((Path(rows["simvq_K64"]["generators"][0]["run_dir"]) / "sweep_00" / "sampling.json").read_text())
    assert meta["generator"]["fingerprint"] == rows["simvq_K64"]["generators"][0]["fingerprint"]
    assert "generation-study:begin" in (tmp_path / "RESULTS.md").read_text()
    assert (tmp_path / "fid_vs_k.png").is_file()

    # a changed training override trains a new generator beside the old one, never resuming the finished one
    changed = tiny_study(tmp_path, tokenizers=[StudyTokenizer("simvq", 64)], generator_seeds=[0], sweep=[],
                         sweep_tokenizers=[], results_md="", figure="",
                         generator_overrides=[*TINY_GENERATOR, "optim.lr=0.01"])
    (new,) = run_generation_study(changed)["rows"][0]["generators"]
    (old,) = [g for g in rows["simvq_K64"]["generators"] if g["seed"] == 0]
    assert new["run_dir"] != old["run_dir"] and new["fingerprint"] != old["fingerprint"]
    assert Path(old["run_dir"], "generator", "model.safetensors").is_file()

    # a second call measures nothing again
    for name in ("sample", "train_generator", "evaluate", "evaluate_tokenizer"):
        monkeypatch.setattr(study_module, name, lambda *a, _n=name, **k: pytest.fail(f"{_n} ran again"))
    again = run_generation_study(cfg)
    assert [r["generators"] for r in again["rows"]] == [r["generators"] for r in result["rows"]]


def test_reused_recomputes_only_when_its_inputs_change(tmp_path):
    calls = []

    def make():
        calls.append(1)
        return {"value": len(calls)}

    path = tmp_path / "record.json"
    assert reused(path, {"a": 1}, make) == {"value": 1}
    assert reused(path, {"a": 1}, make) == {"value": 1} and len(calls) == 1
    assert reused(path, {"a": 2}, make) == {"value": 2} and len(calls) == 2


def test_training_speed_is_the_median_interval_so_a_pause_does_not_move_it(tmp_path):
    rows = [{"step": 25 * i, "tokens_per_s": v} for i, v in enumerate([10.0, 100.0, 90.0, 0.5, 110.0], 1)]
    rows[-1]["val_loss"] = 4.5
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert train_log(tmp_path) == (4.5, 95.0)  # the warm-up interval left out, the paused one outvoted


def test_code_share_counts_distinct_codes():
    codes = np.array([[0, 1, 1], [5, 0, 7]])
    assert code_share(codes, 16) == 4 / 16
    assert code_share(np.arange(16).reshape(4, 4), 16) == 1.0


@pytest.mark.parametrize("changes, named", [
    ({"tokenizers": [StudyTokenizer("fancy_vq", 64)]}, "fancy_vq"),
    ({"sweep_tokenizers": ["simvq_K999"]}, "simvq_K999"),
    ({"generator_seeds": []}, "generator_seeds"),
    ({"tokenizers": [StudyTokenizer("vq", 64)] * 2}, "twice"),
    ({"metrics": ["sfid"]}, "add fid"),
    ({"sweep": ["temprature=0.5"]}, "temprature"),
])
def test_bad_study_configs_are_refused_before_any_training(tmp_path, changes, named):
    with pytest.raises(ConfigError, match=named):
        run_generation_study(tiny_study(tmp_path, **changes))
    assert not (tmp_path / "tokenizers").exists()


def test_the_shipped_study_config_loads_and_names_its_sweep_tokenizers():
    cfg = load_config(GenerationStudyConfig, REPO / "configs/study/generation_emoji.yaml")
    names = [study_module.GenerationStudy.name(t) for t in cfg.tokenizers]
    assert set(cfg.sweep_tokenizers) <= set(names) and len(set(names)) == len(names)
    assert {(t.kind, t.codebook_size) for t in cfg.tokenizers} >= {
        (kind, k) for kind in ("vq", "simvq") for k in (1024, 8192, 65536)}
