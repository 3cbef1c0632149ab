"""`simvq sample`: draw images from a generator (stage 2) and decode them with its tokenizer (stage 1).

Sample i of a run has the global index g = first_index + i, and g alone fixes it: its code draws are the
uniforms of numpy's default_rng([seed, g]) and its condition is slot g mod C of the requested classes or
prompts (C of them, round-robin, so any run of consecutive indices is balanced to within one sample), or, with
class_counts, entry g of the counts' proportional interleaving (pipelines/conditions.py). So a sample does not
depend on the batch size, on the number of processes, or on how a large run is split into several calls
(first_index=0 num_samples=25000, then first_index=25000 num_samples=25000, with the same class_counts).

Under torchrun rank r draws the positions r, r + world, ..., writes them to disk (and its own PNGs), and rank 0
streams every part into samples.npz in position order, never holding them all in memory. The tokenizer must be
the one whose codes the generator learned: its fingerprint is checked against the one the generator records.
With prefix_image, the top prefix_rows rows of the image's codes are kept and the rest generated (image
completion). The models load once (`load_models`); `sample_with` draws from them request after request
(`simvq serve`, pipelines/serve.py), the same files and pixels as `sample`.

Writes into `out`: samples.npz (arr_0: the images, uint8 NHWC, the key the ADM evaluation suite reads; labels,
indices, prompts, codes), grid.png, png/ when save_pngs, and sampling.json (every parameter, the seeds rule,
fingerprints, counts, environment, time).
"""
from __future__ import annotations

import datetime
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipelines.conditionings import build_conditions, request_kind
from pipelines.conditions import Conditions, sample_count
from pipelines.tokenizer_match import load_matching_tokenizer
from pipelines.config import SampleConfig
from pipelines.sample_files import parts_through_disk, write_pngs, write_samples
from pipelines.text import TextEncoder
from simvq_common import distributed
from simvq_common.console import console, progress
from simvq_common.errors import UserError
from simvq_common.hub import model_location, model_source_exists, resolve_model_dir
from simvq_common.provenance import command_line, environment
from simvq_common.ready_made import READY_MADE
from stage1_tokenizer.tokenizer import Tokenizer
from image_data.transforms import center_crop, image_to_rgb, to_model_range, to_uint8
from stage2_generator.config import GeneratorConfig, SamplingConfig, recommended_sampling
from stage2_generator.model import Generator
from stage2_generator.sampling import generate

SEEDS_RULE = ("sample with global index g: its code draws are uniforms from numpy default_rng([seed, g]), one per "
              "code position; its condition is conditions[g mod len(conditions)], or with class_counts "
              "classes[class_order(class_counts)[g]] (pipelines/conditions.py)")
RANK0_DONE = ".rank0-done.json"  # under torchrun: rank 0's record that the run's files are written


# ------------------------------------------------------------------------------------------------
# Loading and checking what the run needs
# ------------------------------------------------------------------------------------------------

def _check(cfg: SampleConfig) -> None:
    if not cfg.generator:
        raise UserError("set generator=DIR (a directory written by `simvq train-generator`)")
    if not model_source_exists(cfg.generator):
        raise UserError(f"generator directory {cfg.generator} does not exist: pass the output directory of "
                        f"`simvq train-generator` (the one holding config.yaml and model.safetensors), a Hub id, or a "
                        f"ready-made model's name ({', '.join(READY_MADE)})")
    if cfg.sampling_preset not in ("model", "none"):
        raise UserError(f"sampling_preset={cfg.sampling_preset!r}: choose model (the generator's recommended "
                        f"settings under the defaults) or none")
    if not cfg.out:
        raise UserError("set out=DIR, the directory to write the samples into")
    if cfg.num_samples < 0 or cfg.per_class < 0 or cfg.per_prompt < 0 or cfg.first_index < 0 or cfg.batch_size < 1:
        raise UserError(f"num_samples={cfg.num_samples}, per_class={cfg.per_class}, per_prompt={cfg.per_prompt} and "
                        f"first_index={cfg.first_index} must be >= 0, batch_size={cfg.batch_size} >= 1")
    if cfg.prefix_rows and not cfg.prefix_image:
        raise UserError(f"prefix_rows={cfg.prefix_rows} needs prefix_image=FILE (the image whose top rows are kept)")


def load_image(path: str, resolution: int) -> torch.Tensor:
    """(1, 3, R, R) in [-1, 1]: the shorter side resized to R, then the centre crop (as the evaluation splits)."""
    try:
        with Image.open(path) as img:
            img.load()
            rgb = image_to_rgb(img)
    except (OSError, ValueError) as err:  # missing, unreadable or truncated file
        raise UserError(f"prefix_image {path} cannot be read ({type(err).__name__}: {err}): "
                        f"pass an image file") from None
    pixels = np.array(center_crop(rgb, resolution), dtype=np.uint8)
    return to_model_range(torch.from_numpy(pixels).permute(2, 0, 1))[None]


@torch.no_grad()
def prefix_codes(cfg: SampleConfig, model_cfg: GeneratorConfig, tokenizer: Tokenizer,
                 device: torch.device) -> torch.Tensor | None:
    """(1, prefix_rows * w) codes: the top rows of the prefix image's codes, in raster order; None without one."""
    if not cfg.prefix_image:
        return None
    rows, cols = model_cfg.grid
    if not 1 <= cfg.prefix_rows <= rows - 1:
        raise UserError(f"prefix_rows={cfg.prefix_rows}: set it in [1, {rows - 1}] (the code grid has {rows} rows; "
                        f"the rest are generated)")
    if rows != cols:
        raise UserError(f"prefix_image needs a square code grid (images are centre-cropped); this one is {rows}x{cols}")
    image = load_image(cfg.prefix_image, rows * tokenizer.downsample_factor).to(device)
    codes = tokenizer.encode(image)
    return codes[:, :cfg.prefix_rows].reshape(1, -1).long()


# ------------------------------------------------------------------------------------------------
# Generating
# ------------------------------------------------------------------------------------------------

@torch.no_grad()
def generate_images(generator: Generator, tokenizer: Tokenizer, conditions: Conditions, indices: np.ndarray,
                    sampling: SamplingConfig, batch_size: int, prefix: torch.Tensor | None = None,
                    on_batch=None) -> tuple[np.ndarray, np.ndarray]:
    """(codes int32 (n, h*w), images uint8 (n, H, W, 3)) of the samples with global indices `indices`."""
    h, w = generator.config.grid
    codes_out, images_out = [], []
    for start in range(0, len(indices), batch_size):
        batch = indices[start:start + batch_size]
        condition = None
        if conditions.model_input is not None:
            slots = torch.from_numpy(conditions.slots(batch)).to(conditions.model_input.device)
            condition = conditions.model_input[slots]
        given = None if prefix is None else prefix.expand(len(batch), -1)
        codes = generate(generator, condition, batch.tolist(), sampling, prefix_codes=given)
        images = to_uint8(tokenizer.decode(codes.view(len(batch), h, w)).float())
        codes_out.append(codes.int().cpu().numpy())
        images_out.append(images.permute(0, 2, 3, 1).cpu().numpy())
        if on_batch is not None:
            on_batch(len(batch))
    if not codes_out:  # this rank got no positions (more processes than samples)
        size = (h * tokenizer.downsample_factor, w * tokenizer.downsample_factor)
        return np.zeros((0, h * w), np.int32), np.zeros((0, *size, 3), np.uint8)
    return np.concatenate(codes_out), np.concatenate(images_out)


# ------------------------------------------------------------------------------------------------
# The run: the models loaded once, then one draw (`simvq sample`) or many (`simvq serve`)
# ------------------------------------------------------------------------------------------------

@dataclass
class Models:
    """A generator, the tokenizer whose codes it learned (and its text encoder), loaded once on `device`."""

    generator: Generator
    generator_fingerprint: str
    tokenizer: Tokenizer
    tokenizer_dir: str
    device: torch.device
    text_encoder: TextEncoder | None = None  # None: each draw loads its own (build_conditions); a server sets it


def load_models(cfg: SampleConfig) -> Models:
    """cfg.generator and its matching tokenizer on cfg.device (under torchrun: after joining the group)."""
    distributed.setup()  # join the launcher's group, if any (a lone process joins none)
    device = distributed.device_for(cfg.device)
    generator_dir = resolve_model_dir(cfg.generator)  # a directory, or a Hub id's snapshot
    generator = Generator.from_pretrained(generator_dir).to(device)
    tokenizer, tokenizer_dir = load_matching_tokenizer(cfg.tokenizer, cfg.generator, generator.config, device,
                                                       generator_dir)
    return Models(generator, generator.fingerprint(), tokenizer, tokenizer_dir, device)


@dataclass
class Plan:
    """What one call draws: the global indices, each one's condition (`conditions.slots`) and the prefix codes."""

    indices: np.ndarray
    conditions: Conditions
    prefix: torch.Tensor | None
    labels: np.ndarray  # each index's class id (-1: none)
    prompts: list[str]  # each index's prompt ("": none)


def plan_samples(models: Models, cfg: SampleConfig) -> Plan:
    """Check `cfg` against the loaded models (sampling, conditions, prefix, count) and fix its indices."""
    model_cfg = models.generator.config
    cfg.sampling.check(models.generator.condition.conditional)
    conditions = build_conditions(cfg, model_cfg, models.device, models.text_encoder)
    prefix = prefix_codes(cfg, model_cfg, models.tokenizer, models.device)
    num_samples = sample_count(cfg, conditions, request_kind(model_cfg).per_condition(cfg))
    if num_samples < 1:
        raise UserError("nothing to sample: set num_samples (or per_class / per_prompt) >= 1")
    indices = cfg.first_index + np.arange(num_samples, dtype=np.int64)
    slots = conditions.slots(indices)
    return Plan(indices, conditions, prefix, np.array(conditions.class_ids, np.int64)[slots],
                [conditions.prompts[s] for s in slots])


def draw(models: Models, plan: Plan, indices: np.ndarray, cfg: SampleConfig, on_batch=None):
    """(codes, images) of the planned samples with global indices `indices`, with deterministic kernels."""
    with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True):
        return generate_images(models.generator, models.tokenizer, plan.conditions, indices, cfg.sampling,
                               cfg.batch_size, plan.prefix, on_batch=on_batch)


def sampling_record(cfg: SampleConfig, models: Models, plan: Plan, image_size, world: int,
                    started_at: datetime.datetime, seconds: float, draw_seconds: float) -> dict:
    """sampling.json: every parameter, the seeds rule, both fingerprints, the counts, environment and time."""
    model_cfg, conditions, prefix = models.generator.config, plan.conditions, plan.prefix
    per_condition = np.bincount(conditions.slots(plan.indices), minlength=len(conditions.names)).tolist()
    return {
        "command": command_line(),
        "config": asdict(cfg),
        "seeds": SEEDS_RULE,
        "generator": {"path": model_location(cfg.generator), "fingerprint": models.generator_fingerprint,
                      "size": model_cfg.size, "conditioning": model_cfg.conditioning, "grid": list(model_cfg.grid),
                      "codebook_size": model_cfg.codebook_size},
        "tokenizer": {"path": model_location(models.tokenizer_dir),
                      "fingerprint": model_cfg.tokenizer_fingerprint},  # load_matching_tokenizer refused any other
        "classes": ({"ids": conditions.class_ids, "names": conditions.names}
                    if request_kind(model_cfg).has_classes else None),
        "text_encoder": conditions.text_encoder,
        "prompt_source": conditions.prompt_source,  # the prompts themselves are in samples.npz
        "prefix": None if prefix is None else {"image": str(Path(cfg.prefix_image).resolve()),
                                               "rows": cfg.prefix_rows, "codes": prefix[0].tolist()},
        "counts": {"num_samples": len(plan.indices), "first_index": int(plan.indices[0]),
                   "last_index": int(plan.indices[-1]), "per_condition": per_condition,
                   "image_size": list(image_size), "world_size": world, "batch_size": cfg.batch_size},
        "environment": environment(),
        "started": started_at.isoformat(timespec="seconds"),
        "seconds": seconds,
        "draw_seconds": draw_seconds,  # drawing and decoding rank 0's samples (seconds also holds model loading)
    }


def sample_with(models: Models, cfg: SampleConfig) -> dict:
    """`cfg`'s samples from models already loaded, drawn in this process and written into cfg.out as `sample`
    writes them (the same files, pixels and seeds); returns sampling.json's record. The server's request."""
    started_at, start = datetime.datetime.now(datetime.timezone.utc), time.perf_counter()
    _check(cfg)
    plan = plan_samples(models, cfg)
    drawing = time.perf_counter()
    codes, images = draw(models, plan, plan.indices, cfg)
    draw_seconds = time.perf_counter() - drawing
    meta = sampling_record(cfg, models, plan, images.shape[1:3], 1, started_at, time.perf_counter() - start,
                           draw_seconds)
    if cfg.save_pngs:
        write_pngs(Path(cfg.out), plan.indices, images)
    write_samples(cfg.out, images, labels=plan.labels, indices=plan.indices, codes=codes, prompts=plan.prompts,
                  meta=meta)
    return meta


def sample(cfg: SampleConfig) -> dict:
    """Draw, decode and write the samples `cfg` describes; returns a summary (out, num_samples, fingerprints)."""
    started_at, start = datetime.datetime.now(datetime.timezone.utc), time.perf_counter()
    _check(cfg)
    models = load_models(cfg)  # joins the launcher's process group (distributed.device_for)
    if cfg.sampling_preset == "model":
        cfg = replace(cfg, sampling=recommended_sampling(cfg.sampling, resolve_model_dir(cfg.generator)))
    rank, world = distributed.rank(), distributed.world_size()
    plan = plan_samples(models, cfg)
    mine = plan.indices[rank::world]  # any split gives the same samples: each depends on its index alone
    with progress(disable=rank != 0) as bar:
        task = bar.add_task("sample", total=len(mine), status=f"{world} process(es)")
        drawing = time.perf_counter()
        codes, images = draw(models, plan, mine, cfg, on_batch=lambda n: bar.advance(task, n))
        draw_seconds = time.perf_counter() - drawing  # this rank's codes drawn and decoded, models already loaded
    seconds = time.perf_counter() - start  # loading, sampling and decoding; writing the files not included
    summary = {"out": str(cfg.out), "num_samples": len(plan.indices), "generator_fingerprint":
               models.generator_fingerprint, "tokenizer_fingerprint": models.generator.config.tokenizer_fingerprint}
    meta = sampling_record(cfg, models, plan, images.shape[1:3], world, started_at, seconds, draw_seconds)
    out, done = Path(cfg.out), Path(cfg.out) / RANK0_DONE
    if cfg.save_pngs:  # each rank its own
        write_pngs(out, mine, images)
    if rank == 0:
        done.unlink(missing_ok=True)  # before the ranks meet below: the others then wait for this run's
    if world > 1:
        parts = parts_through_disk(out, codes=codes, images=images)
        codes, images = (None, None) if parts is None else (parts["codes"], parts["images"])

    def write() -> dict:
        write_samples(out, images, labels=plan.labels, indices=plan.indices, codes=codes, prompts=plan.prompts,
                      meta=meta)
        shutil.rmtree(out / "parts", ignore_errors=True)
        console.print(f"{len(images)} samples ({len(plan.conditions.names)} condition(s)) in {seconds:.1f} s -> {out}")
        return summary

    # rank 0 streams ~10 GB at 50k x 256 px: the others wait for its record, not in a collective that times out
    return distributed.run_on_rank0(write, done)
