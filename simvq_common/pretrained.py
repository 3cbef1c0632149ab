"""Model directories: config.yaml + model.safetensors (+ fingerprint.txt), rebuilt from the directory alone.

Both stages save their models this way (the tokenizer and the generator); the fingerprint is the sha256
of the config text and the weights, and a later stage records it to refuse a mismatch. `from_pretrained`
also takes a Hub id (`org/name`, `org/name@revision`), resolved by simvq_common.hub.
"""
from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import torch
from safetensors.torch import load_file, save_file

from .artifacts import KINDS, expect_kind, write_kind
from .config import canonical_yaml, load_config, to_yaml
from .errors import ArtifactError
from .fingerprint import tensors_fingerprint
from .hub import resolve_model_dir
from .io import atomic_write, write_text_atomic
from .weight_storage import decode, encode

CONFIG_FILE, WEIGHTS_FILE, FINGERPRINT_FILE = "config.yaml", "model.safetensors", "fingerprint.txt"
T = TypeVar("T")


def model_fingerprint(config, state: dict[str, torch.Tensor]) -> str:
    return tensors_fingerprint(canonical_yaml(config), state)


def save_pretrained(directory: str | Path, kind: str, config, state: dict[str, torch.Tensor],
                    storage: str = "fp32") -> Path:
    """Write the kind, the weights (in `storage`: simvq_common.weight_storage), then the config, then the
    fingerprint of the weights as they will load, each atomically."""
    directory = Path(directory)
    stored = {k: v.contiguous() for k, v in encode({k: v.detach().cpu() for k, v in state.items()}, storage).items()}
    directory.mkdir(parents=True, exist_ok=True)
    write_kind(directory, kind)
    atomic_write(directory / WEIGHTS_FILE, lambda tmp: save_file(stored, str(tmp)))
    write_text_atomic(directory / CONFIG_FILE, to_yaml(config))
    write_text_atomic(directory / FINGERPRINT_FILE, model_fingerprint(config, decode(stored)) + "\n")
    return directory


def load_pretrained(directory: str | Path, schema: type[T], kind: str, map_location: str = "cpu"
                    ) -> tuple[T, dict[str, torch.Tensor]]:
    """(config, state dict) of a model directory of `kind`; another kind is refused, naming what it is."""
    directory = Path(directory)
    expect_kind(directory, kind)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (directory / name).is_file():
            raise ArtifactError(f"{directory} is not {KINDS[kind]}: its {name} is missing")
    stored = load_file(str(directory / WEIGHTS_FILE), device=map_location)
    try:
        state = decode(stored)
    except ValueError as err:
        raise ArtifactError(f"{directory / WEIGHTS_FILE}: {err}") from None
    return load_config(schema, directory / CONFIG_FILE), state


def load_state_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"the weights in {source} do not match its config: missing {sorted(missing)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]}")


class PretrainedModel:
    """fingerprint / save_pretrained / from_pretrained for a module built from one config dataclass.

    Mixed into an nn.Module whose constructor takes the config and keeps it as `self.config`; the subclass
    names its `config_schema` and the artifact `kind` its directories record (simvq_common.artifacts).
    """

    config_schema: type
    kind: str

    @classmethod
    def check_layout(cls, state: dict[str, torch.Tensor], source: Path) -> None:
        """Refuse weights in a layout this class no longer reads, saying what to do (a subclass's hook)."""

    def fingerprint(self) -> str:
        return model_fingerprint(self.config, self.state_dict())

    def save_pretrained(self, directory: str | Path, storage: str = "fp32") -> Path:
        return save_pretrained(directory, self.kind, self.config, self.state_dict(), storage)

    @classmethod
    def from_pretrained(cls, source: str | Path, map_location: str = "cpu", revision: str | None = None):
        """The model in a local directory, or in the Hub model `source` (org/name[@revision]) through the
        Hub cache; an existing directory of that name wins."""
        directory = resolve_model_dir(source, revision)
        config, state = load_pretrained(directory, cls.config_schema, cls.kind, map_location)
        cls.check_layout(state, directory)
        model = cls(config)
        load_state_strict(model, state, directory)
        return model.eval()
