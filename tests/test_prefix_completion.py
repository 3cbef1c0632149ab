"""scripts/prefix_completion.py: row r keeps exactly the named image's top r rows of codes and samples the rest."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch
from PIL import Image

from image_data.emoji import load_emoji
from image_data.transforms import to_model_range
from stage1_tokenizer.tokenizer import Tokenizer
from stage2_generator.config import SamplingConfig
from stage2_generator.model import Generator
from stage2_generator.sampling import generate

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "prefix_completion.py"
sys.path.insert(0, str(SCRIPT.parent))
from prefix_completion import complete  # noqa: E402


def test_each_row_keeps_its_prefix_of_the_named_images_codes_and_samples_the_rest():
    generator = Generator.from_pretrained("emoji-class").eval()
    tokenizer = Tokenizer.from_pretrained("emoji-tokenizer").eval()
    rows, cols = generator.config.grid
    sampling = SamplingConfig(temperature=0.5, top_k=100, seed=3)
    codes, drawn = complete(generator, tokenizer, "rocket", rows, 2, sampling)
    images = load_emoji("train", 32)
    index = images.captions.index("rocket")
    assert torch.equal(codes, tokenizer.encode(to_model_range(images.images[index][None])).flatten(1))
    assert drawn.shape == (rows + 1, 2, rows * cols)
    for kept in range(rows + 1):
        assert torch.equal(drawn[kept, :, :kept * cols], codes[:, :kept * cols].expand(2, -1))
    assert torch.equal(drawn[rows], codes.expand(2, -1))  # every row kept: nothing left to draw
    label = images.labels[index][None].expand(2)
    assert torch.equal(drawn[0], generate(generator, label, torch.arange(2), sampling))  # nothing kept: a sample
    assert not torch.equal(drawn[0], codes.expand(2, -1))


def test_the_script_writes_the_grid_and_refuses_unknown_names(tmp_path):
    out = tmp_path / "grid.png"
    done = subprocess.run([sys.executable, str(SCRIPT), "--name", "rocket", "--out", str(out), "--max-rows", "1",
                           "--per-row", "2"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert Image.open(out).size == (2 * 32, 2 * 32)
    bad = subprocess.run([sys.executable, str(SCRIPT), "--name", "a unicorn made of cheese", "--out", str(out)],
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "no train emoji is named 'a unicorn made of cheese'" in bad.stderr
