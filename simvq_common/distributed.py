"""Process groups and collectives: the one module of the project that talks to torch.distributed.

nccl reduces CUDA tensors only and moves object pickles to the current GPU, so every collective here
puts its tensor where the group's backend takes it and hands the result back where the caller had it.
With one process there is nothing to exchange and no collective runs (docs/SCALING.md).
"""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

from .errors import ConfigError, UserError
from .io import write_json_atomic
from .sharding import WorkShare


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup(group_of_one: bool = False) -> torch.device:
    """Join the process group the launcher describes; returns this process's device.

    torchrun and the deepspeed launcher both set RANK, WORLD_SIZE, LOCAL_RANK and MASTER_ADDR/PORT. The
    backend is nccl on CUDA (one GPU per local rank, made current before any collective), gloo on CPU. A
    lone process joins no group unless `group_of_one` (DeepSpeed needs a group, even of one).
    """
    device = own_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    lone = "RANK" not in os.environ
    if lone and group_of_one:  # what a launcher would set (DeepSpeed reads LOCAL_RANK even in a group of one)
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(free_port()))
    if is_distributed() or (lone and not group_of_one):
        return device
    if device.type == "cuda":
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    return device


def own_device() -> torch.device:
    """This process's device: its local rank's GPU, else the CPU (joins nothing)."""
    return torch.device("cuda", local_rank()) if torch.cuda.is_available() else torch.device("cpu")


def device_for(name: str) -> torch.device:
    """A job's `device` setting: auto = this process's device, else the one named (joins nothing: a job calls
    setup() itself)."""
    if name == "auto":
        return own_device()
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name} but CUDA is not available here: use device=cpu or device=auto")
    return device


def shutdown() -> None:
    if is_distributed():
        dist.destroy_process_group()


# -- where a collective's tensor has to live -------------------------------------------------------

def served_device_types() -> frozenset[str]:
    """The device types the default group's backend reduces: {"cuda"} for nccl, {"cpu", "cuda"} for gloo."""
    config = dist.get_backend_config()  # e.g. "cuda:nccl", "cpu:gloo,cuda:gloo", "nccl"
    if ":" not in config:
        return frozenset({"cuda"} if config == "nccl" else {"cpu", "cuda"})
    return frozenset(part.split(":")[0] for part in config.split(","))


def backend_device(device: torch.device) -> torch.device:
    """`device` if the backend takes tensors there, else the current GPU (nccl and a CPU tensor)."""
    served = served_device_types()
    if device.type in served:
        return device
    if "cuda" in served:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def to_backend(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor a collective may take: `tensor` itself, or its copy on the backend's device."""
    return tensor.to(backend_device(tensor.device))


# -- collectives (no-ops in a single process) --------------------------------------------------

def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Reduce `tensor` over all ranks in place (op: sum | max | min); returns it, on its own device."""
    if world_size() == 1:
        return tensor
    wire = to_backend(tensor)
    dist.all_reduce(wire, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op])
    if wire is not tensor:
        tensor.copy_(wire)
    return tensor


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    return all_reduce(tensor, "sum")


def sum_over_ranks(value: float) -> float:
    """A host number summed over all ranks (float64 on the wire)."""
    return float(all_reduce(torch.tensor(float(value), dtype=torch.float64), "sum"))


def any_rank(flag: bool) -> bool:
    """True on every rank if `flag` is true on any: the ranks decide together, so none takes a step alone."""
    return bool(all_reduce(torch.tensor(int(flag), dtype=torch.int32), "max"))


def broadcast_object(obj):
    """Rank 0's `obj` on every rank (small picklable objects: nccl stages the pickle on the GPU)."""
    if world_size() == 1:
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def all_gather_object(obj) -> list:
    """Every rank's `obj`, in rank order, on every rank (small picklable objects: nccl stages each pickle on the
    current GPU, as broadcast_object's do); [obj] in a single process."""
    if world_size() == 1:
        return [obj]
    gathered: list = [None] * world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def rank0_decides(decide: Callable[[], object]) -> object:
    """Run `decide` on rank 0 and hand its result, or its error, to every rank.

    Every rank then raises the same error instead of the others waiting for rank 0 forever. For quick
    decisions only: the others wait in a collective, which nccl times out (10 min by default).
    """
    outcome: object = None
    if rank() == 0:
        try:
            outcome = ("ok", decide())
        except Exception as err:  # noqa: BLE001 - whatever stops rank 0 must stop every rank
            outcome = ("error", err)
    status, value = broadcast_object(outcome)
    if status == "error":
        raise value
    return value


def work_share() -> WorkShare:
    """This rank's share of work split over the group, gathered by all_gather_object: for work every rank of the
    group runs together (training, pre-tokenization), never inside run_on_rank0's work."""
    return WorkShare(rank(), world_size(), all_gather_object)


class Rank0Failed(UserError, RuntimeError):
    """On the other ranks: what stopped rank 0 (which printed it in full)."""


def run_on_rank0(work: Callable[[], object], record: Path, poll_s: float = 2.0) -> object:
    """Run `work` on rank 0 while the other ranks wait for its JSON result in `record`, outside any collective.

    For long single-process work (an evaluation) that would outlast nccl's collective timeout. `record` must
    be on a filesystem every rank sees (as the run's other outputs are) and must not exist beforehand.
    """
    if world_size() == 1:
        return work()
    if rank() == 0:
        try:
            result = json.loads(json.dumps(work()))  # what the other ranks read: the same on every rank
            write_json_atomic(record, {"result": result})
        except BaseException as err:  # the others must not wait for a result that never comes
            write_json_atomic(record, {"error": f"{type(err).__name__}: {err}"})
            raise
        return result
    while not record.is_file():
        time.sleep(poll_s)
    outcome = json.loads(record.read_text())
    if "error" in outcome:
        raise Rank0Failed(f"rank 0 failed ({outcome['error']}): see its log")
    return outcome["result"]

