"""Config schemas of stage 2 (typed dataclasses; loaded with simvq_common.config.load_config)."""
from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, ClassVar, Optional

from simvq_common.config import load_config
from simvq_common.errors import ConfigError

# Named decoder sizes: (width, depth, heads). B / L / XL are LlamaGen's GPT-B / L / XL; the small ones
# train on a CPU (the llama decoder's SwiGLU width: stage2_generator/decoders/llama.py).
SIZES: dict[str, tuple[int, int, int]] = {
    "nano": (64, 2, 4),
    "tiny": (128, 4, 4),
    "small": (256, 6, 8),
    "medium": (384, 6, 8),
    "B": (768, 12, 12),
    "L": (1024, 24, 16),
    "XL": (1280, 36, 20),
}


@dataclass
class GeneratorConfig:
    """Everything needed to rebuild a generator: saved as config.yaml beside its weights.

    `codebook_size`, `grid`, `num_classes`, `class_names`, `text_dim`, `tokenizer_fingerprint` and
    `tokenizer_path` come from the code cache the generator is trained on (0 / empty = fill in from the
    cache); the rest is the experiment's. The tokenizer's path and fingerprint let sampling decode with
    exactly the tokenizer that made the codes.
    """

    # left out of fingerprints and run identities while at their defaults (generators saved before them keep theirs)
    added_fields: ClassVar[tuple[str, ...]] = ("decoder", "decoder_options", "input_noise")

    size: str = "tiny"  # a key of SIZES
    decoder: str = "llama"  # a key of stage2_generator.decoders.DECODERS: llama (the project's own) | x-transformers
    # x-transformers: its Decoder's keyword arguments, e.g. {ff_dropout: 0.1}
    decoder_options: dict[str, Any] = field(default_factory=dict)
    conditioning: str = "class"  # a key of stage2_generator.conditionings.CONDITIONINGS: class | text | none
    rope: str = "2d"  # 2d: half of each head rotates by the code's row, half by its column | 1d: by sequence position
    rope_base: float = 10000.0
    text_tokens: int = 4  # prefix tokens a pooled text embedding is projected to (conditioning=text)
    condition_dropout: float = 0.1  # training: the condition is replaced by the null condition with this p
    # training: the share of input codes replaced by uniformly random ones, the targets kept (noisy teacher forcing,
    # a regulariser for a generator that learns a small data set by heart: docs/RECIPE.md)
    input_noise: float = 0.0
    checkpoint_activations: bool = False  # training: keep each block's input only, recompute the rest in backward
    codebook_size: int = 0
    grid: list[int] = field(default_factory=lambda: [0, 0])
    num_classes: int = 0
    class_names: list[str] = field(default_factory=list)  # label i is class_names[i]
    text_dim: int = 0
    text_encoder: str = ""  # the text encoder whose features the cache holds (conditioning=text)
    text_encoder_sha256: str = ""  # ... and its weights' hash (pipelines/text.py)
    text_features: str = ""  # pooled (one embedding per caption) | tokens (token features with a mask)
    text_max_tokens: int = 0  # token features: the prefix holds this many (padding masked out)
    tokenizer_fingerprint: str = ""
    tokenizer_path: str = ""

    @property
    def dim(self) -> int:
        return SIZES[self.size][0]

    @property
    def depth(self) -> int:
        return SIZES[self.size][1]

    @property
    def heads(self) -> int:
        return SIZES[self.size][2]

    @property
    def sequence_length(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def prefix_length(self) -> int:
        from .conditionings import conditioning_for  # the kinds build modules: torch is imported only here

        return conditioning_for(self).prefix_length(self)

    def check(self) -> None:
        """Refuse an unbuildable config, naming the key and the fix."""
        if self.size not in SIZES:
            raise ConfigError(f"model.size={self.size!r} is not a registered size: choose one of {sorted(SIZES)}")
        from .conditionings import conditioning_for
        from .conditionings.pooled_text import TEXT_FEATURES

        from .decoders import decoder_for

        kind = conditioning_for(self)  # an unknown kind is refused here
        decoder_for(self).check(self)
        if self.rope not in ("1d", "2d"):
            raise ConfigError(f"model.rope={self.rope!r}: choose 1d or 2d")
        if self.codebook_size < 2 or len(self.grid) != 2 or min(self.grid) < 1:
            raise ConfigError(f"model.codebook_size={self.codebook_size} / model.grid={self.grid} are unset: they "
                              f"come from the code cache the generator is trained on")
        kind.check(self)  # what this kind needs (class names, text widths ...)
        if self.text_features not in TEXT_FEATURES:
            raise ConfigError(f"model.text_features={self.text_features!r}: it comes from the cache (pooled or "
                              f"tokens)")
        if self.rope == "2d" and (self.dim // self.heads) % 4:
            raise ConfigError(f"2d rope needs a head width divisible by 4; size {self.size} has {self.dim // self.heads}")
        if not 0.0 <= self.condition_dropout < 1.0:
            raise ConfigError(f"model.condition_dropout={self.condition_dropout} must lie in [0, 1)")
        if not 0.0 <= self.input_noise < 1.0:
            raise ConfigError(f"model.input_noise={self.input_noise} must lie in [0, 1)")


@dataclass
class GeneratorDataConfig:
    cache: str = ""  # the training split's code cache (`simvq pretokenize`)
    val_cache: str = ""  # a held-out split's code cache: validation loss and perplexity ("" = none)
    batch_size: int = 32  # sequences per process per micro-step
    grad_accum: int = 1  # micro-steps per optimizer step; global batch = batch_size x grad_accum x processes
    val_sequences: int = 0  # validation sequences per evaluation (0 = the whole val cache)


@dataclass
class GeneratorOptimConfig:
    # fields added after runs were saved without them: left out of run identities while at their defaults
    added_fields: ClassVar[tuple[str, ...]] = ("ema_decay",)
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    weight_decay: float = 0.05  # on >= 2-D weights only
    warmup_steps: int = 0  # linear warm-up from lr / warmup_steps
    schedule: str = "constant"  # constant | cosine (to min_lr_ratio x lr at run.steps)
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0  # max global grad norm; 0 = off
    # an fp32 EMA of the weights, validated beside them and exported instead (0 = off: the last step's weights);
    # its decay is warmed up, min(ema_decay, (1 + n) / (10 + n)) at update n (simvq_common/ema.py); ZeRO 0-2
    # only; under bf16 it averages the module's bf16 weights (DeepSpeed keeps the fp32 masters partitioned)
    ema_decay: float = 0.0


@dataclass
class GeneratorRunConfig:
    out_dir: str = "runs/generator"
    steps: int = 1000  # optimizer steps
    seed: int = 0  # initial weights, data order, condition dropout
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16
    deterministic: bool = False  # deterministic CUDA kernels: bitwise resume on GPU, at some speed (docs/RECIPE.md)
    deepspeed: str = "configs/deepspeed/zero2.yaml"  # the ZeRO part of the DeepSpeed config
    loss_chunk_mb: float = 256.0  # fp32 logits held at once by the loss (kept whole when they fit, else chunked)
    compile: Optional[bool] = None  # torch.compile the model: null = auto (on CUDA, off on CPU) | true | false
    log_every: int = 10
    val_every: int = 200
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    # signals that end the run at the next step boundary, checkpointed (a scheduler's preemption; [] = none)
    preemption_signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])
    tensorboard: bool = True  # metrics (and `simvq run`'s sample grid) as TensorBoard events in out_dir/tensorboard/
    wandb: str = ""  # a Weights & Biases project to log to as well ("" = none); files in out_dir/wandb/
    wandb_mode: str = "auto"  # online | offline | auto (WANDB_MODE, else offline under HF_HUB_OFFLINE=1, else online)


@dataclass
class GeneratorTrainConfig:
    """One file describes a whole stage-2 experiment (configs/generator/*.yaml)."""

    model: GeneratorConfig = field(default_factory=GeneratorConfig)
    data: GeneratorDataConfig = field(default_factory=GeneratorDataConfig)
    optim: GeneratorOptimConfig = field(default_factory=GeneratorOptimConfig)
    run: GeneratorRunConfig = field(default_factory=GeneratorRunConfig)


@dataclass
class SamplingConfig:
    guidance_scale: float = 1.0  # s: 1 = no guidance, 0 = unconditional, typical 1.5-4
    guidance_schedule: str = "constant"  # constant | linear (1 at the first code up to s at the last)
    temperature: float = 1.0  # 0 = argmax
    top_k: int = 0  # keep the k most likely codes; 0 = all
    top_p: float = 1.0  # keep the smallest set of codes whose probability reaches p; 1 = all
    seed: int = 0
    compile: bool = False  # torch.compile the decode step (opt-in: slower than eager on the CPU at size small, docs/BENCHMARKS.md)

    def check(self, conditional: bool) -> None:
        if self.guidance_scale < 0:
            raise ConfigError(f"guidance_scale={self.guidance_scale}: must be >= 0 (1 = off, 0 = unconditional)")
        if self.guidance_schedule not in ("constant", "linear"):
            raise ConfigError(f"guidance_schedule={self.guidance_schedule!r}: choose constant or linear")
        if not conditional and self.guidance_scale != 1.0:
            raise ConfigError("guidance needs a conditional generator; this one is unconditional: set guidance_scale=1")
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ConfigError(f"temperature={self.temperature} (>= 0), top_k={self.top_k} (>= 0) and "
                              f"top_p={self.top_p} (in (0, 1]) out of range")
        if self.seed < 0:
            raise ConfigError(f"seed={self.seed} must be >= 0")


RECOMMENDED_SAMPLING = "sampling.yaml"  # a generator directory's own sampler settings (optional)


def recommended_sampling(sampling: SamplingConfig, generator_dir: str | Path) -> SamplingConfig:
    """`sampling` with every setting still at its schema default replaced by the generator's recommended one (the
    sampling.yaml beside its weights, as the ready-made models carry), when it has one."""
    path = Path(generator_dir) / RECOMMENDED_SAMPLING
    if not path.is_file():
        return sampling
    recommended, defaults = load_config(SamplingConfig, path), SamplingConfig()
    return replace(sampling, **{f.name: getattr(recommended, f.name) for f in fields(SamplingConfig)
                                if getattr(sampling, f.name) == getattr(defaults, f.name)})
