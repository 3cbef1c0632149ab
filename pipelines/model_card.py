"""The README.md model card of a model pushed to the Hub (`simvq push-to-hub`, pipelines/hub_upload.py).

It says what the model is (kind, architecture from its config), its fingerprint, the numbers it carries
with their provenance (a tokenizer's eval.json, a generator's `simvq evaluate` metrics.json), its sample
grid, how it was made (the run's command, training config and environment) and how to load it. Built from
plain facts gathered by hub_upload, so it needs no torch and is checked as text.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .conditionings import request_kind_named

TOKENIZER_METRICS = [("rfid", "rFID", "{:.2f}"), ("psnr", "PSNR (dB)", "{:.2f}"), ("ssim", "SSIM", "{:.4f}"),
                     ("lpips", "LPIPS", "{:.4f}"), ("utilisation", "codebook utilisation", "{:.1%}"),
                     ("perplexity", "code perplexity", "{:.1f}")]
GENERATOR_METRICS = [("fid", "FID", "{:.2f}"), ("sfid", "sFID", "{:.2f}"), ("isc_mean", "IS", "{:.2f}"),
                     ("kid_mean", "KID", "{:.4f}"), ("precision", "precision", "{:.3f}"),
                     ("recall", "recall", "{:.3f}")]


@dataclass
class CardFacts:
    """What the card states; None / empty = not known (the card says so or leaves the section out)."""

    repo: str  # org/name
    kind: str  # tokenizer | generator
    fingerprint: str
    config_yaml: str  # the model's config.yaml, verbatim
    architecture: list[tuple[str, str]]  # (what, value) rows
    files: list[str]
    grid: str | None = None  # the grid image's file name in the repository
    grid_caption: str = ""
    evaluation: dict | None = None  # a tokenizer's eval.json
    metrics: dict | None = None  # a generator's metrics.json
    tokenizer: dict | None = None  # a generator's tokenizer: hub_id, revision, fingerprint, checked
    conditioning: str = ""  # a generator's: class | text | none
    commands: list[str] = field(default_factory=list)
    training_config: str | None = None
    environment: dict | None = None


def _number(value, fmt: str) -> str:
    return fmt.format(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else "-"


def _front_matter(facts: CardFacts) -> list[str]:
    tags = ["simvq-gen", "vector-quantization"]
    tags += ["image-tokenizer"] if facts.kind == "tokenizer" else ["autoregressive", "image-generation"]
    return ["---", "library_name: simvq-gen", "tags:", *(f"- {tag}" for tag in tags), "---", ""]


def _what_it_is(facts: CardFacts) -> list[str]:
    if facts.kind == "tokenizer":
        lines = ["A SimVQ image tokenizer (simvq-gen stage 1): a convolutional autoencoder whose latent grid is "
                 "quantized to codes of a codebook, so that an image becomes a grid of integers and back."]
    else:
        tok = facts.tokenizer or {}
        pinned = tok.get("hub_id", "?") + (f"@{tok['revision']}" if tok.get("revision") else "")
        lines = [f"An autoregressive image generator (simvq-gen stage 2, a transformer decoder) over the codes of "
                 f"the tokenizer [{tok.get('hub_id', '?')}](https://huggingface.co/{tok.get('hub_id', '')}) "
                 f"(`{pinned}`, fingerprint `{tok.get('fingerprint', '?')}`), which decodes its samples."]
        if not tok.get("checked", True):
            lines.append("That tokenizer's fingerprint was not checked when this card was made (the Hub was not "
                         "reachable); sampling checks it and refuses any other.")
    rows = [("fingerprint", f"`{facts.fingerprint}` (sha256 of config.yaml and the weights, 16 hex digits)"),
            *facts.architecture]
    return [*lines, "", "| | |", "|---|---|", *(f"| {what} | {value} |" for what, value in rows), ""]


def _metrics(facts: CardFacts) -> list[str]:
    if facts.kind == "tokenizer" and facts.evaluation:
        e = facts.evaluation
        names, values = zip(*[(label, _number(e.get(key), fmt)) for key, label, fmt in TOKENIZER_METRICS])
        source = (f"Reconstructions of {e.get('num_images', '?')} images of the `{e.get('data', '?')}` "
                  f"{e.get('split', '?')} split at {e.get('resolution', '?')} px (`simvq eval-tokenizer`; "
                  f"eval.json holds the conventions, the LPIPS network and the FID Inception's provenance).")
    elif facts.kind == "generator" and facts.metrics:
        m = facts.metrics
        shown = [(label, _number(m.get(key), fmt)) for key, label, fmt in GENERATOR_METRICS if key in m]
        names, values = zip(*shown) if shown else ((), ())
        reference = m.get("reference") or {}
        source = (f"{m.get('num_generated', '?')} samples against {m.get('num_reference', '?')} reference images "
                  f"(`{reference.get('source', '?')}` {reference.get('split', '')}) with {m.get('suite', '?')}, "
                  f"Inception {m.get('inception_source', '?')} (`simvq evaluate`; metrics.json holds the rest)."
                  + (f" {m['note']}." if m.get("note") else ""))
    else:
        return ["## Metrics", "", "No evaluation came with this model.", ""]
    lines = ["## Metrics", "", "| " + " | ".join(names) + " |", "|" + "---|" * len(names),
             "| " + " | ".join(values) + " |", "", source]
    return lines + [""]


def _usage(facts: CardFacts) -> list[str]:
    repo = facts.repo
    if facts.kind == "tokenizer":
        python = ["from stage1_tokenizer import Tokenizer", "",
                  f'tokenizer = Tokenizer.from_pretrained("{repo}")  # or revision="..."',
                  f'assert tokenizer.fingerprint() == "{facts.fingerprint}"',
                  "codes = tokenizer.encode(images)  # images in [-1, 1], (B, 3, H, W) -> codes (B, h, w)",
                  "images = tokenizer.decode(codes)"]
        shell = [f"simvq pretokenize --tokenizer {repo} --data emoji --out runs/cache resolution=32",
                 f"simvq eval-tokenizer tokenizer={repo} resolution=32 out=runs/eval.json"]
    else:
        tok = (facts.tokenizer or {}).get("hub_id", "ORG/TOKENIZER")
        revision = (facts.tokenizer or {}).get("revision")
        tok_args = f'"{tok}"' + (f', revision="{revision}"' if revision else "")
        python = ["import torch", "from stage1_tokenizer import Tokenizer",
                  "from stage2_generator import Generator, SamplingConfig, generate", "",
                  f'generator = Generator.from_pretrained("{repo}")',
                  f"tokenizer = Tokenizer.from_pretrained({tok_args})  # the one whose codes it learned",
                  "assert tokenizer.fingerprint() == generator.config.tokenizer_fingerprint"]
        condition, guidance, given = request_kind_named(facts.conditioning).card_usage()
        if condition is not None:
            python += [f"condition = {condition}",
                       f"codes = generate(generator, condition, [0, 1, 2, 3], SamplingConfig(guidance_scale={guidance}",
                       "images = tokenizer.decode(codes.view(4, *generator.config.grid))  # (4, 3, H, W) in [-1, 1]"]
        shell = [f"simvq sample --generator {repo} --out runs/s {given}  # its tokenizer: {tok}, fingerprint-checked"]
    return ["## Use", "", "With simvq-gen installed; offline (`HF_HUB_OFFLINE=1`) the local Hub cache alone serves "
            f"it, after `hf download {repo}` where there is a network.", "",
            "```python", *python, "```", "", "```", *shell, "```", ""]


def _provenance(facts: CardFacts) -> list[str]:
    lines = ["## How it was made", ""]
    if facts.commands:
        lines += ["```", *facts.commands, "```", ""]
    env = facts.environment or {}
    if env:
        shown = ", ".join(f"{k} {env[k]}" for k in ("simvq_gen", "git", "torch", "python", "cuda") if env.get(k))
        lines += [f"Environment: {shown}.", ""]
    if facts.training_config:
        lines += ["<details><summary>The training config (the run's merged config.yaml)</summary>", "",
                  "```yaml", facts.training_config.rstrip(), "```", "", "</details>", ""]
    if len(lines) == 2:
        lines += ["No run directory came with this model: its provenance is its config and fingerprint.", ""]
    return lines


def model_card(facts: CardFacts) -> str:
    """README.md of a model repository: YAML front matter, then the sections in the module doc."""
    lines = [*_front_matter(facts), f"# {facts.repo}", "", *_what_it_is(facts)]
    if facts.grid:
        shown = "samples" if facts.kind == "generator" else "reconstructions"
        lines += [f"## {shown.capitalize()}", "", f"![{shown}]({facts.grid})", "", facts.grid_caption, ""]
    lines += [*_metrics(facts), *_usage(facts), *_provenance(facts),
              "## Config", "", "config.yaml, from which `from_pretrained` rebuilds the model:", "",
              "```yaml", facts.config_yaml.rstrip(), "```", "",
              "## Files", "", *(f"- `{name}`" for name in facts.files), "",
              "Only safetensors, YAML, JSON and text are loaded (nothing is unpickled).", ""]
    return "\n".join(lines)
