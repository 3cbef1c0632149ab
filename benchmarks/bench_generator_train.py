"""Generator training throughput and memory per rank: ZeRO-0 against ZeRO-3 on 2 CPU processes.

    python benchmarks/bench_generator_train.py [--size small] [--codebook-size 65536] [--grid 16] [--batch 4]
                                               [--steps 20] [--log-every 5] [--quick]

`stage2_generator.train.GeneratorTrainer` (DeepSpeed, gloo, fp32, AdamW) trains a class-conditioned generator
(default size "small", K = 65,536, 16 x 16 = 256 codes per sequence, batch 4 per rank) for `--steps` optimizer
steps on a synthetic code cache (random codes, 1,000 classes, written by the cache format's own writer:
`bench_cache_loader.build_cache`), in three runs:

- ZeRO-0 (configs/deepspeed/zero0.yaml) on 1 process with one torch thread (`--reference-threads`): the
  reference, so the ideal 2-process speed-up is 2x;
- ZeRO-0 on 2 processes (spawned with torch.multiprocessing, one core each);
- ZeRO-3 (configs/deepspeed/zero3.yaml) on the same 2 processes.

Tokens/s comes from rank 0's metrics.jsonl `tokens_per_s` records (global batch x codes per step / time of
the window), the first log window left out as warm-up: total tokens / total time of the other windows.
Per rank it records: the RSS high-water mark during the training steps (VmHWM, reset when training starts,
read before the final export) and its increase over the RSS at the start of training; the process's peak
before training (imports, cache, model construction, DeepSpeed set-up); and the bytes of every live CPU
tensor at the end of training (parameters or their partitions, gradients, optimizer state, buffers;
storages counted once), set against the model state a rank is expected to hold between steps: at ZeRO-0
12 bytes per parameter (weight and Adam's two moments; DeepSpeed frees the gradients after each step, they
add 4 more during the backward); at ZeRO-3 16 / world size (weights, gradients and moments partitioned; in
fp32 DeepSpeed keeps no second master copy), plus 4 bytes per parameter kept whole on every rank (those
under the persistence threshold), plus the contiguous-gradients reduce bucket of `reduce_bucket_size` fp32
elements (50M = 200 MB per rank in zero3.yaml: a fixed cost that partitioning repays only above ~25M
parameters at the peak, ~50M between steps, on 2 ranks).

One torch thread per process: on a shared machine where another job holds a core, 2 threads in one process
made the quick run's training 30x slower than 1 (every op's parallel region waits for the busy core).
Writes benchmarks/results/generator_train.json and the generator_train section of docs/BENCHMARKS.md;
`--quick` (size tiny, K = 16,384, 8 x 8 grid, batch 2, 6 steps logged every 2) prints only and writes nothing.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before DeepSpeed is imported, here and in spawned workers
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from rich.console import Console  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.bench_cache_loader import build_cache  # noqa: E402
from benchmarks.common import (MIB, REPO, cpu_times, markdown_table, other_cpu_share,  # noqa: E402
                               parse_quick_args, proc_status_kib, provenance, publish, reset_peak_rss)
from simvq_common import distributed  # noqa: E402
from simvq_common.distributed import free_port  # noqa: E402
from simvq_common.run_dir import read_metrics  # noqa: E402
from stage2_generator.config import GeneratorConfig, GeneratorDataConfig, GeneratorRunConfig, GeneratorTrainConfig  # noqa: E402

DEEPSPEED = {0: REPO / "configs" / "deepspeed" / "zero0.yaml", 3: REPO / "configs" / "deepspeed" / "zero3.yaml"}
SETTINGS = [(1, 0), (2, 0), (2, 3)]  # (processes, ZeRO stage); the first is the reference
QUICK = {"size": "tiny", "codebook_size": 16384, "grid": 8, "batch": 2, "steps": 6, "log_every": 2}


# ----------------------------------------------------------------------------------------- worker

def live_tensors(module: torch.nn.Module, top: int = 5) -> dict:
    """Bytes of every live CPU tensor storage in this process, each storage once (views share one), and the
    largest storages. Tensors made in C++ have no Python object until one is asked for: the gradients are
    fetched first so that the garbage collector's list holds them."""
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    gc.collect()
    storages = {}
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor) and obj.device.type == "cpu":
                storage = obj.untyped_storage()
                if storage.nbytes() and storage.data_ptr() not in storages:
                    storages[storage.data_ptr()] = {"bytes": storage.nbytes(), "shape": list(obj.shape),
                                                    "dtype": str(obj.dtype).removeprefix("torch.")}
        except Exception:  # tensors without storage (meta, wrapper subclasses)
            continue
    largest = sorted(storages.values(), key=lambda s: -s["bytes"])[:top]
    return {"live_tensor_bytes": sum(s["bytes"] for s in storages.values()), "largest_storages": largest,
            "grad_bytes_at_end": sum(g.nbytes for g in grads)}


def train_worker(rank: int, world: int, port: int, cfg: GeneratorTrainConfig, threads: int, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    from stage2_generator.train import GeneratorTrainer

    record = {"rank": rank, "threads": threads, "rss_before_trainer_bytes": proc_status_kib("VmRSS") * 1024}

    class MeasuredTrainer(GeneratorTrainer):
        def batches(self):  # called once, when the training loop starts
            record["peak_before_training_bytes"] = proc_status_kib("VmHWM") * 1024
            reset_peak_rss()
            record["rss_train_start_bytes"] = proc_status_kib("VmRSS") * 1024
            return super().batches()

        def export(self):  # after the last step (and the final checkpoint), before consolidating the weights
            record["peak_training_bytes"] = proc_status_kib("VmHWM") * 1024
            record.update(live_tensors(self.engine.module))
            params = list(self.engine.module.parameters())
            record["parameters"] = sum(getattr(p, "ds_numel", p.numel()) for p in params)
            record["persistent_parameters"] = sum(p.ds_numel for p in params if getattr(p, "ds_persist", False))
            return super().export()

    try:
        MeasuredTrainer(cfg).train()
        record["peak_after_export_bytes"] = proc_status_kib("VmHWM") * 1024
        Path(out, f"rank{rank}.json").write_text(json.dumps(record))
    finally:
        distributed.shutdown()


# ------------------------------------------------------------------------------------- driver side

def throughput(metrics: list[dict]) -> dict:
    """Tokens/s over the logged windows after the first (warm-up): total tokens / total seconds."""
    windows, previous = [], 0
    for m in metrics:
        if "tokens_per_s" in m:
            tokens = (m["step"] - previous) * m["tokens_per_step"]
            windows.append({"steps": [previous, m["step"]], "tokens": tokens, "seconds": tokens / m["tokens_per_s"],
                            "tokens_per_s": m["tokens_per_s"], "loss": m["loss"]})
            previous = m["step"]
    timed = windows[1:]
    if not timed:
        raise SystemExit("fewer than two log windows: raise --steps or lower --log-every")
    return {"windows": windows, "tokens_per_s": sum(w["tokens"] for w in timed) / sum(w["seconds"] for w in timed),
            "timed_steps": timed[-1]["steps"][1] - timed[0]["steps"][0], "final_loss": windows[-1]["loss"]}


def expected_state_bytes(zero: int, world: int, parameters: int, persistent: int) -> int:
    """Bytes of model state a rank holds between steps. ZeRO-0: the weights and Adam's two moments, 12 bytes
    per parameter (DeepSpeed frees the gradients after each step; during the backward they add 4 more).
    ZeRO-3: weights, gradients and moments partitioned, 16 / world bytes per parameter; the parameters under
    the persistence threshold also whole on every rank; with contiguous_gradients, a reduce bucket of
    reduce_bucket_size fp32 elements."""
    if zero == 0:
        return 12 * parameters
    z = OmegaConf.to_container(OmegaConf.load(DEEPSPEED[zero]))["zero_optimization"]
    bucket = 4 * int(z.get("reduce_bucket_size", 500_000_000)) if z.get("contiguous_gradients", True) else 0
    return 16 * -(-parameters // world) + 4 * persistent + bucket


def run_setting(world: int, zero: int, threads: int, args, cache: Path, tmp: Path) -> dict:
    out = tmp / f"world{world}_zero{zero}_threads{threads}"
    out.mkdir()
    cfg = GeneratorTrainConfig(
        model=GeneratorConfig(size=args.size, conditioning="class"),
        data=GeneratorDataConfig(cache=str(cache), batch_size=args.batch),
        run=GeneratorRunConfig(out_dir=str(out / "run"), steps=args.steps, precision="fp32",
                               deepspeed=str(DEEPSPEED[zero]), log_every=args.log_every, val_every=10**9,
                               checkpoint_every=10**9, keep_checkpoints=1))
    mp.start_processes(train_worker, args=(world, free_port(), cfg, threads, str(out)), nprocs=world,
                       start_method="spawn", join=True)
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]
    for r in ranks:
        r["training_increase_bytes"] = r["peak_training_bytes"] - r["rss_train_start_bytes"]
        r["expected_state_bytes"] = expected_state_bytes(zero, world, r["parameters"], r["persistent_parameters"])
    return {"processes": world, "zero_stage": zero, "threads_per_process": threads, "ranks": ranks,
            **throughput(read_metrics(out / "run" / "metrics.jsonl")),
            "config": {"deepspeed": str(DEEPSPEED[zero].relative_to(REPO)), **asdict(cfg.data),
                       "steps": args.steps, "log_every": args.log_every}}


def mib(n_bytes: float) -> str:
    return f"{n_bytes / MIB:,.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", default="small", help="a key of stage2_generator.config.SIZES")
    parser.add_argument("--codebook-size", type=int, default=65536)
    parser.add_argument("--grid", type=int, default=16, help="codes per side of the synthetic cache")
    parser.add_argument("--batch", type=int, default=4, help="sequences per rank per step")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--log-every", type=int, default=5, help="steps per tokens/s window (the first is warm-up)")
    parser.add_argument("--sequences", type=int, default=512, help="sequences in the synthetic cache")
    parser.add_argument("--reference-threads", type=int, default=1,
                        help="torch threads of the 1-process run (the 2-process runs use one each)")
    parser.add_argument("--quick", action="store_true",
                        help="size tiny, K = 16,384, 8 x 8 grid, batch 2, 6 steps; print only, write nothing")
    args = parse_quick_args(parser, QUICK)
    console = Console()
    measured = []
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "cache"
        build_cache(cache, args.sequences, args.grid, args.codebook_size, shards=2)
        load_start = cpu_times()
        for world, zero in SETTINGS:
            threads = args.reference_threads if world == 1 else max(1, os.cpu_count() // world)
            console.log(f"ZeRO-{zero}, {world} process(es) x {threads} thread(s): {args.steps} steps ...")
            measured.append(run_setting(world, zero, threads, args, cache, Path(tmp)))
            m = measured[-1]
            console.log(f"ZeRO-{zero}, {world} process(es): {m['tokens_per_s']:,.0f} tokens/s (windows: "
                        + ", ".join(f"{w['tokens_per_s']:,.0f}" for w in m["windows"]) + "), peak RSS in training "
                        + ", ".join(mib(r["peak_training_bytes"]) for r in m["ranks"]) + " MiB, largest tensors "
                        + ", ".join(f"{t['dtype']}{t['shape']} {mib(t['bytes'])} MiB"
                                    for t in m["ranks"][0]["largest_storages"][:3]))
        other = other_cpu_share(load_start)
    reference = measured[0]["tokens_per_s"]
    for m in measured:
        m["ratio_to_one_process"] = m["tokens_per_s"] / reference
    zero0, zero3 = measured[1], measured[2]
    ratios = {"zero3_over_zero0_tokens_per_s": zero3["tokens_per_s"] / zero0["tokens_per_s"],
              "zero3_over_zero0_live_tensor_bytes": zero3["ranks"][0]["live_tensor_bytes"] /
              zero0["ranks"][0]["live_tensor_bytes"],
              "zero3_over_zero0_peak_training_bytes": zero3["ranks"][0]["peak_training_bytes"] /
              zero0["ranks"][0]["peak_training_bytes"]}
    parameters = measured[0]["ranks"][0]["parameters"]
    results = {
        "provenance": provenance("bench_generator_train.py", sys.argv[1:], "stage2_generator",
                                 packages=("deepspeed", "x-transformers")),
        "settings": {"size": args.size, "parameters": parameters, "codebook_size": args.codebook_size,
                     "grid": [args.grid, args.grid], "codes_per_sequence": args.grid**2,
                     "batch_per_rank": args.batch, "steps": args.steps, "log_every": args.log_every,
                     "sequences": args.sequences, "precision": "fp32", "optimizer": "AdamW",
                     "conditioning": "class", "quick": args.quick},
        "results": measured,
        "ratios": ratios,
        "other_cpu_share": other,
    }
    header = ["run", "rank", "tokens/s", "vs 1 process", "peak RSS in training MiB", "increase in training MiB",
              "peak before training MiB", "live tensors MiB", "expected state MiB"]
    rows = []
    for m in measured:
        for r in m["ranks"]:
            first = r["rank"] == 0
            rows.append([f"ZeRO-{m['zero_stage']}, {m['processes']} proc" if first else "", str(r["rank"]),
                         f"{m['tokens_per_s']:,.0f}" if first else "", f"{m['ratio_to_one_process']:.2f}x" if first
                         else "", mib(r["peak_training_bytes"]), mib(r["training_increase_bytes"]),
                         mib(r["peak_before_training_bytes"]), mib(r["live_tensor_bytes"]),
                         mib(r["expected_state_bytes"])])
    console.print(markdown_table(header, rows))
    console.print(f"ZeRO-3 / ZeRO-0 on 2 processes: tokens/s {ratios['zero3_over_zero0_tokens_per_s']:.2f}x, live "
                  f"tensors {ratios['zero3_over_zero0_live_tensor_bytes']:.2f}x, peak RSS in training "
                  f"{ratios['zero3_over_zero0_peak_training_bytes']:.2f}x; other processes used {other:.0%} of the "
                  f"machine's CPU time")
    if args.quick:
        return
    p, s = results["provenance"], results["settings"]
    bucket = int(OmegaConf.load(DEEPSPEED[3]).zero_optimization.reduce_bucket_size)
    section = f"""## Generator training (`stage2_generator.train`): ZeRO-0 vs ZeRO-3 on 2 CPU processes

Command: `{p['command']}` ({p['date']}, git {p['git_revision']}, {p['cpu_model']}, {p['cpu_count']} cores,
torch {p['torch']}, DeepSpeed {p['deepspeed']}). Raw numbers: `benchmarks/results/generator_train.json`.

`GeneratorTrainer` on a synthetic cache of {s['sequences']} random sequences: a class-conditioned generator of
size "{s['size']}" ({s['parameters']:,} parameters), K = {s['codebook_size']:,}, {s['grid'][0]} x {s['grid'][1]} =
{s['codes_per_sequence']} codes, batch {s['batch_per_rank']} per rank, fp32, AdamW, gloo, {s['steps']} steps logged
every {s['log_every']}; one torch thread per 2-process rank, {measured[0]['threads_per_process']} in the 1-process
reference. Tokens/s from rank 0's metrics.jsonl over the windows after the first (warm-up). Peak RSS in
training = VmHWM from the first to the last step (reset at the start; the final checkpoint and the export are
outside); increase = that minus the RSS at the start of training; peak before training covers imports, cache,
model and DeepSpeed set-up. Live tensors = the bytes of every CPU tensor storage alive after the last step;
expected state = 12 bytes per parameter at ZeRO-0 (weight, two Adam moments; the gradients, 4 more, are
freed after each step), 16 / 2 at ZeRO-3 (weight, gradient and moments partitioned) plus 4 bytes per parameter
ZeRO-3 keeps whole on each rank (below its persistence threshold) plus its contiguous-gradients reduce bucket
(`reduce_bucket_size` = {bucket:,} fp32 elements in zero3.yaml: {4 * bucket / MIB:,.0f} MiB per rank whatever the
model's size). Other processes used {other:.0%} of the machine's CPU time during the run.

{markdown_table(header, rows)}

ZeRO-3 / ZeRO-0 on 2 processes: tokens/s {ratios['zero3_over_zero0_tokens_per_s']:.2f}x; live tensors on rank 0
{ratios['zero3_over_zero0_live_tensor_bytes']:.2f}x; peak RSS in training on rank 0
{ratios['zero3_over_zero0_peak_training_bytes']:.2f}x.
"""
    publish("generator_train", results, section)


if __name__ == "__main__":
    main()
