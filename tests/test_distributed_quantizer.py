"""Two gloo ranks on localhost: same frozen codebook, merged usage counts, EMA codebooks kept in sync."""
from __future__ import annotations

import datetime
import os
import socket
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2
K, DIM = 256, 8


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_latents(rank: int, step: int) -> torch.Tensor:
    """Different data on every rank (and every step); the parent can rebuild it."""
    g = torch.Generator().manual_seed(1000 * rank + step)
    return torch.randn(2, DIM, 6, 5, generator=g) * (0.5 + rank)  # different scales too


def fixed_basis(simvq):
    """The basis is an ordinary parameter (initialised from the global RNG, synced by DDP in training):
    give it the same deterministic value everywhere so that ranks and the parent agree."""
    g = torch.Generator().manual_seed(42)
    with torch.no_grad():
        simvq.basis.weight.copy_(torch.eye(DIM) + 0.3 * torch.randn(DIM, DIM, generator=g))
        simvq.basis.bias.copy_(0.1 * torch.randn(DIM, generator=g))
    return simvq


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    result: dict = {"rank": rank}
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                                timeout=datetime.timedelta(seconds=30))
        try:
            from simvq_common.distributed import is_distributed, world_size
            from simvq_common.distributed import rank as dist_rank
            from stage1_tokenizer.quantizers import EMAVQ, CodebookUsage, SimVQ

            result["is_distributed"] = is_distributed()
            result["rank_seen"] = dist_rank()
            result["world_size"] = world_size()

            torch.manual_seed(rank)  # global RNG differs per rank: the frozen codebook must not depend on it
            simvq = SimVQ(K, DIM, seed=0)
            gathered = [torch.empty_like(simvq.frozen_codebook) for _ in range(WORLD)]
            dist.all_gather(gathered, simvq.frozen_codebook)
            result["frozen_all"] = torch.stack(gathered)

            # usage counts: local, all-gathered local, merged
            fixed_basis(simvq).eval()
            usage = CodebookUsage(K)
            for step in range(3):
                usage.update(simvq(rank_latents(rank, step)).indices)
            local = usage.counts.clone()
            merged = usage.merged()
            gathered = [torch.empty_like(local) for _ in range(WORLD)]
            dist.all_gather(gathered, local)
            result["local_counts"] = local
            result["counts_after_merge"] = usage.counts.clone()  # merged() must leave these alone
            result["gathered_counts"] = torch.stack(gathered)
            result["merged_counts"] = merged.counts.clone()
            result["merged_summary"] = merged.summary()

            # EMA: different data per rank, the same update everywhere
            ema = EMAVQ(K, DIM, decay=0.8, seed=0).train()
            result["ema_init"] = ema.embedding.clone()
            for step in range(2):
                ema(rank_latents(rank, 10 + step))
            state = {k: v.clone() for k, v in ema.state_dict().items()}
            result["ema_state"] = state
            gathered = [torch.empty_like(state["embedding"]) for _ in range(WORLD)]
            dist.all_gather(gathered, state["embedding"].contiguous())
            result["ema_embedding_all"] = torch.stack(gathered)
            dist.barrier()
        finally:
            dist.destroy_process_group()
    except BaseException:  # reported by the parent, which also sees the exit code
        result["error"] = traceback.format_exc()
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
        raise
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))


def run_ranks(tmp_path, timeout_s: float = 60.0) -> list[dict]:
    port = free_port()
    ctx = mp.start_processes(_worker, args=(port, str(tmp_path)), nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    try:
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                raise TimeoutError(f"ranks did not finish within {timeout_s} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
    results = []
    for rank in range(WORLD):
        path = tmp_path / f"rank{rank}.pt"
        assert path.exists(), f"rank {rank} wrote no result"
        res = torch.load(path, weights_only=False)
        assert "error" not in res, f"rank {rank} failed:\n{res['error']}"
        results.append(res)
    return results


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return run_ranks(tmp_path_factory.mktemp("dist"))


def test_process_group_seen(ranks):
    for rank, res in enumerate(ranks):
        assert res["is_distributed"] is True
        assert (res["rank_seen"], res["world_size"]) == (rank, WORLD)


def test_frozen_codebook_identical_across_ranks(ranks):
    from stage1_tokenizer.quantizers import SimVQ

    single = SimVQ(K, DIM, seed=0).frozen_codebook
    for res in ranks:
        frozen = res["frozen_all"]
        assert torch.equal(frozen[0], frozen[1])
        assert torch.equal(frozen[0], single)


def test_merged_usage_is_sum_of_ranks(ranks):
    from stage1_tokenizer.quantizers import CodebookUsage, SimVQ

    r0, r1 = ranks
    assert not torch.equal(r0["local_counts"], r1["local_counts"])  # the ranks really saw different data
    for res in ranks:
        assert torch.equal(res["gathered_counts"][0], r0["local_counts"])
        assert torch.equal(res["gathered_counts"][1], r1["local_counts"])
        assert torch.equal(res["merged_counts"], r0["local_counts"] + r1["local_counts"])
        assert torch.equal(res["counts_after_merge"], res["local_counts"])
    assert r0["merged_summary"] == r1["merged_summary"]
    # and equal to one process counting everything
    simvq = fixed_basis(SimVQ(K, DIM, seed=0)).eval()
    usage = CodebookUsage(K)
    for rank in range(WORLD):
        for step in range(3):
            usage.update(simvq(rank_latents(rank, step)).indices)
    assert torch.equal(r0["merged_counts"], usage.counts)
    assert r0["merged_summary"]["tokens"] == 3 * 2 * 2 * 6 * 5
    assert r0["merged_summary"]["used"] == usage.used


def test_ema_codebooks_in_sync_and_equal_single_process_on_concatenated_data(ranks):
    from stage1_tokenizer.quantizers import EMAVQ

    r0, r1 = ranks
    for key in ("embedding", "cluster_size", "embedding_sum"):
        assert torch.equal(r0["ema_state"][key], r1["ema_state"][key]), key
    for res in ranks:
        assert torch.equal(res["ema_embedding_all"][0], res["ema_embedding_all"][1])
    assert not torch.allclose(r0["ema_state"]["embedding"], r0["ema_init"])

    single = EMAVQ(K, DIM, decay=0.8, seed=0).train()
    for step in range(2):
        single(torch.cat([rank_latents(0, 10 + step), rank_latents(1, 10 + step)]))
    for key in ("embedding", "cluster_size", "embedding_sum"):
        torch.testing.assert_close(r0["ema_state"][key], getattr(single, key), rtol=1e-5, atol=1e-6)
    # sanity: the update really used both ranks' data (one rank's data alone gives something else)
    alone = EMAVQ(K, DIM, decay=0.8, seed=0).train()
    for step in range(2):
        alone(rank_latents(0, 10 + step))
    assert not torch.allclose(alone.cluster_size, single.cluster_size)
