"""The distribution module: tensors placed where the backend takes them, collectives under nccl's rules,
rank-0 work that outlasts a collective timeout, and nothing else in the project talking to torch.distributed."""
from __future__ import annotations

import ast
import datetime
import os
import time
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from simvq_common import distributed
from simvq_common.distributed import free_port

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- placement -------------------
@pytest.mark.parametrize("config,served", [("cuda:nccl", {"cuda"}), ("nccl", {"cuda"}), ("gloo", {"cpu", "cuda"}),
                                           ("cpu:gloo,cuda:gloo", {"cpu", "cuda"}), ("cuda:gloo", {"cuda"}),
                                           ("cpu:gloo,cuda:nccl", {"cpu", "cuda"})])
def test_served_device_types_follow_the_backend_config(monkeypatch, config, served):
    monkeypatch.setattr(distributed.dist, "get_backend_config", lambda: config)
    assert distributed.served_device_types() == served


def test_a_cpu_tensor_goes_to_the_current_gpu_under_nccl_and_stays_put_under_gloo(monkeypatch):
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    monkeypatch.setattr(distributed.dist, "get_backend_config", lambda: "cuda:nccl")
    assert distributed.backend_device(torch.device("cpu")) == torch.device("cuda", 3)
    assert distributed.backend_device(torch.device("cuda", 1)) == torch.device("cuda", 1)
    monkeypatch.setattr(distributed.dist, "get_backend_config", lambda: "cpu:gloo,cuda:gloo")
    assert distributed.backend_device(torch.device("cpu")) == torch.device("cpu")
    assert distributed.backend_device(torch.device("cuda", 1)) == torch.device("cuda", 1)


def test_a_lone_process_runs_no_collective():
    assert not distributed.is_distributed() or distributed.world_size() == 1
    t = torch.tensor([1.0, 2.0])
    assert distributed.all_reduce_sum(t) is t and t.tolist() == [1.0, 2.0]
    assert distributed.any_rank(False) is False and distributed.any_rank(True) is True
    assert distributed.sum_over_ranks(2.5) == 2.5
    assert distributed.broadcast_object({"a": 1}) == {"a": 1}


# ---------------------------------------------------------------- two ranks -------------------
def run_ranks(worker, tmp_path, world: int = 2, timeout_s: float = 120.0) -> list[dict]:
    port = free_port()
    ctx = mp.start_processes(worker, args=(world, port, str(tmp_path)), nprocs=world, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + timeout_s
    try:
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                raise TimeoutError(f"ranks did not finish within {timeout_s} s")
    except mp.ProcessRaisedException:
        pass  # each rank's own report below says what failed
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
            p.join(timeout=10)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]
    for r, res in enumerate(results):
        assert "error" not in res, f"rank {r} failed:\n{res['error']}"
    return results


def _join(rank: int, world: int, port: int, backend: str = "gloo", timeout_s: float = 60) -> None:
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))


def _report(rank: int, out: str, body) -> None:
    torch.set_num_threads(1)
    result: dict = {}
    try:
        body(result)
    except BaseException:
        result["error"] = traceback.format_exc()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    torch.save(result, os.path.join(out, f"rank{rank}.pt"))


def _collectives_worker(rank: int, world: int, port: int, out: str) -> None:
    def body(result):
        import nccl_rules
        from stage1_tokenizer.quantizers import CodebookUsage

        _join(rank, world, port)
        rules = nccl_rules.install()
        try:  # the emulation is real: a tensor the module did not place is refused, as nccl refuses CPU tensors
            distributed.dist.all_reduce(torch.ones(1))
        except RuntimeError as err:
            result["raw_refused"] = str(err)
        t = torch.tensor([1.0, 10.0], dtype=torch.float64) * (rank + 1)
        result["sum"] = distributed.all_reduce_sum(t).tolist()
        result["sum_in_place"] = t.tolist()
        result["max"] = distributed.all_reduce(torch.tensor([rank, -rank]), "max").tolist()
        result["sum_over_ranks"] = distributed.sum_over_ranks(0.5 + rank)
        result["any"] = (distributed.any_rank(rank == 1), distributed.any_rank(False))
        result["object"] = distributed.broadcast_object({"rank": rank})
        result["decided"] = distributed.rank0_decides(lambda: "rank 0's answer")
        try:
            distributed.rank0_decides(lambda: 1 / 0)
        except ZeroDivisionError:
            result["decision_error_everywhere"] = True
        usage = CodebookUsage(8)
        usage.update(torch.tensor([rank, 7]))
        result["merged_counts"] = usage.merged().counts.tolist()
        try:
            distributed.broadcast_object(torch.zeros(100_000))
        except RuntimeError as err:
            result["bulk_refused"] = str(err)
        result["calls"] = sorted(set(rules.calls))
    _report(rank, out, body)


def test_collectives_under_nccl_rules_place_their_tensors_and_hand_results_back(tmp_path):
    ranks = run_ranks(_collectives_worker, tmp_path)
    for rank, res in enumerate(ranks):
        assert "No backend type associated with device type cpu" in res["raw_refused"]
        assert res["sum"] == res["sum_in_place"] == [3.0, 30.0]
        assert res["max"] == [1, 0]
        assert res["sum_over_ranks"] == 2.0
        assert res["any"] == (True, False)
        assert res["object"] == {"rank": 0} and res["decided"] == "rank 0's answer"
        assert res["decision_error_everywhere"]
        assert res["merged_counts"] == [1, 1, 0, 0, 0, 0, 0, 2]
        assert "broadcast_object_list of" in res["bulk_refused"]
        assert res["calls"] == ["all_reduce", "broadcast_object_list"]


def _cuda_only_group_worker(rank: int, world: int, port: int, out: str) -> None:
    def body(result):
        _join(rank, world, port, backend="cuda:gloo")
        try:
            dist.all_reduce(torch.ones(1))
        except RuntimeError as err:
            result["refused"] = str(err)
        t = torch.ones(2)
        result["lone_sum_is_identity"] = distributed.all_reduce_sum(t) is t and t.tolist() == [1.0, 1.0]
    _report(rank, out, body)


def test_a_group_of_one_serving_only_cuda_refuses_cpu_tensors_and_the_module_sends_none(tmp_path):
    """The rule nccl enforces, shown with gloo on this CPU; a lone process (one GPU) exchanges nothing."""
    (res,) = run_ranks(_cuda_only_group_worker, tmp_path, world=1)
    assert "No backend type associated with device type cpu" in res["refused"]
    assert res["lone_sum_is_identity"]


WORK_S, GROUP_TIMEOUT_S = 6.0, 2.0


def _rank0_work_worker(rank: int, world: int, port: int, out: str) -> None:
    def body(result):
        _join(rank, world, port, timeout_s=GROUP_TIMEOUT_S)

        def work():
            time.sleep(WORK_S)  # an evaluation longer than the group's collective timeout
            return {"fid": 1.5}

        result["result"] = distributed.run_on_rank0(work, Path(out) / "record.json", poll_s=0.2)
        try:  # the failure this avoids: waiting in a collective while rank 0 works
            if rank == 0:
                time.sleep(WORK_S)
            distributed.barrier()
            result["collective_survived"] = True
        except RuntimeError:
            result["collective_survived"] = False
    _report(rank, out, body)


def test_rank0_work_longer_than_the_collective_timeout_reaches_every_rank(tmp_path):
    ranks = run_ranks(_rank0_work_worker, tmp_path)
    assert [r["result"] for r in ranks] == [{"fid": 1.5}] * 2
    assert ranks[1]["collective_survived"] is False  # a barrier instead would have timed out


def test_rank0_failure_reaches_the_waiting_ranks(tmp_path):
    record = tmp_path / "record.json"
    distributed.write_json_atomic(record, {"error": "ValueError: bad reference"})
    import unittest.mock

    with unittest.mock.patch.object(distributed, "world_size", lambda: 2), \
            unittest.mock.patch.object(distributed, "rank", lambda: 1):
        with pytest.raises(distributed.Rank0Failed, match="bad reference"):
            distributed.run_on_rank0(lambda: None, record, poll_s=0.01)


# ---------------------------------------------------------------- the one owner -----------------
def test_only_the_distribution_module_talks_to_torch_distributed():
    offenders = []
    for folder in ("simvq_common", "image_data", "evaluation", "stage1_tokenizer", "stage2_generator", "pipelines",
                   "benchmarks", "scripts"):
        for path in sorted((REPO / folder).rglob("*.py")):
            if path == REPO / "simvq_common" / "distributed.py":
                continue
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom):
                    names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
                elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "torch":
                    names = [f"torch.{node.attr}"]
                if any(n == "torch.distributed" or n.startswith("torch.distributed.") for n in names):
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert offenders == []
