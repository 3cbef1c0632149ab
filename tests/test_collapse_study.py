import json

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
