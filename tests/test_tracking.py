"""Experiment tracking: both trainers' metrics.jsonl records reach TensorBoard's event files number for number
(read back with TensorBoard's own reader), under grouped tags; stage 1's reconstruction grid and the pipeline's
sample grid are images there; a resumed run re-logs its steps once; W&B runs offline into the run directory,
one run id across resumes."""
import io
import json
import math
import struct
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from simvq_common.config import load_config
from simvq_common.errors import ConfigError
from simvq_common.run_dir import read_metrics
from simvq_common.tracking import NOT_METRICS, WANDB_ID_FILE, Tracker, TrackingSettings, scalars, tag_for, wandb_mode
from stage1_tokenizer.train import train_tokenizer
from stage2_generator.config import GeneratorTrainConfig
from stage2_generator.train import train_generator
from synthetic_cache import make_cache
from test_train_tokenizer import tiny_config

REPO = Path(__file__).resolve().parents[1]
TOKENIZER_TAGS = {"train/loss", "train/l1", "train/perceptual", "train/quantizer_loss", "train/g_adv", "train/d_loss",
                  "train/gan_weight", "optim/lr", "optim/grad_norm", "codebook/utilisation", "codebook/perplexity",
                  "speed/images_per_s", "progress/epoch", "progress/global_batch", "data/skipped_images",
                  "data/dropped_batches", "val/l1"}
GENERATOR_TAGS = {"train/loss", "train/perplexity", "optim/lr", "optim/grad_norm", "speed/tokens_per_s",
                  "speed/model_flops_per_s", "progress/epoch", "progress/global_batch", "progress/tokens_per_step",
                  "val/loss", "val/perplexity", "val/sequences"}


@pytest.fixture(autouse=True)
def lone_wandb_process(monkeypatch, tmp_path, lone_process):
    """A lone process on the CPU; W&B's own settings and caches in the test's folder, not the home directory."""
    monkeypatch.setenv("WANDB_MODE", "")  # registers its original value (or absence) for the undo
    monkeypatch.delenv("WANDB_MODE")
    for key in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(key, str(tmp_path / "wandb-home"))


def events(run_dir: Path) -> EventAccumulator:
    accumulator = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    accumulator.Reload()
    return accumulator


def scalar_steps(accumulator: EventAccumulator) -> dict[str, dict[int, float]]:
    """tag -> {step: value}, refusing a step that appears twice (a resume that logged it again)."""
    found = {}
    for tag in accumulator.Tags()["scalars"]:
        steps = [e.step for e in accumulator.Scalars(tag)]
        assert len(steps) == len(set(steps)), f"{tag}: steps {steps}"
        found[tag] = {e.step: e.value for e in accumulator.Scalars(tag)}
    return found


def assert_same_numbers(logged: dict[str, dict[int, float]], records: list[dict], kind: str) -> None:
    """Every number of each step's last record is its tag's value at that step (TensorBoard keeps float32),
    and TensorBoard holds nothing else."""
    expected = {}
    for step, record in {r["step"]: r for r in records}.items():
        for tag, value in scalars(record, kind).items():
            expected.setdefault(tag, {})[step] = value
    assert logged.keys() == expected.keys()
    for tag, steps in expected.items():
        assert logged[tag].keys() == steps.keys(), tag
        for step, value in steps.items():
            mine = np.float32(value)
            assert logged[tag][step] == mine or (math.isnan(mine) and math.isnan(logged[tag][step])), (tag, step)


def test_tags_are_grouped_and_only_numbers_are_sent():
    assert tag_for("perplexity", "tokenizer-run") == "codebook/perplexity"
    assert tag_for("perplexity", "generator-run") == "train/perplexity"
    assert (tag_for("val_loss"), tag_for("lr"), tag_for("tokens_per_s"), tag_for("l1")) == (
        "val/loss", "optim/lr", "speed/tokens_per_s", "train/l1")
    record = {"step": 3, "time": 1.5, "loss": 0.5, "count": np.int64(2), "note": "x", "flag": True, "shape": [1],
              "none": None, "nan": float("nan")}
    sent = scalars(record)
    assert set(sent) == {"train/loss", "train/count", "train/nan"} and sent["train/count"] == 2.0
    assert not set(NOT_METRICS) & {k.split("/")[-1] for k in sent}


def test_tokenizer_metrics_and_grids_reach_tensorboard_and_a_resume_logs_each_step_once(tmp_path, one_thread):
    run = tmp_path / "run"
    train_tokenizer(tiny_config(run, "run.steps=3", "run.image_every=2"))
    first = events(run)
    records = read_metrics(run / "metrics.jsonl")
    assert set(first.Tags()["scalars"]) == TOKENIZER_TAGS
    assert_same_numbers(scalar_steps(first), records, "tokenizer-run")
    assert all(math.isfinite(r["grad_norm"]) for r in records)
    png = np.asarray(Image.open(run / "reconstructions" / "step_00000002.png"))
    images = first.Images("images/reconstructions")
    assert [(e.step, e.height, e.width) for e in images] == [(2, *png.shape[:2]), (3, *png.shape[:2])]
    assert png.shape[:2] == (2 * 16, 16 * 16)  # 16 val images over their 16 reconstructions, 16 px each
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(images[0].encoded_image_string))), png)

    # killed after logging step 3 but before its checkpoint: the resume from step 2 logs step 3 again
    (run / "checkpoints" / "step_00000003.pt").unlink()
    train_tokenizer(tiny_config(run, "run.steps=4", "run.image_every=2"))
    records = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 3, 4]  # metrics.jsonl appends; TensorBoard hides the stale 3
    resumed = events(run)
    logged = scalar_steps(resumed)
    assert logged["train/loss"].keys() == {1, 2, 3, 4}
    assert_same_numbers(logged, records, "tokenizer-run")
    assert [e.step for e in resumed.Images("images/reconstructions")] == [2, 4]  # step 3's grid was the old run's


def test_generator_metrics_reach_tensorboard_and_the_pipeline_adds_its_sample_grid(tmp_path):
    from pipelines.run import log_grid

    make_cache(tmp_path / "cache", num_images=20, images_per_shard=8, codebook_size=64, grid=(2, 3))
    cfg = load_config(GeneratorTrainConfig, None, [
        f"data.cache={tmp_path / 'cache'}", f"data.val_cache={tmp_path / 'cache'}", "data.val_sequences=8",
        "model.size=nano", "data.batch_size=4", "run.steps=3", f"run.out_dir={tmp_path / 'run'}",
        f"run.deepspeed={REPO / 'configs/deepspeed/zero2.yaml'}", "run.log_every=1", "run.val_every=2",
        "run.checkpoint_every=3"])
    train_generator(cfg)
    run = tmp_path / "run"
    records = read_metrics(run / "metrics.jsonl")
    logged = scalar_steps(events(run))
    assert set(logged) == GENERATOR_TAGS
    assert logged["val/loss"].keys() == {2, 3}
    assert_same_numbers(logged, records, "generator-run")

    grid = np.random.default_rng(0).integers(0, 256, (24, 40, 3), dtype=np.uint8)
    Image.fromarray(grid).save(tmp_path / "grid.png")
    log_grid(cfg, tmp_path / "grid.png")
    after = events(run)
    assert [(e.step, e.height, e.width) for e in after.Images("images/samples")] == [(3, 24, 40)]
    assert scalar_steps(after) == logged  # the last step's scalars are kept beside the grid


def wandb_records(path: Path) -> list:
    """The records of an offline W&B run file: a 7-byte header (":W&B", magic, version), then LevelDB-log
    chunks (crc32c, length, type; FULL = 1 or FIRST / MIDDLE / LAST = 2 / 3 / 4) in 32 KiB blocks, each
    record a protobuf `Record` (wandb 0.31 ships no reader of its own)."""
    from wandb.proto import wandb_internal_pb2

    data, block, position, parts, records = path.read_bytes(), 32768, 7, [], []
    assert data[:4] == b":W&B"
    while position + 7 <= len(data):
        left = block - position % block
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        if left < 7 or (length == 0 and kind == 0):  # a block's zero-padded tail
            position += left
            continue
        if position + 7 + length > len(data):  # a chunk still being written
            break
        parts.append(data[position + 7:position + 7 + length])
        position += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(parts))
            records.append(record)
            parts = []
    return records


def finished_records(path: Path, timeout: float = 30.0) -> list:
    """The run file's records once its exit record is written: W&B's service process may still be writing
    when `finish` returns."""
    deadline = time.monotonic() + timeout
    while True:
        records = wandb_records(path)
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def wandb_history(path: Path) -> list[dict]:
    """Each logged row: tag -> value (an image: its fields, which W&B records as nested keys)."""
    rows = []
    for record in finished_records(path):
        if record.WhichOneof("record_type") == "history":
            row = {}
            for item in record.history.item:
                tag, *field = list(item.nested_key) or [item.key]
                value = json.loads(item.value_json)
                if field:
                    row.setdefault(tag, {})[field[0]] = value
                else:
                    row[tag] = value
            rows.append(row)
    return rows


@pytest.mark.slow
def test_wandb_runs_offline_in_the_run_directory_and_a_resume_continues_its_run(tmp_path):
    run = tmp_path / "run"
    extra = ("run.wandb=test-project", "run.wandb_mode=offline", "run.tensorboard=false", "run.image_every=2")
    train_tokenizer(tiny_config(run, "run.steps=2", *extra))
    run_id = (run / WANDB_ID_FILE).read_text().strip()
    (offline,) = run.glob(f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb")
    assert not (run / "tensorboard").exists()
    history = wandb_history(offline)
    records = read_metrics(run / "metrics.jsonl")
    last = {tag: row[tag] for row in history for tag in row}
    for tag, value in scalars(records[-1], "tokenizer-run").items():
        assert last[tag] == value or (math.isnan(value) and math.isnan(last[tag])), tag
    assert last["step"] == 2 and last["images/reconstructions"]["_type"] == "image-file"
    config = next(r.run.config for r in finished_records(offline) if r.WhichOneof("record_type") == "run")
    values = {item.key: json.loads(item.value_json) for item in config.update}
    assert values["run"]["wandb"] == "test-project" and values["data"]["resolution"] == 16

    train_tokenizer(tiny_config(run, "run.steps=3", *extra))  # resumed: a second offline file of the same run
    files = sorted(run.glob(f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(files) == 2 and (run / WANDB_ID_FILE).read_text().strip() == run_id
    assert [row["step"] for row in wandb_history(files[-1]) if "train/loss" in row] == [3]


def test_tracking_settings_are_refused_with_the_fix(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match=r"run.wandb_mode='cloud': choose one of \('auto', 'online', 'offline'\)"):
        Tracker(tmp_path, TrackingSettings(wandb="p", wandb_mode="cloud"))
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if the dev extra were not installed
    with pytest.raises(ConfigError, match=r"run.wandb=p needs Weights & Biases: `pip install wandb`"):
        Tracker(tmp_path, TrackingSettings(wandb="p"))
    Tracker(tmp_path, TrackingSettings())  # TensorBoard alone needs no W&B


def test_wandb_mode_auto_follows_wandb_mode_then_hf_hub_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert wandb_mode("auto") == "offline" and wandb_mode("online") == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode("auto") == "disabled"
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert wandb_mode("auto") == "online"


def test_a_run_that_logs_nothing_writes_no_event_file(tmp_path):
    with Tracker(tmp_path, TrackingSettings()) as tracker:
        tracker.log(1, {"note": "text only"})
    assert not (tmp_path / "tensorboard").exists()


def test_switching_a_tracker_retrains_no_pipeline_stage():
    from pipelines.run import training_identity

    cfg = tiny_config("runs/x")
    tracked = tiny_config("runs/x", "run.wandb=p", "run.tensorboard=false", "run.wandb_mode=offline")
    assert training_identity(cfg) == training_identity(tracked)
    assert training_identity(cfg) != training_identity(tiny_config("runs/x", "run.steps=7"))
