"""The tokenizer a generator decodes with: the one whose codes it learned, or none.

Looked for, first found first: `tokenizer=` as given; the Hub id recorded beside a generator pushed to the
Hub (TOKENIZER_SOURCE_FILE, written by `simvq push-to-hub`); the tokenizer_path its config records (a
directory, or a Hub id when its code cache was made with a Hub tokenizer). Each is a directory or a Hub id
(simvq_common.hub), and whichever it is must have the fingerprint the generator learned: another one is
refused, naming both.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from simvq_common.errors import UserError
from simvq_common.hub import model_source_exists, resolve_model_dir
from stage1_tokenizer.tokenizer import Tokenizer
from stage2_generator.config import GeneratorConfig

TOKENIZER_SOURCE_FILE = "tokenizer_source.json"  # {"hub_id": "org/name", "revision": ..., "fingerprint": ...}


def recorded_hub_tokenizer(generator_dir: str | Path) -> str | None:
    """`org/name[@revision]` of the tokenizer a generator directory from the Hub names; None without one."""
    path = Path(generator_dir) / TOKENIZER_SOURCE_FILE
    if not path.is_file():
        return None
    recorded = json.loads(path.read_text())
    return recorded["hub_id"] + (f"@{recorded['revision']}" if recorded.get("revision") else "")


def load_matching_tokenizer(source: str, generator: str, model_cfg: GeneratorConfig, device: torch.device,
                            generator_dir: str | Path | None = None) -> tuple[Tokenizer, str]:
    """The tokenizer (and its directory) whose codes generator `generator` (read from `generator_dir`, default
    the same) learned: from `source`, else from what the generator records; refuses any other."""
    recorded = recorded_hub_tokenizer(generator_dir or generator)
    source = source or recorded or model_cfg.tokenizer_path
    expected = model_cfg.tokenizer_fingerprint or "(unrecorded)"
    if not source:
        raise UserError(f"generator {generator} records no tokenizer path: pass tokenizer=DIR or a Hub id (the "
                        f"tokenizer with fingerprint {expected})")
    if not model_source_exists(source):
        raise UserError(f"tokenizer directory {source} does not exist: pass tokenizer=DIR (or a Hub id), a copy of "
                        f"the tokenizer with fingerprint {expected}")
    directory = resolve_model_dir(source)
    found = Tokenizer.from_pretrained(directory)
    if found.fingerprint() != model_cfg.tokenizer_fingerprint:
        where = (f"Hub id {recorded}" if recorded else f"path {model_cfg.tokenizer_path or '(none)'}")
        raise UserError(f"tokenizer {source} has fingerprint {found.fingerprint()}, but generator {generator} learned "
                        f"the codes of tokenizer {expected} (recorded {where}): pass tokenizer=DIR or a Hub id "
                        f"with that fingerprint")
    return found.to(device), str(directory)
