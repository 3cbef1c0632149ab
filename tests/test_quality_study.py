"""`simvq quality-study` on a toy `simvq run`: a kept checkpoint exports to exactly the weights the run exported at
that step, every row is measured against the run's own class plan, the best sweep row is the lowest FID, a knob
row "" retrains the run's generator bit for bit while another seed does not, and a second call reuses every row."""
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from pipelines.config import GeneratorStage
from pipelines.run import run_pipeline
from stage2_generator.model import Generator
from stage2_generator.checkpoints import export_checkpoint
from pipelines import quality_study as quality
from pipelines.config import QualityStudyConfig
from test_run_pipeline import TINY_GENERATOR, tiny_pipeline


@pytest.mark.slow
def test_quality_study_rows_checkpoints_sweep_and_resume(tmp_path, monkeypatch, lone_process):
    monkeypatch.setenv("SIMVQ_FID_CACHE", str(tmp_path / "fid-cache"))
    cfg = tiny_pipeline(tmp_path / "run")
    cfg.results_md, cfg.baseline = "", False
    cfg.generators = [GeneratorStage(name="class", config=cfg.generators[0].config, overrides=[
        *TINY_GENERATOR, "run.steps=4", "run.checkpoint_every=2", "run.keep_checkpoints=2"])]
    run_pipeline(cfg)
    run_dir = tmp_path / "run"

    final = Generator.from_pretrained(run_dir / "generator_class" / "generator")
    exported = Generator.from_pretrained(export_checkpoint(run_dir / "generator_class", 4, tmp_path / "step4"))
    assert exported.fingerprint() == final.fingerprint()
    earlier = Generator.from_pretrained(export_checkpoint(run_dir / "generator_class", 2, tmp_path / "step2"))
    assert not all(torch.equal(a, b) for a, b in zip(earlier.state_dict().values(), final.state_dict().values()))

    study_cfg = QualityStudyConfig(run_dir=str(run_dir), sweep=["guidance_scale=1.0", "guidance_scale=3.0 top_k=50"],
                                   seeds=[1], classifier="", memorisation=False, knobs=["", "run.seed=1"],
                                   results_md=str(tmp_path / "RESULTS.md"), figure=str(tmp_path / "steps.png"))
    result = quality.run_quality_study(study_cfg)
    kinds = [r["kind"] for r in result["rows"]]
    assert kinds == ["checkpoint", "checkpoint", "sweep", "sweep", "seed", "knob", "knob"]
    assert [r["step"] for r in result["rows"][:2]] == [2, 4] and result["rows"][1]["fingerprint"] == final.fingerprint()
    sweep = result["rows"][2:4]
    best = min(sweep, key=lambda r: r["fid"])
    assert result["rows"][4]["sampling"] == {**best["sampling"], "seed": 1}
    assert sweep[1]["sampling"]["top_k"] == 50 and sweep[1]["sampling"]["guidance_scale"] == 3.0
    as_run, other_seed = result["rows"][5:7]
    assert as_run["fingerprint"] == final.fingerprint() and as_run["fid"] == best["fid"]  # retrained bit for bit
    assert other_seed["fingerprint"] != final.fingerprint() and other_seed["sampling"] == best["sampling"]
    assert other_seed["step"] == 4 and other_seed["val_loss"] is not None and other_seed["train_seconds"] > 0
    for row in result["rows"]:
        assert row["fid_over_rfid"] == pytest.approx(row["fid"] / result["rfid"])
        meta = json.loads((Path(row["folder"]) / "sampling.json").read_text())
        assert meta["config"]["class_counts"] == json.loads(
            (run_dir / "stages" / "samples-class.json").read_text())["inputs"]["class_counts"]
    assert "quality-study:begin" in (tmp_path / "RESULTS.md").read_text() and (tmp_path / "steps.png").is_file()

    monkeypatch.setattr(quality, "sample", lambda *a, **k: pytest.fail("a finished row was measured again"))
    monkeypatch.setattr(quality, "train_generator", lambda *a, **k: pytest.fail("a finished knob was retrained"))
    again = quality.run_quality_study(study_cfg)
    assert [r["fid"] for r in again["rows"]] == [r["fid"] for r in result["rows"]]
    # knobs reordered between calls: each finds its own finished generator, not the one at its old position
    swapped = quality.run_quality_study(replace(study_cfg, knobs=["run.seed=1", ""]))
    assert [r["fingerprint"] for r in swapped["rows"][5:7]] == [other_seed["fingerprint"], as_run["fingerprint"]]
