"""Bad input through the CLI: exit status 2 and a message naming the problem, never a traceback; a bug (any
other exception) is not caught."""
from __future__ import annotations

import re

import numpy as np
import pytest

from pipelines.cli import SCHEMAS, main, schema_of
from pipelines.sample_files import write_samples
from simvq_common.schema_keys import schema_keys
from stage1_tokenizer.config import TokenizerTrainConfig
from test_sample import tiny_tokenizer


@pytest.fixture
def tokenizer_dir(tmp_path):
    tiny_tokenizer(0).save_pretrained(tmp_path / "tokenizer")
    return tmp_path / "tokenizer"


def run_cli(capsys, argv) -> str:
    assert main(argv) == 2
    return " ".join(capsys.readouterr().err.split())


def test_a_data_folder_that_does_not_exist(tmp_path, tokenizer_dir, capsys):
    err = run_cli(capsys, ["eval-tokenizer", f"tokenizer={tokenizer_dir}", "resolution=16", "data=/no/such/folder",
                           "perceptual=none"])
    assert "/no/such/folder" in err and "neither 'emoji' nor an image folder" in err


@pytest.mark.parametrize("override, message", [
    ("loss.perceptual=bogus", "unknown perceptual backend 'bogus'"),
    ("data.resolution=99", "emoji resolution must lie in [1, 64] px, got 99"),
    ("loss.gan_kind=bogus", "unknown generator loss kind 'bogus'"),
])
def test_training_settings_that_cannot_work(tmp_path, capsys, override, message):
    tiny = ["tokenizer.autoencoder.ch=8", "tokenizer.autoencoder.ch_mult=[1,2]", "tokenizer.autoencoder.z_channels=8",
            "tokenizer.autoencoder.norm_groups=4", "tokenizer.quantizer.codebook_size=64", "data.batch_size=2",
            "data.resolution=16", "loss.disc_layers=2", "loss.perceptual=none", "loss.gan_start_step=0"]
    err = run_cli(capsys, ["train-tokenizer", f"run.out_dir={tmp_path / 'run'}", "run.steps=1", *tiny, override])
    assert message in err


def test_a_reference_file_that_is_no_statistics_file(tmp_path, capsys):
    write_samples(tmp_path / "s", np.zeros((2, 8, 8, 3), np.uint8), labels=[0, 0], indices=[0, 1], codes=[[0], [0]],
                  prompts=["", ""], meta={})
    np.savez(tmp_path / "stats.npz", weights=np.zeros(3))
    err = run_cli(capsys, ["evaluate", str(tmp_path / "s"), "--reference", str(tmp_path / "stats.npz")])
    assert "stats.npz holds ['weights']: neither a statistics file" in err and "nor an ADM reference batch" in err


def test_an_override_value_yaml_cannot_read_is_one_line_naming_key_and_value(capsys):
    # what reaches the CLI of `simvq sample ... classes=[Animals & Nature]` typed unquoted: the shell cut it at '&'
    assert main(["sample", "--generator", "GEN", "--out", "runs/s", "classes=[Animals"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    assert "override classes: cannot read the value '[Animals'" in err and "quote the whole override" in err


def test_a_config_file_yaml_cannot_read(tmp_path, capsys):
    (tmp_path / "bad.yaml").write_text("decode: 2\ngrid: [a\n")
    err = run_cli(capsys, ["verify-cache", "C", "-c", str(tmp_path / "bad.yaml")])
    assert f"{tmp_path / 'bad.yaml'} is not valid YAML at line 3" in err and "Traceback" not in err


def test_a_bug_is_not_caught(monkeypatch):
    import pipelines.cli as cli

    def broken(_):
        raise KeyError("a bug")

    monkeypatch.setitem(cli.COMMANDS, "dataset-info", (broken, "help"))
    with pytest.raises(KeyError, match="a bug"):
        main(["dataset-info"])


@pytest.mark.parametrize("argv, nearest", [
    (["train-tokenizer", "resolution=32"], "did you mean data.resolution?"),
    (["train-generator", "optim.weight_dekay=0.1"], "did you mean optim.weight_decay"),
    (["sample", "guidance_scal=3"], "did you mean sampling.guidance_scale or"),
    (["evaluate", "resolution=32", "runs/samples"], None),  # nothing near: the samples set the resolution
])
def test_an_unknown_key_names_the_nearest_real_ones(capsys, argv, nearest):
    err = run_cli(capsys, argv)
    key = argv[1].split("=")[0]
    assert f"unknown key '{key}'" in err and "`--help` after the command lists every key" in err
    assert (nearest in err) if nearest else "did you mean" not in err


@pytest.mark.parametrize("command", sorted(SCHEMAS))
def test_help_lists_every_config_key_with_its_default_and_comment(capsys, command):
    with pytest.raises(SystemExit) as done:
        main([command, "--help"])
    out = capsys.readouterr().out
    assert done.value.code == 0 and "config keys (key=value; defaults shown):" in out
    listed = {re.split(r"\s{2,}", line.strip())[0] for line in out.split("config keys")[1].splitlines()[1:]}
    keys = schema_keys(schema_of(command))
    assert {f"{k.name}={k.default}" for k in keys} <= listed
    for key in keys:  # every comment the schema writes for a key is shown on its line (the next, if long)
        assert not key.comment or " ".join(key.comment.split()) in " ".join(out.split())


def test_schema_keys_reads_defaults_and_comments_from_the_source():
    from pipelines.config import EvaluateConfig, QualityStudyConfig

    keys = {k.name: k for k in schema_keys(EvaluateConfig)}
    assert keys["metrics"].default == "[fid,sfid,kid,prc]" and keys["out"].default == '""'
    assert keys["max_reference"].comment == "the first N reference images (0 = all)"
    assert keys["reference_split"].comment == ""
    knobs = {k.name: k for k in schema_keys(QualityStudyConfig)}["knobs"]  # a comment block above the field
    assert knobs.comment.startswith("one knob at a time:") and knobs.comment.endswith("(the run's when there is no sweep)")
    nested = [k.name for k in schema_keys(TokenizerTrainConfig)]
    assert "tokenizer.quantizer.codebook_size" in nested and "optim.lr" in nested
