"""Ready-made models: trained models that ship in the repository's models/ folder and load by a short name,
offline, wherever a model directory or Hub id is taken (`simvq sample --generator emoji-class`).

A plain dict of name -> folder of models/; each folder is an ordinary model directory (config.yaml,
model.safetensors, fingerprint.txt, kind.txt) with its model card (README.md) and, for a generator, the sampler
settings the quality study found best for it (sampling.yaml). docs/RESULTS.md says how each was trained and
measured; models/README.md gives the command that retrains them. A local directory of the same name wins.
"""
from __future__ import annotations

from pathlib import Path

MODELS_DIR = Path(__file__).resolve().parents[1] / "models"

READY_MADE: dict[str, str] = {
    "emoji-tokenizer": "emoji32-tokenizer",  # SimVQ, K = 1,024, 32 px -> 8 x 8 codes
    "emoji-class": "emoji32-class",  # class-conditional GPT-medium (its EMA) over its codes (9 emoji categories)
    "emoji-text": "emoji32-text",  # text-conditional GPT-tiny (all-MiniLM-L6-v2 embeddings of emoji names)
    "emoji-classifier": "emoji32-classifier",  # the class-agreement classifier of the 9 categories
}
DEFAULT_GENERATOR = "emoji-class"  # what `simvq serve` serves when given none


def ready_made_dir(name: str | Path) -> Path | None:
    """The folder of ready-made model `name`, or None when `name` is not one (or a local directory shadows it)."""
    name = str(name)
    if name not in READY_MADE or Path(name).is_dir():
        return None
    return MODELS_DIR / READY_MADE[name]
