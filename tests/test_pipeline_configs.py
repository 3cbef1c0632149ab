"""Every pipeline config in configs/pipeline/ loads, and so does every stage config it names with its overrides:
a typo in a showcase or demo recipe fails here, not an hour into a run."""
from pathlib import Path

import pytest
import yaml

from pipelines.config import PipelineConfig
from pipelines.run import generator_stages, tokenizer_config
from simvq_common.config import load_config
from simvq_common.ready_made import READY_MADE

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p.name for p in (REPO / "configs" / "pipeline").glob("*.yaml"))


@pytest.mark.parametrize("name", CONFIGS)
def test_pipeline_config_and_its_stage_configs_load(name, monkeypatch):
    monkeypatch.chdir(REPO)
    cfg = load_config(PipelineConfig, REPO / "configs" / "pipeline" / name)
    tok = tokenizer_config(cfg)
    assert tok.data.source == cfg.data and tok.data.resolution == cfg.resolution
    gen_cfgs, _ = generator_stages(cfg)  # every stage's views and sampler checked too
    for stage in cfg.generators:
        gen = gen_cfgs[stage.name]
        assert gen.run.out_dir == str(Path(cfg.out_dir) / f"generator_{stage.name}")
        views = "" if stage.aug in ("", cfg.aug) else f"_{stage.aug}"
        assert gen.data.cache == str(Path(cfg.out_dir) / f"cache_train{views}")
        for override in stage.overrides:  # each override reached the generator's config
            key, value = override.split("=", 1)
            section, field = key.split(".")
            actual = getattr(getattr(gen, section), field)
            assert actual == (float(value) if isinstance(actual, float) else yaml.safe_load(value)), override
    assert set(cfg.ready_made) <= set(READY_MADE)
