"""The README's Python examples run as written (the quantizer library; sampling from a trained generator,
here a tiny one saved where the example looks for the demo's)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from test_sample import random_generator, tiny_tokenizer

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = re.findall(r"^```python\n(.*?)^```", (REPO / "README.md").read_text(), re.S | re.M)


def test_the_readme_shows_the_sampling_and_quantizer_examples():
    assert len(EXAMPLES) == 2 and "generate(" in EXAMPLES[0] and "SimVQ(" in EXAMPLES[1]


@pytest.mark.parametrize("example", EXAMPLES, ids=["sampling", "quantizer"])
def test_example_runs_as_written(example, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tokenizer = tiny_tokenizer(0)
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    random_generator("class", tokenizer, tmp_path / "tokenizer").save_pretrained(
        "runs/emoji32_demo/generator_class/generator")
    runs = [{}, {}]
    for namespace in runs:
        exec(compile(example, "README.md", "exec"), namespace)
    if "images" in runs[0]:  # the sampling example: decoded images of codes that depend on the seeds alone
        assert runs[0]["images"].shape == (4, 3, 8, 8) and runs[0]["images"].abs().max() <= 1.0
        assert torch.equal(runs[0]["codes"], runs[1]["codes"]) and int(runs[0]["codes"].max()) < 64
    else:
        assert runs[0]["usage"].merged().summary()["tokens"] == 8 * 16 * 16
