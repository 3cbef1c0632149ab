"""What the jobs do with one conditioning kind: how a request (`simvq sample`'s keys, a server's field, a
pipeline stage) becomes model input and labels, which classes its FID samples take, and how reports and model
cards describe it. A new kind is one file here and one line in REQUESTS (beside its model side in
stage2_generator/conditionings/); nothing else names a kind."""
from __future__ import annotations

import torch

from pipelines.conditions import Conditions
from pipelines.config import SampleConfig
from simvq_common.errors import UserError


class RequestKind:
    described = "unconditional"  # "class-conditional": how messages and reports name the generator
    selects: tuple[str, ...] = ()  # SampleConfig keys that choose this kind's conditions (classes, prompts ...)
    extras: tuple[str, ...] = ()  # other SampleConfig keys only this kind takes (class_counts)
    drop_phrase = ""  # how a message asks to drop `selects` ("classes", "the prompts")
    alternative = ""  # what to pass instead of another kind's selection ("pass classes=[...] instead")
    has_classes = False  # samples carry class ids (class agreement, the quality study, sampling.json's classes)
    fid_on_captions = False  # its FID samples are conditioned on the val captions (their cache is an input)
    grid_rows = "a square of samples"  # what a report's grid shows

    def refuse_foreign(self, cfg: SampleConfig, kinds) -> None:
        """Another kind's keys set in `cfg` are refused, saying what to pass or drop."""
        mine = {*self.selects, *self.extras}  # another kind may take the same keys (a variant of this one)
        for other in kinds:
            given = [key for key in other.selects if getattr(cfg, key) and key not in mine]
            if given:
                fix = self.alternative or f"drop {other.drop_phrase}"
                raise UserError(f"{given[0]}={getattr(cfg, given[0])} but the generator is {self.described}: {fix}")
            for key in other.extras:
                if getattr(cfg, key) and key not in mine:
                    raise UserError(f"{key}={getattr(cfg, key)} but the generator is {self.described}: drop {key}")

    def conditions(self, cfg: SampleConfig, model_cfg, device: torch.device, text_encoder=None) -> Conditions:
        return Conditions([""], [-1], [""], None)

    def per_condition(self, cfg: SampleConfig) -> int:
        """Samples per condition when no count is given."""
        return cfg.per_class

    def fid_plan(self, mix: str, reference_counts: list[int], num: int) -> dict:
        """The classes of a pipeline stage's num FID samples: its class_mix and per-class counts ([] = none)."""
        return {"class_mix": "none", "class_counts": []}

    def pipeline_requests(self, num: int, plan: dict, grid_per: int, prompts: list[str], captions) -> tuple[dict, dict | None]:
        """`simvq run`'s SampleConfig keys for the FID samples and for the report's grid (None = no grid);
        `captions()` gives the val captions in the reference's class mix."""
        return dict(num_samples=num), None

    def grid_request(self, name: str, grid_per: int, prompts: list[str]) -> dict:
        """The keys that draw a ready-made generator's grid (a row per class, or per prompt)."""
        return dict(per_class=grid_per)  # one condition: per_class samples of it

    def serve_request(self, condition: str) -> dict:
        """A server request's condition field as SampleConfig keys."""
        return {}

    def summary(self, model_cfg) -> str:
        """The kind in a page's header: "class-conditional (9 classes)"."""
        return self.described

    def card_row(self, model_cfg) -> str:
        """The conditioning row of a model card's architecture table."""
        return self.described

    def page_input(self, gr, model_cfg):
        """The sampler page's condition field (a gradio component, elem_id "condition")."""
        return gr.Textbox(label="prompt", visible=False, elem_id="condition")

    def card_usage(self) -> tuple[str | None, str, str]:
        """A model card's Python condition (None: no Python example), the rest of its SamplingConfig line, and
        its `simvq sample` keys."""
        return "None", "1.0))", "num_samples=16"
