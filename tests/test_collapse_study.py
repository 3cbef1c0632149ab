import json

import pytest

from pipelines.cli import main
from simvq_common.run_dir import read_metrics


def test_collapse_study_end_to_end_through_the_cli(tmp_path):
    out, md = tmp_path / "study", tmp_path / "RESULTS.md"
    md.write_text("# Results\n\nkept text\n")
    rc = main(["collapse-study", "-c", "configs/study/collapse_demo.yaml", f"out_dir={out}", f"results_md={md}",
               "steps=6", "log_every=3", "codebook_sizes=[64]", "resolution=16", "autoencoder.ch=8",
               "autoencoder.z_channels=8", "autoencoder.norm_groups=4"])
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in results["results"]] == ["vq", "ema_vq", "simvq"]
    for r in results["results"]:
        assert r["val"]["tokens"] == 377 * 64 and r["train"]["tokens"] == 3404 * 64
        assert 0 < r["val"]["used"] <= 64 and r["val"]["dead"] == 64 - r["val"]["used"]
        assert 1 <= r["val"]["perplexity"] <= r["val"]["used"]
        run = out / f"{r['method']}_K64"
        assert [m["step"] for m in read_metrics(run / "metrics.jsonl")] == [3, 6]
        assert (run / "usage_val.png").stat().st_size > 0
    text = md.read_text()
    assert "kept text" in text and text.count("<!-- collapse-study:begin -->") == 1
    # rerunning rewrites the section in place instead of appending a second one
    assert main(["collapse-study", "-c", "configs/study/collapse_demo.yaml", f"out_dir={out}", f"results_md={md}",
                 "steps=1", "methods=[simvq]", "codebook_sizes=[64]", "resolution=16", "autoencoder.ch=8",
                 "autoencoder.z_channels=8", "autoencoder.norm_groups=4"]) == 0
    assert md.read_text().count("<!-- collapse-study:begin -->") == 1


def test_cli_reports_config_errors_without_traceback(tmp_path, capsys):
    assert main(["collapse-study", f"out_dir={tmp_path}", "steps=abc"]) == 2
    assert "bad value for 'steps'" in capsys.readouterr().err
    assert main(["collapse-study", f"out_dir={tmp_path}", "resolution=31"]) == 2
    assert "not divisible by the autoencoder's downsampling 2" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # refused before anything was written


TINY = ["resolution=16", "autoencoder.ch=8", "autoencoder.z_channels=8", "autoencoder.norm_groups=4",
        "codebook_sizes=[64]", "log_every=2", "curve_images=32", "eval_batch_size=32"]


def test_curves_plateau_stop_and_reuse_of_finished_runs(tmp_path, monkeypatch):
    import studies.collapse as collapse

    out, md = tmp_path / "study", tmp_path / "RESULTS.md"
    args = ["collapse-study", "-c", "configs/study/collapse_demo.yaml", f"out_dir={out}", f"results_md={md}",
            f"figure={tmp_path / 'figures' / 'curves.png'}", "methods=[simvq]", "steps=40", "eval_every=2",
            "plateau_window=4", "plateau_tolerance=1.0", "min_steps=6", *TINY]
    assert main(args) == 0
    (result,) = json.loads((out / "results.json").read_text())["results"]
    # a tolerance of 100 points: the first window that is complete after min_steps ends the run
    assert result["steps"] == 6 and [p["step"] for p in result["curve"]] == [0, 2, 4, 6]
    assert all(0 < p["utilisation"] <= 1 and p["perplexity"] >= 1 for p in result["curve"])
    assert (tmp_path / "figures" / "curves.png").stat().st_size > 0
    assert "![utilisation and perplexity against steps](figures/curves.png)" in md.read_text()
    # the same settings again: the finished run is reused, not retrained; other settings retrain
    def retrain(*args, **kwargs):
        raise AssertionError("retrained")

    monkeypatch.setattr(collapse, "train_one", retrain)
    assert main(args) == 0
    with pytest.raises(AssertionError, match="retrained"):
        main([*args, "lr=1e-3"])


def test_plateau_rule_and_basis_learning_rate():
    from studies.collapse import _optimizer, plateaued
    from studies.config import CollapseStudyConfig
    from stage1_tokenizer.autoencoder import VQAutoencoder
    from stage1_tokenizer.config import QuantizerConfig

    curve = [{"step": s, "utilisation": u} for s, u in [(0, 0.1), (250, 0.3), (500, 0.35), (750, 0.355)]]
    assert not plateaued(curve[:3], 500, 0.01)  # 0.1 -> 0.35 over the last 500 steps
    assert plateaued(curve, 500, 0.06) and not plateaued(curve, 500, 0.05)  # 0.3 -> 0.355
    assert not plateaued(curve, 0, 0.5) and not plateaued(curve[:1], 500, 0.5)
    cfg = CollapseStudyConfig(lr=1e-3, basis_lr_scale=10)
    model = VQAutoencoder(cfg.autoencoder, QuantizerConfig(kind="simvq", codebook_size=16))
    groups = _optimizer(cfg, model).param_groups
    assert [g["lr"] for g in groups] == [1e-3, 1e-2]
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in model.quantizer.basis.parameters()}
    plain = VQAutoencoder(cfg.autoencoder, QuantizerConfig(kind="vq", codebook_size=16))
    assert len(_optimizer(cfg, plain).param_groups) == 1


def test_plateau_and_figure_need_curves(tmp_path, capsys):
    assert main(["collapse-study", f"out_dir={tmp_path}", "plateau_window=500", "eval_every=300"]) == 2
    assert "plateau_window=500 needs eval_every set to a divisor of it" in capsys.readouterr().err
    assert main(["collapse-study", f"out_dir={tmp_path}", f"figure={tmp_path}/f.png"]) == 2
    assert "figure needs eval_every > 0" in capsys.readouterr().err
