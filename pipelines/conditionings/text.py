"""Text-conditional generators (pooled or token features): prompts, a prompts file, or a cache's captions."""
from __future__ import annotations

import torch

from pipelines.conditions import Conditions, generator_text_encoder, largest_remainder, prompt_list
from simvq_common.errors import ConfigError, UserError
from stage2_generator.conditionings import TextTokens

from .base import RequestKind


class TextRequests(RequestKind):
    described = "text-conditional"
    selects = ("prompts", "prompts_file", "prompts_from")
    drop_phrase, alternative = "the prompts", "pass prompts=[...] instead"
    fid_on_captions = True
    grid_rows = "one row per prompt"

    def conditions(self, cfg, model_cfg, device, text_encoder=None) -> Conditions:
        prompts, source = prompt_list(cfg)
        encoder = text_encoder or generator_text_encoder(model_cfg, device)
        text = encoder.encode(prompts)
        model_input = (torch.from_numpy(text.features).to(device) if text.mask is None else
                       TextTokens(torch.from_numpy(text.features), torch.from_numpy(text.mask)).to(device))
        return Conditions(prompts, [-1] * len(prompts), prompts, model_input, encoder.info, prompt_source=source)

    def per_condition(self, cfg) -> int:
        return cfg.per_prompt

    def fid_plan(self, mix: str, reference_counts: list[int], num: int) -> dict:
        # val captions follow the reference's class mix whatever class_mix says
        return {"class_mix": "reference", "class_counts": largest_remainder(reference_counts, num)}

    def pipeline_requests(self, num, plan, grid_per, prompts, captions):
        val_captions = captions()
        # the report's grid: the stage's prompts, else the first val captions
        return dict(prompts=val_captions, per_prompt=1), dict(prompts=prompts or val_captions[:8], per_prompt=grid_per)

    def grid_request(self, name, grid_per, prompts):
        if not prompts:
            raise ConfigError(f"ready_made: {name} is text-conditional and the run has no text generator's prompts "
                              f"to draw it with: give a text generator stage `prompts`, or drop {name}")
        return dict(prompts=prompts, per_prompt=grid_per)

    def serve_request(self, condition: str) -> dict:
        if not condition:
            raise UserError("the prompt is empty: type what the images should show (the generator is "
                            "text-conditional)")
        return dict(prompts=[condition])

    def summary(self, model_cfg) -> str:
        return f"text-conditional ({model_cfg.text_encoder})"

    def card_row(self, model_cfg) -> str:
        return (f"text-conditional: {model_cfg.text_encoder} ({model_cfg.text_features or 'pooled'} features, dim "
                f"{model_cfg.text_dim})")

    def page_input(self, gr, model_cfg):
        return gr.Textbox(label="prompt", placeholder="a red heart", elem_id="condition")

    def card_usage(self):
        return None, "", 'prompts=["a red heart"] per_prompt=4 sampling.guidance_scale=2'
