"""The generator's EMA (optim.ema_decay): the warmed-up average of each step's weights, validated beside them,
exported instead of them, checkpointed so that a resumed run is bitwise the straight one; refused where it cannot
work (ZeRO-3) and where a checkpoint was written without it."""
import errno
from pathlib import Path

import pytest
import torch
from test_train_generator import exported, metrics, tiny

from simvq_common.config import canonical_container
from simvq_common.ema import warmed_up_decay
from simvq_common.errors import ConfigError, DiskFullError, UserError
from stage2_generator.checkpoints import ema_weights, export_checkpoint
from stage2_generator.model import Generator
from stage2_generator.train import GeneratorTrainer, train_generator

pytestmark = pytest.mark.usefixtures("lone_process")

DECAY = 0.9


def test_warmed_up_decay_rises_to_the_configured_one():
    assert warmed_up_decay(0.999, 0) == pytest.approx(0.1)
    assert warmed_up_decay(0.999, 80) == pytest.approx(0.9)
    assert warmed_up_decay(0.9, 10_000) == 0.9


def test_ema_is_the_warmed_up_average_of_every_steps_weights(tmp_path):
    # two micro-steps per update: the EMA moves once per optimizer step, after the engine's
    trainer = GeneratorTrainer(tiny(tmp_path, f"optim.ema_decay={DECAY}", "run.steps=5", "data.grad_accum=2"))
    expected = {k: v.double() for k, v in trainer.engine.module.state_dict().items()}
    batches = trainer.batches()
    for update in range(5):
        trainer.train_step(batches)
        d = warmed_up_decay(DECAY, update)
        expected = {k: d * expected[k] + (1 - d) * v.double() for k, v in trainer.engine.module.state_dict().items()}
    weights = trainer.engine.module.state_dict()
    moved = 0
    for key, value in trainer.ema.state_dict().items():
        torch.testing.assert_close(value.double(), expected[key], rtol=0, atol=1e-6)
        moved += not torch.equal(value, weights[key])
    assert moved > len(weights) // 2  # the EMA is not the last step's weights
    out = trainer.export()  # what the run exports: the EMA, bitwise
    for key, value in Generator.from_pretrained(out).state_dict().items():
        assert torch.equal(value, trainer.ema.state_dict()[key]), key


def test_resume_with_ema_is_bitwise_exact_and_checkpoints_export_their_ema(tmp_path, one_thread):
    extra = [f"optim.ema_decay={DECAY}", "run.steps=6"]
    val = tmp_path / "a" / "cache"
    train_generator(tiny(tmp_path / "a", *extra, val=val))
    interrupted = GeneratorTrainer(tiny(tmp_path / "b", *extra, cache=val, val=val))
    batches = interrupted.batches()
    for _ in range(3):
        interrupted.train_step(batches)
    interrupted.save()
    trainer = GeneratorTrainer(tiny(tmp_path / "b", *extra, cache=val, val=val))
    assert trainer.step == 3
    trainer.train()
    a, b = exported(tmp_path / "a" / "run"), exported(tmp_path / "b" / "run")
    for key in a:
        assert torch.equal(a[key], b[key]), key
    straight = [(r["step"], r["val_loss"], r["val_loss_ema"]) for r in metrics(tmp_path / "a" / "run") if "val_loss" in r]
    resumed = [(r["step"], r["val_loss"], r["val_loss_ema"]) for r in metrics(tmp_path / "b" / "run") if "val_loss" in r]
    assert resumed == [row for row in straight if row[0] > 3]
    assert all(row[1] != row[2] for row in straight)  # the EMA's val loss is measured on the EMA's weights
    # a checkpoint exports the weights the run exports: its EMA
    at_6 = Generator.from_pretrained(export_checkpoint(tmp_path / "a" / "run", 6, tmp_path / "step6")).state_dict()
    for key in a:
        assert torch.equal(at_6[key], a[key]), key


def test_ema_is_refused_under_zero3_and_outside_0_1_and_when_resuming_a_run_without_it(tmp_path):
    with pytest.raises(ConfigError, match=r"ZeRO-3.*zero2.yaml or set optim.ema_decay=0"):
        GeneratorTrainer(tiny(tmp_path / "z3", f"optim.ema_decay={DECAY}", "run.deepspeed=configs/deepspeed/zero3.yaml"))
    with pytest.raises(ConfigError, match=r"optim.ema_decay=1.0 must lie in \[0, 1\)"):
        GeneratorTrainer(tiny(tmp_path / "one", "optim.ema_decay=1.0"))
    train_generator(tiny(tmp_path, "run.steps=3"))
    with pytest.raises(UserError, match=r"ema_decay: checkpoint None, this run 0.9"):
        GeneratorTrainer(tiny(tmp_path, "run.steps=6", f"optim.ema_decay={DECAY}"))
    train_generator(tiny(tmp_path / "ema", "run.steps=3", f"optim.ema_decay={DECAY}"))
    with pytest.raises(UserError, match=r"ema_decay: checkpoint 0.9, this run None"):  # nor the other way
        GeneratorTrainer(tiny(tmp_path / "ema", "run.steps=6"))


def test_a_full_disk_while_the_ema_is_written_keeps_the_previous_tag(tmp_path, monkeypatch):
    cfg = tiny(tmp_path, f"optim.ema_decay={DECAY}", "run.steps=4", "run.checkpoint_every=2")
    trainer = GeneratorTrainer(cfg)
    real = Path.write_bytes

    def full(path, data):
        if path.name == "ema.safetensors" and "step_00000004" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, data)
    monkeypatch.setattr(Path, "write_bytes", full)
    with pytest.raises(DiskFullError, match=r"no space left to write .*step_00000004: .* free"):
        trainer.train()
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step_*")) == ["step_00000002"]
    monkeypatch.setattr(Path, "write_bytes", real)
    resumed = GeneratorTrainer(cfg)
    assert resumed.step == 2
    saved, ema = ema_weights(tmp_path / "run" / "checkpoints", "step_00000002"), resumed.ema.state_dict()
    assert saved.keys() == ema.keys() and all(torch.equal(ema[k], saved[k]) for k in saved)  # step 2's EMA
    assert any(not torch.equal(ema[k], v) for k, v in resumed.engine.module.state_dict().items())  # not the weights


def test_runs_without_an_ema_keep_their_identity(tmp_path):
    """Run identities (`simvq run`'s stages, the generation study's folders) hash the canonical config: a run
    trained before optim.ema_decay existed must not read as changed, and one with an EMA must."""
    assert "ema_decay" not in canonical_container(tiny(tmp_path))["optim"]
    assert canonical_container(tiny(tmp_path, f"optim.ema_decay={DECAY}"))["optim"]["ema_decay"] == DECAY
