"""Stage-2 training: the generator on a code cache, through a DeepSpeed engine (ZeRO 0-3).

One process (`simvq train-generator`), or many under the `deepspeed` launcher or torchrun (gloo on CPU,
nccl on GPU). Exact resume: a DeepSpeed checkpoint holds the weights, optimizer and LR schedule; its client
state holds the step and the data position; condition dropout draws from (seed, step, rank) and the model
has no other randomness, so there is no RNG state to restore. N steps + resume + N steps = 2N steps.
"""
from __future__ import annotations

import copy
import math
import time
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from simvq_common.console import console, progress
from simvq_common.ema import update_ema, warmed_up_decay
from simvq_common import distributed
from simvq_common.config import canonical_container
from simvq_common.distributed import all_reduce_sum, barrier, rank, world_size
from simvq_common.errors import ConfigError, NonFiniteLoss, UserError
from simvq_common.preemption import PreemptionWatch
from simvq_common.run_dir import RunDir
from simvq_common.run_lock import holding_run_dir
from simvq_common.tracking import TrackingSettings
from simvq_common.numerics import set_deterministic, use_bf16, use_compile

from .cache_format import text_encoder_differences
from .cache_loader import CacheLoader
from .cache_reader import CodeCache
from .checkpoints import consolidated_weights, ema_weights, load_newest_intact_tag, save_tag, tag_of
from .conditionings import conditioning_for
from .config import GeneratorConfig, GeneratorTrainConfig
from .model import Generator, parameter_groups, training_flops_per_token

# DeepSpeed keys this trainer sets from the experiment config; a DeepSpeed file may not set them
OWNED_KEYS = {"train_batch_size": "data.batch_size", "train_micro_batch_size_per_gpu": "data.batch_size",
              "gradient_accumulation_steps": "data.grad_accum", "gradient_clipping": "optim.grad_clip",
              "optimizer": "optim.*", "scheduler": "optim.*", "bf16": "run.precision", "fp16": "run.precision"}
REPO = Path(__file__).resolve().parents[1]


class DeepSpeedConfigError(ConfigError):
    """A DeepSpeed file that sets what the experiment config owns, or is missing."""


# -- set-up ------------------------------------------------------------------------------------

def deepspeed_config(cfg: GeneratorTrainConfig, bf16: bool) -> dict:
    """The ZeRO file (configs/deepspeed/) plus the batch, clipping and precision from the experiment config."""
    path = Path(cfg.run.deepspeed)
    if not path.is_file() and not path.is_absolute() and (REPO / path).is_file():
        path = REPO / path  # the shipped configs/deepspeed/ files, from any working directory
    if not path.is_file():
        raise DeepSpeedConfigError(f"run.deepspeed={cfg.run.deepspeed}: no such file (see configs/deepspeed/)")
    ds = OmegaConf.to_container(OmegaConf.load(path), resolve=True) or {}
    clashes = sorted(set(ds) & set(OWNED_KEYS))
    if clashes:
        raise DeepSpeedConfigError(f"{path} sets {clashes}; these come from the experiment config "
                                   f"({', '.join(OWNED_KEYS[k] for k in clashes)}): remove them from {path}")
    ds.update(train_micro_batch_size_per_gpu=cfg.data.batch_size, gradient_accumulation_steps=cfg.data.grad_accum,
              gradient_clipping=cfg.optim.grad_clip, bf16={"enabled": bf16}, steps_per_print=10**9)
    ds.setdefault("zero_optimization", {"stage": 0})
    return ds


def lr_lambda(cfg: GeneratorTrainConfig):
    """LR multiplier per optimizer step: linear warm-up, then constant or cosine down to min_lr_ratio."""
    o, total = cfg.optim, cfg.run.steps
    if o.schedule not in ("constant", "cosine"):
        raise ConfigError(f"optim.schedule={o.schedule!r}: choose constant or cosine")

    def factor(step: int) -> float:
        if step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        if o.schedule == "constant":
            return 1.0
        progress_ = min(1.0, (step - o.warmup_steps) / max(1, total - o.warmup_steps))
        return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress_))
    return factor


def model_config_for(cfg: GeneratorConfig, cache: CodeCache) -> GeneratorConfig:
    """The model config with the cache's vocabulary, grid, classes and text encoder filled in; a value the
    config already sets must agree with the cache (both are named otherwise)."""
    m = cache.manifest
    text = cache.text_encoder or {}
    from_cache = {"codebook_size": m["codebook_size"], "grid": list(m["grid"]),
                  "num_classes": len(cache.class_names), "class_names": list(cache.class_names),
                  "text_dim": text.get("dim", 0), "text_encoder": text.get("name", ""),
                  "text_encoder_sha256": text.get("weights_sha256", ""), "text_features": text.get("features", ""),
                  "text_max_tokens": text.get("max_tokens", 0),
                  "tokenizer_fingerprint": m["tokenizer"]["fingerprint"], "tokenizer_path": m["tokenizer"]["path"]}
    # keys an experiment may pin (refused when the cache disagrees); the others are always the cache's
    unset = {"codebook_size": 0, "grid": [0, 0], "num_classes": 0, "text_dim": 0, "tokenizer_fingerprint": "",
             "text_encoder": "", "text_encoder_sha256": ""}
    for key, default in unset.items():
        mine, value = getattr(cfg, key), from_cache[key]
        if mine != default and mine != value:
            made_by = "text encoder" if key.startswith("text") else "tokenizer or dataset"
            raise UserError(f"model.{key}={mine} but the cache {cache.path} has {key} {value}: the cache was made "
                            f"by another {made_by}; use a matching cache or leave model.{key} unset")
    if conditioning_for(cfg).needs_text and not cache.has_text:
        raise UserError(f"model.conditioning={cfg.conditioning} but cache {cache.path} holds no text embeddings: "
                        f"pretokenize with text_embeddings=true")
    return replace(cfg, **from_cache)


def check_same_text_encoder(train: CodeCache, other: CodeCache) -> None:
    """A val cache's captions must be encoded like the training cache's: the generator reads one encoder."""
    a, b = train.text_encoder or {}, other.text_encoder or {}
    both = text_encoder_differences(a, b)
    if train.has_text and other.has_text and both:
        raise UserError(f"data.val_cache {other.path} was pre-tokenized with text encoder {b.get('name')!r}, the "
                        f"training cache {train.path} with {a.get('name')!r} ({both}): pre-tokenize both with one")


class GeneratorTrainer:
    def __init__(self, cfg: GeneratorTrainConfig) -> None:
        import deepspeed

        self.device = distributed.setup(group_of_one=True)  # DeepSpeed needs a group, even of one
        self.bf16 = use_bf16(cfg.run.precision, self.device)
        set_deterministic(cfg.run.deterministic)
        # data: the cache fixes the vocabulary; a val cache must come from the same tokenizer
        if not cfg.data.cache:
            raise UserError("data.cache is empty: give the code cache to train on (`simvq pretokenize` output)")
        self.cache = CodeCache(cfg.data.cache, expect_codebook_size=cfg.model.codebook_size or None,
                               expect_tokenizer=cfg.model.tokenizer_fingerprint or None)
        cfg = replace(cfg, model=model_config_for(cfg.model, self.cache))
        self.cfg = cfg
        self.conditioning = conditioning_for(cfg.model)
        text = self.conditioning.needs_text
        self.loader = CacheLoader(self.cache, cfg.data.batch_size, seed=cfg.run.seed, drop_last=True, text=text)
        self.val_cache = (CodeCache(cfg.data.val_cache, expect_codebook_size=cfg.model.codebook_size,
                                    expect_tokenizer=cfg.model.tokenizer_fingerprint) if cfg.data.val_cache else None)
        if self.val_cache is not None and text:
            check_same_text_encoder(self.cache, self.val_cache)
        # model and engine; the seed makes every rank build the same initial weights
        torch.manual_seed(cfg.run.seed)
        self.model = Generator(cfg.model, cfg.run.loss_chunk_mb)
        # the EMA: an fp32 copy of the initial weights beside the engine's, on the same device
        self.ema = (copy.deepcopy(self.model).requires_grad_(False).eval().to(self.device)
                    if cfg.optim.ema_decay else None)
        betas = tuple(cfg.optim.betas)
        optimizer = torch.optim.AdamW(parameter_groups(self.model, cfg.optim.weight_decay), lr=cfg.optim.lr,
                                      betas=betas)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
        self.ds_config = deepspeed_config(cfg, self.bf16)
        self.zero_stage = self.ds_config["zero_optimization"].get("stage", 0)
        if not 0.0 <= cfg.optim.ema_decay < 1.0:
            raise ConfigError(f"optim.ema_decay={cfg.optim.ema_decay} must lie in [0, 1) (0 = no EMA)")
        if self.ema is not None and self.zero_stage == 3:
            raise ConfigError(f"optim.ema_decay={cfg.optim.ema_decay} needs whole weights on every rank, which "
                              f"ZeRO-3 ({cfg.run.deepspeed}) partitions: use configs/deepspeed/zero2.yaml or set "
                              f"optim.ema_decay=0")
        self.engine, _, _, self.scheduler = deepspeed.initialize(model=self.model, optimizer=optimizer,
                                                                 lr_scheduler=scheduler, config=self.ds_config)
        if use_compile(cfg.run.compile, self.device):
            self.engine.compile()  # in place: the module's parameter names, and so the checkpoints, stay as they are
        self.step = 0
        self.checkpoints = Path(cfg.run.out_dir) / "checkpoints"
        self.run_dir = (RunDir(cfg.run.out_dir, cfg, resume=True, kind="generator-run",
                               tracking=TrackingSettings.of(cfg.run)) if rank() == 0 else None)
        self._resume()

    # -- checkpoints ------------------------------------------------------------------------------
    def identity(self) -> dict:
        """What a checkpoint must share with the run that resumes it."""
        identity = {"model": canonical_container(self.cfg.model), "cache": self.cache.fingerprint,
                    "world_size": world_size(), "zero_stage": self.zero_stage, "batch_size": self.cfg.data.batch_size,
                    "grad_accum": self.cfg.data.grad_accum, "bf16": self.bf16, "seed": self.cfg.run.seed}
        if self.ema is not None:  # only then: runs without an EMA resume checkpoints written before it existed
            identity["ema_decay"] = self.cfg.optim.ema_decay
        return identity

    def _resume(self) -> None:
        client = load_newest_intact_tag(self.engine, self.checkpoints, self.identity())
        if client is None:
            return
        self.step = client["step"]
        self.loader.load_state_dict(client["loader"])
        if self.ema is not None:
            self.ema.load_state_dict(ema_weights(self.checkpoints, tag_of(self.step)))
        if rank() == 0:
            console.print(f"resumed from {self.checkpoints} (step {self.step})")

    def save(self) -> None:
        save_tag(self.engine, self.checkpoints, self.step, self.identity(),
                 {"step": self.step, "loader": self.loader.state_dict()}, self.cfg.run.keep_checkpoints,
                 ema=None if self.ema is None else self.ema.state_dict())

    def export(self) -> Path:
        """Consolidated fp32 weights (the EMA's, when the run keeps one) + config as a generator directory (rebuilds
        without DeepSpeed)."""
        out = Path(self.cfg.run.out_dir) / "generator"
        state = None
        if self.ema is not None:
            state = self.ema.state_dict()
        elif self.zero_stage >= 1 and (self.zero_stage == 3 or self.bf16):
            # the fp32 master weights live in the optimizer's partitions: consolidate the saved checkpoint
            barrier()
            if rank() == 0:
                state = consolidated_weights(self.checkpoints, tag_of(self.step))
        elif self.bf16:
            # ZeRO-0 in bf16: DeepSpeed (0.19.8) wraps the optimizer in its FP16_Optimizer, whose fp32_groups hold
            # every rank's whole master copy. It has no public way out: it links no fragments for
            # safe_get_full_fp32_param (None) and saves no partitions for zero_to_fp32; so its groups are read
            names = {id(p): n for n, p in self.engine.module.named_parameters()}
            optimizer = self.engine.optimizer
            state = {names[id(p16)]: p32.detach().clone() for g16, g32 in
                     zip(optimizer.fp16_groups, optimizer.fp32_groups) for p16, p32 in zip(g16, g32)}
        else:  # fp32 at ZeRO 0-2: the module holds the full fp32 weights on every rank
            state = {k: v.float() for k, v in self.engine.module.state_dict().items()}
        if rank() == 0:
            model = Generator(self.cfg.model)
            model.load_state_dict(state)
            model.save_pretrained(out)
        barrier()
        return out

    # -- data ---------------------------------------------------------------------------------
    def batches(self):
        """Endless batches; the loader's epoch and position move with them (and are checkpointed)."""
        while True:
            for batch in self.loader:
                yield batch
            self.loader.set_epoch(self.loader.epoch + 1)

    def condition_of(self, batch):
        return self.conditioning.from_batch(batch, self.device)

    def dropout_mask(self, n: int, micro_step: int) -> torch.Tensor | None:
        """Which conditions to null for guidance: a pure function of (seed, step, micro-step, rank)."""
        if not self.conditioning.conditional or self.cfg.model.condition_dropout == 0:
            return None
        u = np.random.default_rng([self.cfg.run.seed, self.step, micro_step, rank()]).random(n)
        return torch.from_numpy(u < self.cfg.model.condition_dropout).to(self.device)

    def seed_model_randomness(self, micro_step: int) -> None:
        """Seed torch's generators from (seed, step, micro-step, rank), so that the model's own randomness (a
        decoder's dropout) is a function of the step too, and a resumed run draws what the straight one drew."""
        seed = np.random.default_rng([self.cfg.run.seed, self.step, micro_step, rank(), 1]).integers(2**62)
        torch.manual_seed(int(seed))

    # -- one optimizer step -------------------------------------------------------------------
    def train_step(self, batches) -> float:
        self.engine.train()
        total = torch.zeros((), dtype=torch.float64, device=self.device)  # nccl reduces device tensors only
        for micro in range(self.cfg.data.grad_accum):
            batch = next(batches)
            codes = batch.codes.to(self.device, non_blocking=True)
            self.seed_model_randomness(micro)
            loss = self.engine(codes, self.condition_of(batch), self.dropout_mask(len(codes), micro))
            self.engine.backward(loss)
            skipped = self.engine.skipped_steps
            self.engine.step()  # DeepSpeed steps the optimizer only at the accumulation boundary
            if self.engine.skipped_steps != skipped:  # no loss scaling here: any overflow is a real fault
                raise NonFiniteLoss(f"non-finite gradients at step {self.step} (DeepSpeed skipped the update); "
                                    f"training stopped, the last good checkpoint is in {self.checkpoints}")
            total += loss.detach().double()
        if self.ema is not None:  # after the accumulation boundary, where the engine has stepped
            update_ema(self.ema, self.engine.module, warmed_up_decay(self.cfg.optim.ema_decay, self.step))
        # one host sync per step (not per micro-step): a non-finite loss stops the run before any checkpoint
        mean = float(all_reduce_sum(total / self.cfg.data.grad_accum)) / world_size()
        if not math.isfinite(mean):
            raise NonFiniteLoss(f"non-finite loss at step {self.step}; training stopped, the last good "
                                f"checkpoint is in {self.checkpoints}. Lower optim.lr or set optim.grad_clip")
        self.step += 1
        return mean

    def validate(self) -> dict:
        """Mean next-code cross-entropy and perplexity on the val cache, of the weights and of their EMA."""
        record = self.val_loss(self.engine)
        if self.ema is not None and record:
            ema = self.val_loss(self.ema)
            record.update(val_loss_ema=ema["val_loss"], val_perplexity_ema=ema["val_perplexity"])
        return record

    @torch.no_grad()
    def val_loss(self, model) -> dict:
        """`model`'s (the engine, or the EMA) mean val loss; every rank runs the same batch count."""
        n = len(self.val_cache)
        if self.cfg.data.val_sequences:
            n = min(n, self.cfg.data.val_sequences)
        loader = CacheLoader(self.val_cache, self.cfg.data.batch_size, shuffle=False, drop_last=True,
                             text=self.conditioning.needs_text)
        model.eval()
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)  # (loss x sequences, sequences)
        remaining = n // world_size()  # equal on every rank: ZeRO-3 gathers weights in lockstep
        for batch in loader:
            if remaining <= 0:
                break
            take = min(remaining, len(batch.codes))
            remaining -= take
            condition = self.condition_of(batch)
            loss = model(batch.codes[:take].to(self.device), None if condition is None else condition[:take])
            sums[0] += loss.detach().double() * take
            sums[1] += take
        all_reduce_sum(sums)
        if sums[1] == 0:
            return {}
        val = float(sums[0] / sums[1])
        return {"val_loss": val, "val_perplexity": math.exp(val), "val_sequences": int(sums[1])}

    # -- the loop -----------------------------------------------------------------------------
    def train(self) -> Path:
        """Train to run.steps and export; TensorBoard / W&B are closed at the end, or when training stops. The
        sample grid joins the run from `simvq run` (pipelines/run.py): this stage has no tokenizer to decode."""
        with self.run_dir if self.run_dir is not None else nullcontext():
            return self._train()

    def _train(self) -> Path:
        run, cfg = self.cfg.run, self.cfg
        global_batch = cfg.data.batch_size * cfg.data.grad_accum * world_size()
        tokens_per_step = global_batch * cfg.model.sequence_length
        if rank() == 0:
            console.print(f"generator {cfg.model.size}: {self.model.num_parameters():,} parameters, K="
                          f"{cfg.model.codebook_size:,}, ZeRO-{self.zero_stage}, {world_size()} process(es), "
                          f"global batch {global_batch} ({tokens_per_step:,} tokens/step), "
                          f"{'bf16' if self.bf16 else 'fp32'}")
        batches = self.batches()
        flops_per_token = training_flops_per_token(cfg.model)
        tic, steps_timed = time.perf_counter(), 0
        with progress(disable=rank() != 0) as bar, PreemptionWatch(run.preemption_signals) as preemption:
            task = bar.add_task("generator", total=run.steps, completed=self.step, status="")
            while self.step < run.steps:
                loss = self.train_step(batches)
                steps_timed += 1
                record = {}
                if self.step % run.log_every == 0 or self.step == run.steps:
                    elapsed = time.perf_counter() - tic
                    record.update(loss=loss, perplexity=math.exp(min(loss, 50.0)), lr=self.scheduler.get_last_lr()[0],
                                  grad_norm=float(self.engine.get_global_grad_norm() or float("nan")),
                                  global_batch=global_batch, tokens_per_step=tokens_per_step,
                                  tokens_per_s=steps_timed * tokens_per_step / elapsed, epoch=self.loader.epoch)
                    # achieved model FLOP/s over all processes (MFU = this / the devices' peak; docs/BENCHMARKS.md)
                    record["model_flops_per_s"] = record["tokens_per_s"] * flops_per_token
                    tic, steps_timed = time.perf_counter(), 0
                paused = time.perf_counter()  # validation and checkpoints stay out of tokens/s
                if self.val_cache is not None and (self.step % run.val_every == 0 or self.step == run.steps):
                    record.update(self.validate())
                if record and rank() == 0:
                    self.run_dir.log(step=self.step, **record)
                    bar.update(task, status=f"loss {loss:.3f}" + (f" val {record['val_loss']:.3f}"
                                                                    if "val_loss" in record else ""))
                # every rank, every step: a signal to one stops all here
                preemption.checkpoint_phase(self.save, self.step % run.checkpoint_every == 0 or
                                            self.step == run.steps, run.out_dir, self.step)
                tic += time.perf_counter() - paused
                bar.update(task, completed=self.step)
        return self.export()


def train_generator(cfg: GeneratorTrainConfig) -> Path:
    """Train (or resume) the run in cfg.run.out_dir, which it holds alone; returns the exported generator
    directory."""
    distributed.setup(group_of_one=True)  # DeepSpeed needs a group, even of one
    with holding_run_dir(cfg.run.out_dir, "train-generator"):
        return GeneratorTrainer(cfg).train()
