"""Nothing a resume loads runs code: a pickled object planted in a stage-1 checkpoint or in a file of a stage-2
DeepSpeed checkpoint (whose unpickling would create a marker file) is refused with an error naming it, and
the marker is never created; what the trainers write themselves loads weights-only (RNG states included)."""
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from synthetic_cache import make_cache

from simvq_common.checkpoint import (INTEGRITY_FILE, UnsafeCheckpointError, list_checkpoints, load_checkpoint,
                                     record_integrity, record_path, rng_state, set_rng_state)
from simvq_common.config import load_config
from simvq_common.errors import ArtifactError, UserError
from stage1_tokenizer.config import TokenizerTrainConfig
from stage1_tokenizer.train import TokenizerTrainer, train_tokenizer
from stage2_generator.config import GeneratorTrainConfig
from stage2_generator.train import GeneratorTrainer, train_generator

REPO = Path(__file__).resolve().parents[1]
TINY_TOKENIZER = [
    "tokenizer.autoencoder.ch=8", "tokenizer.autoencoder.ch_mult=[1,2]", "tokenizer.autoencoder.num_res_blocks=1",
    "tokenizer.autoencoder.z_channels=8", "tokenizer.autoencoder.norm_groups=4",
    "tokenizer.quantizer.codebook_size=64", "loss.perceptual=none", "loss.gan_start_step=1", "loss.disc_ndf=8",
    "loss.disc_layers=2", "data.resolution=16", "data.batch_size=4", "run.log_every=1", "run.image_every=100",
    "run.checkpoint_every=2", "run.steps=2",
]


class Payload:
    """Unpickled, it opens (so creates) `marker`: any code could run in its place."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def plant(path: Path, marker: Path) -> None:
    state = torch.load(path, map_location="cpu", weights_only=False)  # the trainer's own file: trusted here
    state["planted"] = Payload(marker)
    torch.save(state, path)


def assert_payload_is_live(path: Path, marker: Path) -> None:
    """The planted file does run its payload under a plain unpickling (so the refusal above mattered)."""
    torch.load(path, map_location="cpu", weights_only=False)
    assert marker.exists()


pytestmark = pytest.mark.usefixtures("lone_process")  # the trainer's process-group variables undone after each test


def test_rng_state_is_plain_and_restores_every_generator():
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    state = rng_state()
    expected = (random.random(), np.random.rand(), float(torch.rand(())))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    set_rng_state(state)
    assert (random.random(), np.random.rand(), float(torch.rand(()))) == expected
    assert isinstance(state["numpy"]["state"]["key"], list)  # no ndarray: nothing but plain values to unpickle


def test_a_stage1_checkpoint_loads_weights_only_and_a_planted_object_is_refused(tmp_path, one_thread):
    cfg = load_config(TokenizerTrainConfig, None, [*TINY_TOKENIZER, f"run.out_dir={tmp_path / 'run'}"])
    train_tokenizer(cfg)
    path = list_checkpoints(tmp_path / "run" / "checkpoints")[-1]
    assert load_checkpoint(path)["step"] == 2  # the trainer's own state passes the weights-only unpickler
    marker = tmp_path / "marker"
    plant(path, marker)
    with pytest.raises(ArtifactError, match="has .* bytes, .* were written"):  # the integrity record sees it
        TokenizerTrainer(cfg)
    record_integrity([path], record_path(path))  # a planter who rewrites the record too meets the unpickler
    with pytest.raises(UnsafeCheckpointError, match=rf"{path.name} holds a pickled object that is not training "
                                                    r"state \((io|builtins)\.open\); it was refused, not unpickled"):
        TokenizerTrainer(cfg)
    assert not marker.exists()
    assert issubclass(UnsafeCheckpointError, UserError)  # the CLI prints it without a traceback
    assert_payload_is_live(path, marker)


def generator_config(tmp_path, stage: int) -> GeneratorTrainConfig:
    if not (tmp_path / "cache").exists():
        make_cache(tmp_path / "cache", num_images=12, images_per_shard=8, codebook_size=64, grid=(2, 3))
    return load_config(GeneratorTrainConfig, None, [
        f"data.cache={tmp_path / 'cache'}", "model.size=nano", "data.batch_size=4", "run.steps=2",
        f"run.out_dir={tmp_path / 'run'}", f"run.deepspeed={REPO / f'configs/deepspeed/zero{stage}.yaml'}",
        "run.checkpoint_every=2", "run.val_every=100"])


@pytest.mark.parametrize("stage, file", [(2, "mp_rank_00_model_states.pt"),
                                         (2, "zero_pp_rank_0_mp_rank_00_optim_states.pt"),
                                         (3, "zero_pp_rank_0_mp_rank_00_optim_states.pt")])
def test_a_deepspeed_checkpoint_resumes_weights_only_and_a_planted_object_is_refused(tmp_path, stage, file):
    cfg = generator_config(tmp_path, stage)
    train_generator(cfg)
    tag = tmp_path / "run" / "checkpoints" / "step_00000002"
    resumed = GeneratorTrainer(cfg)  # DeepSpeed's own files (loss scaler, ZeRO stage enum) load weights-only
    assert resumed.step == 2
    marker = tmp_path / "marker"
    plant(tag / file, marker)
    with pytest.raises(ArtifactError, match=f"{file} has .* bytes"):  # the integrity record sees it
        GeneratorTrainer(cfg)
    record_integrity([f for f in sorted(tag.rglob("*")) if f.is_file() and f.name != INTEGRITY_FILE],
                     tag / INTEGRITY_FILE)  # a planter who rewrites the record too meets the unpickler
    with pytest.raises(UnsafeCheckpointError, match=rf"{tag} holds a pickled object that is not training state "
                                                    r"\((io|builtins)\.open\)"):
        GeneratorTrainer(cfg)
    assert not marker.exists()
    assert_payload_is_live(tag / file, marker)
