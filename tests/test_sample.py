"""`simvq sample`: the written images are the tokenizer's decoding of `generate`'s codes, bit for bit, under
samples.npz's arr_0; classes are balanced, or follow class_counts exactly; a sample (its class too) depends on
its index alone (not the batch size, the split into calls or the process count); a prefix image's top code rows
are kept; a foreign tokenizer, unknown classes, misplaced conditions and bad class_counts are refused."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.config import SampleConfig
from pipelines.conditions import Conditions, class_order
from pipelines.sample import SEEDS_RULE, generate_images, sample
from pipelines.sample_files import RankParts, grid_layout, write_samples
from pipelines.text import DEFAULT_TEXT_ENCODER as TEXT_ENCODER
from pipelines.text import TextEncoder
from simvq_common.errors import UserError
from simvq_common.run_dir import RunDir
from image_data.image_folder import ImageFolderDataset
from stage1_tokenizer.tokenizer import Tokenizer
from stage2_generator.cache_reader import CodeCache
from stage2_generator.conditionings import TextTokens
from stage2_generator.config import GeneratorConfig, SamplingConfig
from stage2_generator.model import Generator
from stage2_generator.sampling import generate
from synthetic_cache import make_cache
from text_encoders import tiny_t5_dir
from tiny_models import tiny_tokenizer

K, GRID, PIXELS = 64, [4, 4], 8  # the tiny tokenizer downsamples by 2: 4 x 4 codes <-> 8 x 8 px
CLASS_NAMES = ["ant", "bee", "cat"]


def random_generator(conditioning: str, tokenizer: Tokenizer, tokenizer_dir, **kw) -> Generator:
    torch.manual_seed(1)
    cfg = GeneratorConfig(size="nano", conditioning=conditioning, codebook_size=K, grid=list(GRID),
                          num_classes=len(CLASS_NAMES) if conditioning == "class" else 0,
                          class_names=CLASS_NAMES if conditioning == "class" else [],
                          tokenizer_path=str(tokenizer_dir), tokenizer_fingerprint=tokenizer.fingerprint(), **kw)
    model = Generator(cfg)
    with torch.no_grad():
        for p in model.parameters():  # every weight random: the head is zero-initialised otherwise
            p.normal_(0, 0.2)
    return model.eval()


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    tokenizer = tiny_tokenizer(0)
    tokenizer.save_pretrained(root / "tokenizer")
    tiny_tokenizer(1).save_pretrained(root / "other_tokenizer")
    made = {"root": root, "tokenizer": root / "tokenizer", "other_tokenizer": root / "other_tokenizer"}
    for name, conditioning, kw in [("class", "class", {}), ("none", "none", {}),
                                   ("text", "text", {"text_dim": 384, "text_encoder": TEXT_ENCODER}),
                                   ("text_other", "text", {"text_dim": 384, "text_encoder": "someone/else"})]:
        random_generator(conditioning, tokenizer, root / "tokenizer", **kw).save_pretrained(root / name)
        made[name] = root / name
    # token features of a small T5 made here, and a generator that learned another copy of its weights
    made["t5"] = tiny_t5_dir(root / "t5")
    t5 = TextEncoder(str(made["t5"]), max_tokens=6).info
    tokens = {"text_dim": t5["dim"], "text_encoder": t5["name"], "text_encoder_sha256": t5["weights_sha256"],
              "text_features": "tokens", "text_max_tokens": 6}
    for name, kw in [("tokens", tokens), ("tokens_other_weights", {**tokens, "text_encoder_sha256": "0123abcd"})]:
        random_generator("text", tokenizer, root / "tokenizer", **kw).save_pretrained(root / name)
        made[name] = root / name
    made["run"] = RunDir(root / "run", kind="generator-run").root  # a run directory passed for its generator/
    return made


def run(dirs, out, generator="class", **kw) -> tuple[dict, dict]:
    summary = sample(SampleConfig(generator=str(dirs[generator]), out=str(out), **kw))
    with np.load(out / "samples.npz") as data:
        return summary, {key: data[key] for key in data.files}


def by_hand(dirs, generator, condition, indices, sampling, prefix=None):
    """The definition: generate's codes, decoded, round((x + 1) * 127.5) clamped, NHWC."""
    model = Generator.from_pretrained(dirs[generator])
    tokenizer = Tokenizer.from_pretrained(dirs["tokenizer"])
    codes = generate(model, condition, list(indices), sampling, prefix_codes=prefix)
    x = tokenizer.decode(codes.view(len(indices), *GRID))
    images = ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return codes.numpy(), images


def test_images_are_the_decoded_codes_of_generate(dirs, tmp_path, one_thread):
    sampling = SamplingConfig(guidance_scale=2.0, temperature=0.9, top_k=40, seed=7)
    summary, got = run(dirs, tmp_path, num_samples=7, batch_size=3, first_index=2, sampling=sampling, save_pngs=True)
    indices = np.arange(2, 9)
    labels = indices % 3  # all classes, round-robin by global index
    codes, images = by_hand(dirs, "class", torch.from_numpy(labels), indices, sampling)
    # arr_0, the ADM suite's key, holds the pixels once: no `images` beside it
    assert set(got) == {"arr_0", "labels", "indices", "prompts", "codes"}
    assert got["arr_0"].dtype == np.uint8 and got["arr_0"].shape == (7, PIXELS, PIXELS, 3)
    np.testing.assert_array_equal(got["arr_0"], images)
    np.testing.assert_array_equal(got["codes"], codes)
    assert got["codes"].dtype == np.int32
    np.testing.assert_array_equal(got["labels"], labels)
    np.testing.assert_array_equal(got["indices"], indices)
    assert got["labels"].dtype == got["indices"].dtype == np.int64
    assert got["prompts"].tolist() == [""] * 7
    assert len(np.unique(got["arr_0"].reshape(7, -1), axis=0)) == 7  # the samples do differ

    # one PNG per sample, the same pixels; the grid has a row per class (indices 3, 6 | 4, 7 | 2, 5, 8)
    for i, index in enumerate(indices):
        np.testing.assert_array_equal(np.array(Image.open(tmp_path / "png" / f"{index:06d}.png")), images[i])
    grid = np.array(Image.open(tmp_path / "grid.png"))
    assert grid.shape == (3 * PIXELS, 3 * PIXELS, 3)
    np.testing.assert_array_equal(grid[2 * PIXELS:, 2 * PIXELS:], images[6])  # row "cat" (2): indices 2, 5, 8
    np.testing.assert_array_equal(grid[:PIXELS, 2 * PIXELS:], 255)  # row "ant" has 2 samples: white padding

    record = json.loads((tmp_path / "sampling.json").read_text())
    tokenizer_fp = Tokenizer.from_pretrained(dirs["tokenizer"]).fingerprint()
    generator_fp = Generator.from_pretrained(dirs["class"]).fingerprint()
    assert summary == {"out": str(tmp_path), "num_samples": 7, "generator_fingerprint": generator_fp,
                       "tokenizer_fingerprint": tokenizer_fp}
    assert record["seeds"] == SEEDS_RULE and "default_rng([seed, g])" in record["seeds"]
    assert record["config"]["sampling"] == {"guidance_scale": 2.0, "guidance_schedule": "constant",
                                            "temperature": 0.9, "top_k": 40, "top_p": 1.0, "seed": 7, "compile": False}
    assert record["tokenizer"] == {"path": str(dirs["tokenizer"].resolve()), "fingerprint": tokenizer_fp}
    assert record["generator"]["fingerprint"] == generator_fp
    assert record["classes"] == {"ids": [0, 1, 2], "names": CLASS_NAMES}
    assert record["counts"]["per_condition"] == [2, 2, 3] and record["counts"]["num_samples"] == 7
    assert record["environment"]["torch"] == torch.__version__ and record["seconds"] > 0


def test_classes_by_name_or_id_are_balanced(dirs, tmp_path, one_thread):
    _, got = run(dirs, tmp_path / "a", classes=["cat", "0"], num_samples=9, first_index=5, batch_size=9)
    # index g gets classes[g mod 2]: 5 -> 0 (ant), 6 -> 2 (cat), ...
    assert got["labels"].tolist() == [0, 2, 0, 2, 0, 2, 0, 2, 0]
    _, got = run(dirs, tmp_path / "b", num_samples=10, batch_size=10)
    assert np.bincount(got["labels"]).tolist() == [4, 3, 3]
    _, got = run(dirs, tmp_path / "c", per_class=2, batch_size=10)  # num_samples=0: per_class x all classes
    assert np.bincount(got["labels"]).tolist() == [2, 2, 2]


def test_class_counts_give_each_class_exactly_its_count_interleaved(dirs, tmp_path, one_thread):
    sampling = SamplingConfig(temperature=1.1, seed=5)
    _, whole = run(dirs, tmp_path / "whole", class_counts=[1, 3, 2], batch_size=4, sampling=sampling)
    # class c's k-th sample at (k + 1/2) / count: bee 1/6, cat 1/4, ant 1/2, bee 1/2, cat 3/4, bee 5/6
    assert whole["labels"].tolist() == [1, 2, 0, 1, 2, 1] and np.bincount(whole["labels"]).tolist() == [1, 3, 2]
    codes, images = by_hand(dirs, "class", torch.tensor([1, 2, 0, 1, 2, 1]), range(6), sampling)
    np.testing.assert_array_equal(whole["arr_0"], images)
    np.testing.assert_array_equal(whole["codes"], codes)
    record = json.loads((tmp_path / "whole" / "sampling.json").read_text())
    assert record["counts"]["per_condition"] == [1, 3, 2] and record["config"]["class_counts"] == [1, 3, 2]

    # the counts plan indices 0..5: a call for indices 2..4 draws those same samples
    _, part = run(dirs, tmp_path / "part", class_counts=[1, 3, 2], first_index=2, num_samples=3, batch_size=2,
                  sampling=sampling)
    for key in ("arr_0", "codes", "labels", "indices"):
        np.testing.assert_array_equal(part[key], whole[key][2:5])
    # with `classes`, one count per class given, in its order: cat, ant, cat
    _, named = run(dirs, tmp_path / "named", classes=["cat", "ant"], class_counts=[2, 1], batch_size=3)
    assert named["labels"].tolist() == [2, 0, 2]

    # two processes: rank r draws positions r, r + 2, ...; the same index -> class and image as one process
    model = Generator.from_pretrained(dirs["class"])
    tokenizer = Tokenizer.from_pretrained(dirs["tokenizer"])
    conditions = Conditions(CLASS_NAMES, [0, 1, 2], [""] * 3, torch.arange(3), order=class_order([1, 3, 2]))
    indices = np.arange(6)
    parts = [generate_images(model, tokenizer, conditions, indices[r::2], sampling, batch_size=2) for r in range(2)]
    np.testing.assert_array_equal(RankParts([images for _, images in parts]).rows(0, 6), whole["arr_0"])
    assert [conditions.slots(indices[r::2]).tolist() for r in range(2)] == [[1, 0, 2], [2, 1, 1]]


@pytest.mark.parametrize("generator, kw, message", [
    ("class", {"class_counts": [1, 2]}, r"class_counts has 2 entries but there are 3 classes \(the generator's "
                                        r"classes\).*in class-id order"),
    ("class", {"classes": ["cat"], "class_counts": [1, 2]}, r"2 entries but there are 1 classes \(the classes "
                                                           r"given\).*in the order of `classes`"),
    ("class", {"class_counts": [2, -1, 1]}, r"class_counts=\[2, -1, 1\]: every count must be a whole number >= 0"),
    ("class", {"class_counts": [0, 0, 0]}, r"sums to 0"),
    ("class", {"class_counts": [1, 1, 1], "num_samples": 4}, r"indices 0..2, but first_index=0 with num_samples=4"),
    ("class", {"class_counts": [1, 1, 1], "first_index": 3}, r"first_index=3 is past them"),
    ("none", {"class_counts": [4]}, "unconditional: drop class_counts"),
])
def test_bad_class_counts_are_refused_naming_the_problem(dirs, tmp_path, generator, kw, message):
    with pytest.raises(UserError, match=message):
        sample(SampleConfig(generator=str(dirs[generator]), out=str(tmp_path), **kw))
    assert not (tmp_path / "samples.npz").exists()


def test_a_sample_depends_on_its_index_only(dirs, tmp_path, one_thread):
    sampling = SamplingConfig(temperature=1.2, seed=3)
    _, whole = run(dirs, tmp_path / "whole", num_samples=6, batch_size=4, sampling=sampling)
    _, head = run(dirs, tmp_path / "head", num_samples=4, batch_size=3, sampling=sampling)
    _, tail = run(dirs, tmp_path / "tail", num_samples=2, first_index=4, batch_size=1, sampling=sampling)
    for key in ("arr_0", "codes", "labels", "indices"):
        np.testing.assert_array_equal(whole[key], np.concatenate([head[key], tail[key]]))

    # two processes: rank r draws positions r, r + 2, ...; rank 0 interleaves them back
    model = Generator.from_pretrained(dirs["class"])
    tokenizer = Tokenizer.from_pretrained(dirs["tokenizer"])
    conditions = Conditions(CLASS_NAMES, [0, 1, 2], [""] * 3, torch.arange(3))
    indices = np.arange(6)
    parts = [generate_images(model, tokenizer, conditions, indices[r::2], sampling, batch_size=2) for r in range(2)]
    np.testing.assert_array_equal(RankParts([codes for codes, _ in parts]).rows(0, 6), whole["codes"])
    np.testing.assert_array_equal(RankParts([images for _, images in parts]).rows(0, 6), whole["arr_0"])
    letters = RankParts([np.array(list("aeim")), np.array(list("bfj")), np.array(list("cgk")), np.array(list("dhl"))])
    assert "".join(letters.rows(0, 13)) == "abcdefghijklm"
    for start in range(13):  # every window, as the streamed samples.npz writer reads them
        for stop in range(start, 14):
            assert "".join(letters.rows(start, stop)) == "abcdefghijklm"[start:stop]
    assert letters[9] == "j"


def test_a_tokenizer_with_another_fingerprint_is_refused(dirs, tmp_path):
    want = Tokenizer.from_pretrained(dirs["tokenizer"]).fingerprint()
    other = Tokenizer.from_pretrained(dirs["other_tokenizer"]).fingerprint()
    assert want != other
    with pytest.raises(UserError, match=f"{other}.*{want}"):
        sample(SampleConfig(generator=str(dirs["class"]), tokenizer=str(dirs["other_tokenizer"]), out=str(tmp_path)))
    assert not (tmp_path / "samples.npz").exists()


def test_prefix_rows_are_the_prefix_images_codes(dirs, tmp_path, one_thread):
    # a 12 x 10 image: the shorter side resized to 8 px (9 x 8), then the centre 8 x 8 crop
    folder = tmp_path / "prefix"
    folder.mkdir()
    pixels = np.random.default_rng(0).integers(0, 256, (10, 12, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(folder / "image.png")
    tokenizer = Tokenizer.from_pretrained(dirs["tokenizer"])
    image, _ = ImageFolderDataset(folder, PIXELS, train=False).load(0)  # the evaluation splits' convention
    top_rows = tokenizer.encode(image[None])[:, :2].reshape(1, -1)  # 2 rows x 4 codes

    sampling = SamplingConfig(seed=4)
    _, got = run(dirs, tmp_path / "out", num_samples=5, batch_size=2, prefix_image=str(folder / "image.png"),
                 prefix_rows=2, sampling=sampling)
    np.testing.assert_array_equal(got["codes"][:, :8], top_rows.expand(5, -1).numpy())
    assert len(np.unique(got["codes"][:, 8:], axis=0)) > 1  # the rest is generated
    codes, images = by_hand(dirs, "class", torch.arange(5) % 3, range(5), sampling, prefix=top_rows.expand(5, -1))
    np.testing.assert_array_equal(got["codes"], codes)
    np.testing.assert_array_equal(got["arr_0"], images)
    record = json.loads((tmp_path / "out" / "sampling.json").read_text())
    assert record["prefix"]["rows"] == 2 and record["prefix"]["codes"] == top_rows[0].tolist()

    for rows in (0, 4):
        with pytest.raises(UserError, match=r"prefix_rows=.*\[1, 3\]"):
            run(dirs, tmp_path / "bad", prefix_image=str(folder / "image.png"), prefix_rows=rows)


@pytest.mark.parametrize("generator, kw, message", [
    ("class", {"classes": ["zebra", "1"]}, r"\['zebra'\].*\['ant', 'bee', 'cat'\]"),
    ("class", {"prompts": ["a cat"]}, "class-conditional: pass classes"),
    ("none", {"classes": ["0"]}, "unconditional: drop classes"),
    ("text", {"classes": ["0"]}, "text-conditional: pass prompts"),
    ("text", {}, "give exactly one of prompts="),
    ("text", {"prompts": ["a"], "prompts_file": "p.txt"}, "exactly one of .*; got prompts and prompts_file"),
    ("text", {"prompts_file": "nowhere.txt"}, "prompts_file=nowhere.txt does not exist"),
    ("class", {"prompts_file": "p.txt"}, "prompts_file=p.txt but the generator is class-conditional"),
    ("text_other", {"prompts": ["a cat"]}, "text encoder 'someone/else' is neither a directory nor a Hub model "
                                           "available here"),
    ("tokens_other_weights", {"prompts": ["a cat"]}, r"the generator was made with text encoder .*, which differs "
                                                     r"from the one loaded here \(weights_sha256: '0123abcd' vs "
                                                     r"'[0-9a-f]{16}'"),
    ("none", {"sampling": SamplingConfig(guidance_scale=2.0)}, "guidance needs a conditional generator"),
    ("missing", {}, "generator directory .*missing does not exist"),
    ("tokenizer", {}, r"tokenizer is a tokenizer \(`simvq train-tokenizer` writes one as RUN_DIR/tokenizer\), not a "
                      r"generator"),
    ("run", {}, r"is a generator training run \(its generator is RUN_DIR/generator\), not a generator"),
])
def test_misplaced_requests_are_refused(dirs, tmp_path, generator, kw, message, monkeypatch):
    directory = dirs.get(generator, dirs["root"] / generator)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.txt").write_text("a cat\n")
    with pytest.raises(UserError, match=message):
        sample(SampleConfig(generator=str(directory), out=str(tmp_path / "out"), **kw))


def test_unconditional_samples_form_a_square_grid(dirs, tmp_path, one_thread):
    _, got = run(dirs, tmp_path, generator="none", num_samples=5)
    assert got["labels"].tolist() == [-1] * 5
    assert np.array(Image.open(tmp_path / "grid.png")).shape == (2 * PIXELS, 3 * PIXELS, 3)  # 3 + 2 (+ 1 white)
    assert grid_layout(np.zeros(5, np.int64)) == [[0, 1, 2], [3, 4]]


def test_write_samples_takes_the_tokenizers_nchw_tensors(tmp_path):
    """The baseline writes its samples through write_samples with to_uint8's (N, 3, H, W) tensors."""
    images = torch.randint(0, 256, (4, 3, PIXELS, PIXELS), dtype=torch.uint8)
    write_samples(tmp_path, images, labels=[2, 0, 2, 1], indices=range(4), codes=torch.zeros(4, 16, dtype=torch.long),
                  prompts=[""] * 4, meta={"kind": "test"})
    with np.load(tmp_path / "samples.npz") as got:
        np.testing.assert_array_equal(got["arr_0"], images.permute(0, 2, 3, 1).numpy())
        assert got["codes"].dtype == np.int32 and got["labels"].tolist() == [2, 0, 2, 1]
    assert json.loads((tmp_path / "sampling.json").read_text()) == {"kind": "test"}
    grid = np.array(Image.open(tmp_path / "grid.png"))  # rows by class: [1], [3], [0, 2]
    np.testing.assert_array_equal(grid[2 * PIXELS:, PIXELS:], images[2].permute(1, 2, 0).numpy())
    np.testing.assert_array_equal(grid[:PIXELS, PIXELS:], 255)


def test_prompts_condition_a_text_generator(dirs, tmp_path, one_thread):
    prompts = ["a red circle", "a blue square"]
    sampling = SamplingConfig(guidance_scale=1.5, seed=2)
    _, got = run(dirs, tmp_path, generator="text", prompts=prompts, per_prompt=2, batch_size=3, sampling=sampling)
    assert got["prompts"].tolist() == prompts * 2 and got["labels"].tolist() == [-1] * 4
    embeddings = torch.from_numpy(TextEncoder(device=torch.device("cpu")).encode(prompts).features)
    codes, images = by_hand(dirs, "text", embeddings[torch.arange(4) % 2], range(4), sampling)
    np.testing.assert_array_equal(got["codes"], codes)
    np.testing.assert_array_equal(got["arr_0"], images)
    record = json.loads((tmp_path / "sampling.json").read_text())
    assert record["text_encoder"]["name"] == TEXT_ENCODER and record["config"]["prompts"] == prompts
    assert record["prompt_source"] == {"kind": "config"}


def test_token_feature_prompts_from_a_file_condition_their_samples(dirs, tmp_path, one_thread):
    prompts = ["a red circle", "a blue square with a very long description"]  # the second one is truncated
    (tmp_path / "prompts.txt").write_text(f"{prompts[0]}\n\n  {prompts[1]}  \n")
    sampling = SamplingConfig(guidance_scale=2.0, seed=4)
    _, got = run(dirs, tmp_path / "out", generator="tokens", prompts_file=str(tmp_path / "prompts.txt"),
                 per_prompt=2, batch_size=3, sampling=sampling)
    assert got["prompts"].tolist() == prompts * 2
    text = TextEncoder(str(dirs["t5"]), max_tokens=6).encode(prompts)
    assert text.mask.sum(1).tolist() == [6, 6] and text.mask.all()
    short = TextEncoder(str(dirs["t5"]), max_tokens=40).encode(prompts)
    assert short.mask.sum(1).tolist() == [len(prompts[0].encode()) + 1, 40]  # bytes + EOS, left-padded
    condition = TextTokens(torch.from_numpy(text.features), torch.from_numpy(text.mask))[torch.arange(4) % 2]
    codes, images = by_hand(dirs, "tokens", condition, range(4), sampling)
    np.testing.assert_array_equal(got["codes"], codes)
    np.testing.assert_array_equal(got["arr_0"], images)
    record = json.loads((tmp_path / "out" / "sampling.json").read_text())
    assert record["text_encoder"]["features"] == "tokens" and record["text_encoder"]["max_tokens"] == 6
    assert record["prompt_source"]["kind"] == "file" and len(record["prompt_source"]["sha256"]) == 16


def test_prompts_from_a_cache_are_its_captions_one_per_image(dirs, tmp_path, one_thread):
    make_cache(tmp_path / "val", num_images=5, images_per_shard=2, aug="flip", skipped=(3,))
    _, got = run(dirs, tmp_path / "out", generator="text", prompts_from=str(tmp_path / "val"), per_prompt=1)
    assert got["prompts"].tolist() == [f"image {i} of class {['cat', 'dog', 'owl'][i % 3]}" for i in (0, 1, 2, 4)]
    record = json.loads((tmp_path / "out" / "sampling.json").read_text())
    assert record["prompt_source"] == {"kind": "cache", "path": str((tmp_path / "val").resolve()),
                                       "fingerprint": CodeCache(tmp_path / "val").fingerprint, "images": 4}


TWO_PROCESS_COUNTS = [30, 3, 15]  # 48 samples in an unbalanced mix: each index's class must not depend on the rank


def _sampling_worker(rank, world, port, generator_dir, out):
    import os

    import nccl_rules

    from simvq_common import distributed

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    nccl_rules.install()
    nccl_rules.OBJECT_LIMIT = 4096  # the rule at this test's 8 px: 48 samples are ~12 KB, as 50k at 256 px are ~10 GB
    try:
        sample(SampleConfig(generator=generator_dir, out=out, class_counts=TWO_PROCESS_COUNTS, batch_size=5,
                            save_pngs=True, sampling=SamplingConfig(guidance_scale=2.0, seed=4)))
    finally:
        distributed.shutdown()


@pytest.mark.slow
def test_two_processes_write_through_the_disk_what_one_process_writes(dirs, tmp_path, one_thread):
    import torch.multiprocessing as mp

    from simvq_common.distributed import free_port

    mp.start_processes(_sampling_worker, args=(2, free_port(), str(dirs["class"]), str(tmp_path / "two")),
                       nprocs=2, start_method="spawn", join=True)
    _, one = run(dirs, tmp_path / "one", class_counts=TWO_PROCESS_COUNTS, batch_size=7, save_pngs=True,
                 sampling=SamplingConfig(guidance_scale=2.0, seed=4))
    assert np.bincount(one["labels"]).tolist() == TWO_PROCESS_COUNTS
    with np.load(tmp_path / "two" / "samples.npz") as data:
        two = {key: data[key] for key in data.files}
    assert two.keys() == one.keys()
    for key in one:
        np.testing.assert_array_equal(two[key], one[key])
    assert sorted(p.name for p in (tmp_path / "two" / "png").iterdir()) == [f"{i:06d}.png" for i in range(48)]
    assert (tmp_path / "two" / "grid.png").read_bytes() == (tmp_path / "one" / "grid.png").read_bytes()
    assert not (tmp_path / "two" / "parts").exists()  # the per-rank parts are removed once merged
    assert json.loads((tmp_path / "two" / "sampling.json").read_text())["counts"]["world_size"] == 2


def test_a_samples_file_that_is_not_an_npz_is_named_as_such(tmp_path):
    from pipelines.config import EvaluateConfig
    from pipelines.evaluate import evaluate

    (tmp_path / "samples.npz").write_bytes(b"\x80\x04not a zip archive")
    with pytest.raises(UserError, match=r"samples.npz is not an .npz archive") as err:
        evaluate(EvaluateConfig(samples=str(tmp_path / "samples.npz")))
    assert "allow_pickle" not in str(err.value)
    write_samples(tmp_path / "s", np.zeros((1, 8, 8, 3), np.uint8), labels=[0], indices=[0], codes=[[0]], prompts=[""],
                  meta={})
    with pytest.raises(UserError, match="is a samples directory .*, not a generator"):
        sample(SampleConfig(generator=str(tmp_path / "s"), out=str(tmp_path / "o")))
