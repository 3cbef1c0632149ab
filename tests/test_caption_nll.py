"""scripts/caption_nll.py: each entry is the generator's own mean next-code loss of that image under that caption."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from image_data.emoji import load_emoji
from image_data.transforms import to_model_range
from pipelines.text import TextEncoder
from stage1_tokenizer.tokenizer import Tokenizer
from stage2_generator.model import Generator

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "caption_nll.py"
sys.path.insert(0, str(SCRIPT.parent))
from caption_nll import caption_nll  # noqa: E402

NAMES = ["rocket", "dog face"]


@torch.no_grad()
def test_each_entry_is_the_loss_of_that_image_under_that_caption():
    generator = Generator.from_pretrained("emoji-text").eval()
    tokenizer = Tokenizer.from_pretrained("emoji-tokenizer").eval()
    table = caption_nll(generator, tokenizer, NAMES)
    images = load_emoji("train", 32)
    captions = torch.from_numpy(TextEncoder(generator.config.text_encoder).encode(NAMES).features).float()
    for i, name in enumerate(NAMES):
        codes = tokenizer.encode(to_model_range(images.images[images.captions.index(name)][None])).flatten(1)
        for j in range(len(NAMES)):
            assert table[i, j].item() == pytest.approx(generator(codes, captions[j:j + 1]).item(), rel=1e-5, abs=1e-6)


def test_the_script_prints_the_table_and_refuses_unknown_names():
    done = subprocess.run([sys.executable, str(SCRIPT), "--names", *NAMES], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "rocket" in done.stdout and "own " in done.stdout
    bad = subprocess.run([sys.executable, str(SCRIPT), "--names", "rocket", "a unicorn made of cheese"],
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "no train emoji is named 'a unicorn made of cheese'" in bad.stderr
