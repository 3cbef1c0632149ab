"""Class-conditional generators: classes by name or id, class_counts for a class mix."""
from __future__ import annotations

import torch

from pipelines.conditions import Conditions, check_class_counts, class_order, largest_remainder, resolve_classes
from simvq_common.errors import UserError

from .base import RequestKind


class ClassRequests(RequestKind):
    described = "class-conditional"
    selects, extras = ("classes",), ("class_counts",)
    drop_phrase, alternative = "classes", "pass classes=[...] instead"
    has_classes = True
    grid_rows = "one row per class"

    def conditions(self, cfg, model_cfg, device, text_encoder=None) -> Conditions:
        ids = resolve_classes(cfg.classes, model_cfg)
        names = [model_cfg.class_names[i] if i < len(model_cfg.class_names) else str(i) for i in ids]
        order = None
        if cfg.class_counts:
            check_class_counts(cfg.class_counts, len(ids), bool(cfg.classes))
            order = class_order(cfg.class_counts)
        return Conditions(names, ids, [""] * len(ids), torch.tensor(ids, dtype=torch.long, device=device), order=order)

    def fid_plan(self, mix: str, reference_counts: list[int], num: int) -> dict:
        if mix == "balanced":
            return {"class_mix": "balanced", "class_counts": []}
        return {"class_mix": "reference", "class_counts": largest_remainder(reference_counts, num)}

    def pipeline_requests(self, num, plan, grid_per, prompts, captions):
        return dict(num_samples=num, class_counts=plan["class_counts"]), dict(per_class=grid_per)

    def grid_request(self, name, grid_per, prompts):
        return dict(per_class=grid_per)

    def serve_request(self, condition: str) -> dict:
        if not condition:
            raise UserError("no class picked: choose one of the generator's classes")
        return dict(classes=[condition])

    def summary(self, model_cfg) -> str:
        return f"class-conditional ({model_cfg.num_classes} classes)"

    def card_row(self, model_cfg) -> str:
        names = model_cfg.class_names
        return (f"class-conditional, {model_cfg.num_classes} classes: {', '.join(names[:12])}"
                + (", ..." if len(names) > 12 else ""))

    def page_input(self, gr, model_cfg):
        # typed values too: ids, and unknown names get the sampler's own message
        names = model_cfg.class_names or [str(i) for i in range(model_cfg.num_classes)]
        return gr.Dropdown(names, value=names[0], label="class", allow_custom_value=True, elem_id="condition")

    def card_usage(self):
        return ("torch.tensor([0, 0, 1, 1])  # ids into generator.config.class_names", "2.0))  # seeds: the indices",
                "per_class=8 sampling.guidance_scale=2")
