"""The CLI's command line: key=value overrides before, between or after the flags and the positional argument
set the same config; a flag's value stays the flag's; a word that is no override is refused, named."""
from __future__ import annotations

from itertools import permutations

import pytest

from pipelines.cli import config_of, parse_args

EVALUATE_PARTS = (["runs/s"], ["--reference", "/data/imagenet"], ["reference_split=val"],
                  ["save_reference_stats=in128_val.npz"])


@pytest.mark.parametrize("order", list(permutations(range(len(EVALUATE_PARTS)))), ids=str)
def test_overrides_in_any_order_around_the_flag_and_the_positional(order):
    argv = ["evaluate", *(word for index in order for word in EVALUATE_PARTS[index])]
    cfg = config_of(parse_args(argv))
    assert (cfg.samples, cfg.reference, cfg.reference_split, cfg.save_reference_stats) == (
        "runs/s", "/data/imagenet", "val", "in128_val.npz"), argv


@pytest.mark.parametrize("argv", [["verify-cache", "runs/c", "decode=4", "--tokenizer", "T"],
                                  ["verify-cache", "runs/c", "--tokenizer", "T", "decode=4"],
                                  ["verify-cache", "decode=4", "runs/c", "--tokenizer", "T"],
                                  ["verify-cache", "--tokenizer", "T", "decode=4", "runs/c"]])
def test_verify_cache_takes_its_positional_and_overrides(argv):
    cfg = config_of(parse_args(argv))
    assert (cfg.cache, cfg.tokenizer, cfg.decode) == ("runs/c", "T", 4)


def test_an_override_after_a_file_config_wins_and_one_before_it_too(tmp_path):
    (tmp_path / "c.yaml").write_text("decode: 2\ngrid: g.png\n")
    for argv in (["verify-cache", "C", "-c", str(tmp_path / "c.yaml"), "decode=5"],
                 ["verify-cache", "decode=5", "C", "-c", str(tmp_path / "c.yaml")]):
        cfg = config_of(parse_args(argv))
        assert (cfg.cache, cfg.decode, cfg.grid) == ("C", 5, "g.png")


def test_a_flag_value_holding_an_equals_sign_stays_the_flags():
    cfg = config_of(parse_args(["pretokenize", "--out", "a=b", "resolution=32", "--tokenizer", "T"]))
    assert (cfg.out, cfg.resolution, cfg.tokenizer) == ("a=b", 32, "T")


@pytest.mark.parametrize("argv, named", [
    (["sample", "--generator", "GEN", "classes=[Animals", "Nature]", "--out", "runs/s"], "Nature]"),
    (["evaluate", "runs/s", "stray", "--reference", "R"], "stray"),
    (["dataset-info", "classes=[a]"], "dataset-info takes no key=value overrides: classes=[a]"),
])
def test_a_word_that_is_no_override_is_refused_by_name(argv, named, capsys):
    with pytest.raises(SystemExit) as exit_:
        parse_args(argv)
    assert exit_.value.code == 2 and named in capsys.readouterr().err
