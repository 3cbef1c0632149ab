"""The stage-1 trainer: exact resume, refusal of foreign checkpoints, non-finite loss, 2-process DDP."""
import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
import numpy as np
from PIL import Image

import nccl_rules
from simvq_common import distributed
from simvq_common.checkpoint import list_checkpoints
from simvq_common.config import load_config
from simvq_common.errors import NonFiniteLoss
from stage1_tokenizer import train as train_module
from stage1_tokenizer.config import TokenizerTrainConfig
from image_data.loading import EpochSampler
from stage1_tokenizer.tokenizer import Tokenizer
from stage1_tokenizer.train import TokenizerTrainer, train_tokenizer
from simvq_common.distributed import free_port

TINY = [
    "tokenizer.autoencoder.ch=8", "tokenizer.autoencoder.ch_mult=[1,2]", "tokenizer.autoencoder.num_res_blocks=1",
    "tokenizer.autoencoder.z_channels=8", "tokenizer.autoencoder.norm_groups=4",
    "tokenizer.quantizer.codebook_size=64", "loss.perceptual=none", "loss.gan_start_step=1", "loss.disc_ndf=8",
    "loss.disc_layers=2", "data.resolution=16", "data.batch_size=4", "optim.lr=1e-3", "optim.warmup_steps=2",
    "optim.grad_clip=1.0", "optim.ema_decay=0.9", "run.log_every=1", "run.image_every=100", "run.checkpoint_every=2",
]


def tiny_config(out_dir, *extra) -> TokenizerTrainConfig:
    return load_config(TokenizerTrainConfig, None, [*TINY, f"run.out_dir={out_dir}", *extra])


def states(run_dir):
    saved = torch.load(list_checkpoints(run_dir / "checkpoints")[-1], weights_only=False)
    return {name: saved[name] for name in ("tokenizer", "ema", "discriminator")}, saved


def assert_bitwise_equal(a: dict, b: dict):
    for part in a:
        assert a[part].keys() == b[part].keys()
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), f"{part}.{key} differs"


def test_resume_is_bitwise_exact(tmp_path, one_thread):
    train_tokenizer(tiny_config(tmp_path / "straight", "run.steps=6"))
    train_tokenizer(tiny_config(tmp_path / "resumed", "run.steps=3", "run.checkpoint_every=3"))
    train_tokenizer(tiny_config(tmp_path / "resumed", "run.steps=6", "run.checkpoint_every=3"))
    straight, saved_a = states(tmp_path / "straight")
    resumed, saved_b = states(tmp_path / "resumed")
    assert saved_a["step"] == saved_b["step"] == 6
    assert (saved_a["epoch"], saved_a["batch_in_epoch"]) == (saved_b["epoch"], saved_b["batch_in_epoch"]) == (0, 6)
    assert_bitwise_equal(straight, resumed)
    assert torch.equal(saved_a["opt_g"]["state"][0]["exp_avg_sq"], saved_b["opt_g"]["state"][0]["exp_avg_sq"])
    # the exported tokenizer holds the EMA weights and rebuilds from its directory alone
    exported = Tokenizer.from_pretrained(tmp_path / "resumed" / "tokenizer")
    for key, value in exported.state_dict().items():
        assert torch.equal(value, resumed["ema"][key])
    assert exported.fingerprint() == Tokenizer.from_pretrained(tmp_path / "straight" / "tokenizer").fingerprint()
    # and the training moved the weights (so the equality above is not trivial)
    fresh = TokenizerTrainer(tiny_config(tmp_path / "fresh", "run.steps=0")).tokenizer.state_dict()
    assert not torch.equal(fresh["decoder.conv_out.weight"], resumed["tokenizer"]["decoder.conv_out.weight"])


def test_checkpoints_are_pruned_to_the_last_k(tmp_path):
    train_tokenizer(tiny_config(tmp_path, "run.steps=6", "run.checkpoint_every=1", "run.keep_checkpoints=2"))
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step_00000005.pt", "step_00000006.pt"]
    assert not list(tmp_path.glob("checkpoints/*.tmp"))


def test_resume_refuses_a_different_model(tmp_path):
    train_tokenizer(tiny_config(tmp_path, "run.steps=2"))
    with pytest.raises(ValueError, match=r"checkpoint's tokenizer is .*'codebook_size': 64.* this run's is .*'codebook_size': 128"):
        TokenizerTrainer(tiny_config(tmp_path, "run.steps=4", "tokenizer.quantizer.codebook_size=128"))


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    real_l1 = train_module.F.l1_loss
    calls = {"n": 0}

    def l1_that_diverges(*args, **kwargs):
        calls["n"] += 1
        value = real_l1(*args, **kwargs)
        return value * float("nan") if calls["n"] == 3 else value

    monkeypatch.setattr(train_module.F, "l1_loss", l1_that_diverges)
    with pytest.raises(NonFiniteLoss, match="non-finite generator loss at step 2.*last good checkpoint"):
        train_tokenizer(tiny_config(tmp_path, "run.steps=6"))
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step_00000002.pt"]


def _ddp_worker(rank, world, port, out_dir, results, extra=("run.steps=3",), tag=""):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    nccl_rules.install()  # every collective of ours as a GPU run would make it
    try:
        trainer = TokenizerTrainer(tiny_config(out_dir, *extra))
        trainer.train()
        torch.save({k: v.clone() for k, v in trainer.tokenizer.state_dict().items()}, f"{results}/rank{rank}{tag}.pt")
        torch.save({"epoch": trainer.epoch, "batch_in_epoch": trainer.batch_in_epoch,
                    "dropped_batches": trainer.dropped_batches}, f"{results}/position{rank}{tag}.pt")
    finally:
        distributed.shutdown()


@pytest.mark.slow
def test_two_process_ddp_keeps_ranks_identical(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_ddp_worker, args=(2, port, str(tmp_path / "run"), str(tmp_path)), nprocs=2,
                       start_method="spawn", join=True)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
    saved = torch.load(list_checkpoints(tmp_path / "run" / "checkpoints")[-1], weights_only=False)
    assert saved["identity"]["world_size"] == 2 and saved["step"] == 3
    logged = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert '"global_batch": 8' in logged[-1]


def folder_with_unreadable_batch_on_rank1(root, n=16, world=2, batch=2, seed=0):
    """A one-class image folder whose first epoch gives rank 1 a first batch of unreadable files only."""
    order = EpochSampler(n, seed=seed, rank=0, world_size=world).epoch_order()
    rank1_first_batch = set(order[1::world][:batch].tolist())
    rng = np.random.default_rng(0)
    for split, count in (("train", n), ("val", 4)):
        (root / split / "a").mkdir(parents=True)
        for i in range(count):
            path = root / split / "a" / f"{i:03d}.png"
            if split == "train" and i in rank1_first_batch:
                path.write_bytes(b"not a png")
            else:
                Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(path)
    return root


@pytest.mark.slow
def test_an_unreadable_batch_on_one_rank_is_dropped_on_every_rank_and_resume_stays_exact(tmp_path):
    data = folder_with_unreadable_batch_on_rank1(tmp_path / "images")
    common = [f"data.source={data}", "data.batch_size=2", "run.checkpoint_every=2"]

    def ranks(out, steps, tag):
        mp.start_processes(_ddp_worker, args=(2, free_port(), str(out), str(tmp_path), [*common, f"run.steps={steps}"],
                                              tag), nprocs=2, start_method="spawn", join=True)
        return [torch.load(tmp_path / f"position{r}{tag}.pt") for r in (0, 1)]

    straight = ranks(tmp_path / "straight", 4, "-straight")
    # both ranks skipped the same batch and stand at the same place in the data (rank 0's checkpoint is theirs)
    # 4 batches per rank per epoch: 4 steps + the dropped one end at epoch 1, batch 1
    assert straight[0] == straight[1] == {"epoch": 1, "batch_in_epoch": 1, "dropped_batches": 1}
    ranks(tmp_path / "resumed", 2, "-half")
    resumed = ranks(tmp_path / "resumed", 4, "-resumed")
    assert resumed == straight
    a, b = torch.load(tmp_path / "rank0-straight.pt"), torch.load(tmp_path / "rank0-resumed.pt")
    assert all(torch.equal(a[k], b[k]) for k in a)
    logged = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1]["skipped_images"] == 2 and logged[-1]["dropped_batches"] == 1  # counts survive the resume


def test_deterministic_mode_uses_deterministic_kernels_and_resumes_bitwise(tmp_path, one_thread, monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    try:
        train_tokenizer(tiny_config(tmp_path / "straight", "run.steps=4", "run.deterministic=true"))
        assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"  # cuBLAS's fixed workspace, for CUDA runs
        train_tokenizer(tiny_config(tmp_path / "resumed", "run.steps=2", "run.deterministic=true"))
        train_tokenizer(tiny_config(tmp_path / "resumed", "run.steps=4", "run.deterministic=true"))
        assert_bitwise_equal(states(tmp_path / "straight")[0], states(tmp_path / "resumed")[0])
    finally:
        from simvq_common.numerics import set_deterministic

        set_deterministic(False)
    assert not torch.are_deterministic_algorithms_enabled()
