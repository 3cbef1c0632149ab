from dataclasses import dataclass, field
from pathlib import Path

import pytest

from simvq_common.config import ConfigError, load_config, to_yaml
from stage2_generator.config import SIZES


@dataclass
class Inner:
    width: int = 8
    rate: float = 0.5


@dataclass
class Outer:
    name: str = "run"
    sizes: list[int] = field(default_factory=lambda: [1, 2])
    inner: Inner = field(default_factory=Inner)


def test_file_then_overrides_merge_in_order(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: fromfile\ninner:\n  width: 16\n")
    cfg = load_config(Outer, path, ["inner.rate=0.25", "sizes=[3,4,5]"])
    assert isinstance(cfg, Outer) and isinstance(cfg.inner, Inner)
    assert (cfg.name, cfg.inner.width, cfg.inner.rate, cfg.sizes) == ("fromfile", 16, 0.25, [3, 4, 5])


def test_yaml_round_trip(tmp_path):
    cfg = load_config(Outer, None, ["inner.width=3"])
    path = tmp_path / "saved.yaml"
    path.write_text(to_yaml(cfg))
    assert load_config(Outer, path) == cfg


@pytest.mark.parametrize("overrides, message", [
    (["inner.widht=3"], "unknown key 'inner.widht'"),
    (["inner.width=abc"], "bad value for 'inner.width'"),
    (["name"], "not of the form key=value"),
])
def test_bad_overrides_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(Outer, None, overrides)


def test_typo_in_file_names_file_and_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("inner:\n  wdth: 3\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: unknown key 'inner\.wdth'"):
        load_config(Outer, path)


def test_missing_file_is_clear(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(Outer, tmp_path / "nope.yaml")


def _schema_for(path):
    from pipelines.config import GenerationStudyConfig, PipelineConfig
    from stage1_tokenizer.config import TokenizerTrainConfig
    from stage2_generator.config import GeneratorTrainConfig
    from studies.config import CollapseStudyConfig, TokenizerComparisonConfig

    schemas = {"study/collapse": CollapseStudyConfig, "study/tokenizers": TokenizerComparisonConfig,
               "study/generation": GenerationStudyConfig,
               "tokenizer/": TokenizerTrainConfig, "generator/": GeneratorTrainConfig,
               "pipeline/": PipelineConfig}
    matches = [schema for prefix, schema in schemas.items() if f"configs/{prefix}" in path.as_posix()]
    assert len(matches) == 1, f"{path}: no schema known for this config; add it to this test"
    return matches[0]


SHIPPED = sorted(p for p in Path(__file__).resolve().parents[1].glob("configs/*/*.yaml")
                 if p.parent.name != "deepspeed")  # DeepSpeed's own format: checked below


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_shipped_configs_validate(path):
    cfg = load_config(_schema_for(path), path)
    if path.parent.name == "generator":
        assert Path(cfg.run.deepspeed).name in {p.name for p in DEEPSPEED}, cfg.run.deepspeed
        assert cfg.model.size in SIZES


DEEPSPEED = sorted(Path(__file__).resolve().parents[1].glob("configs/deepspeed/*.yaml"))


@pytest.mark.parametrize("path", DEEPSPEED, ids=lambda p: p.name)
def test_shipped_deepspeed_files_set_their_stage_and_nothing_the_experiment_owns(path):
    from stage2_generator.config import GeneratorTrainConfig
    from stage2_generator.train import deepspeed_config

    cfg = load_config(GeneratorTrainConfig, None, [f"run.deepspeed={path}", "data.batch_size=3", "data.grad_accum=2"])
    ds = deepspeed_config(cfg, bf16=False)
    assert ds["zero_optimization"]["stage"] == int(path.stem.removeprefix("zero"))
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (3, 2)


def test_a_field_added_to_a_schema_leaves_older_fingerprints_and_identities_alone():
    """A generator config without the decoder and input-noise fields (as saved before they existed) and one with
    them at their defaults hash the same; a non-default value is part of the fingerprint."""
    from simvq_common.config import canonical_container, canonical_yaml
    from stage2_generator.config import GeneratorConfig

    cfg = GeneratorConfig(codebook_size=64, grid=[2, 3], num_classes=3)
    assert "decoder" in to_yaml(cfg) and "decoder" not in canonical_yaml(cfg)
    before = to_yaml(cfg).replace("decoder: llama\n", "").replace("decoder_options: {}\n", "").replace(
        "input_noise: 0.0\n", "")
    assert canonical_yaml(cfg) == before
    assert "decoder" not in canonical_container(cfg) and "input_noise" not in canonical_container(cfg)
    other = GeneratorConfig(codebook_size=64, grid=[2, 3], num_classes=3, decoder="x-transformers", input_noise=0.1)
    assert "decoder: x-transformers" in canonical_yaml(other) and "input_noise: 0.1" in canonical_yaml(other)


def test_a_list_item_read_as_a_mapping_is_refused_naming_it_and_the_quoting():
    """`prompts=[dog face, flag: Japan]` once reached the text encoder as {'flag': 'Japan'} and failed there with
    sentence-transformers' "unrecognized modality keys: ['flag']"."""
    from pipelines.config import PipelineConfig, SampleConfig

    with pytest.raises(ConfigError, match=r"prompts\[1\] was read as \{'flag': 'Japan'\}, not text: .* "
                                          r"\"prompts=\[a, 'flag: Japan'\]\""):
        load_config(SampleConfig, None, ["prompts=[dog face, flag: Japan]"])
    assert load_config(SampleConfig, None, ["prompts=[dog face, 'flag: Japan']"]).prompts == ["dog face", "flag: Japan"]
    with pytest.raises(ConfigError, match=r"generators\[0\]\.prompts\[0\] was read as"):
        load_config(PipelineConfig, None, ["generators=[{name: text, prompts: [flag: Japan]}]"])
