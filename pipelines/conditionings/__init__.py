"""The jobs' side of the conditioning kinds (the model's side: stage2_generator/conditionings/): `simvq sample`,
`simvq run`, the server, the report and the model card ask `request_kind(model_cfg)`."""
from __future__ import annotations

import torch

from pipelines.conditions import Conditions
from pipelines.config import SampleConfig
from simvq_common.errors import ConfigError

from .base import RequestKind
from .class_label import ClassRequests
from .text import TextRequests
from .unconditional import NoCondition

# model.conditioning -> how the jobs request it (one instance each)
REQUESTS: dict[str, RequestKind] = {"class": ClassRequests(), "text": TextRequests(), "none": NoCondition()}


def request_kind(model_cfg) -> RequestKind:
    """The request kind of a GeneratorConfig."""
    return request_kind_named(model_cfg.conditioning)


def request_kind_named(conditioning: str) -> RequestKind:
    """The request kind of a model.conditioning value (as a run's record or a model card's facts keep it)."""
    if conditioning not in REQUESTS:
        raise ConfigError(f"generator conditioning {conditioning!r} has no request kind: register one in "
                          f"pipelines.conditionings.REQUESTS (known: {tuple(REQUESTS)})")
    return REQUESTS[conditioning]


def build_conditions(cfg: SampleConfig, model_cfg, device: torch.device, text_encoder=None) -> Conditions:
    """What cfg's samples are conditioned on; text_encoder: the generator's, already loaded (else loaded here)."""
    kind = request_kind(model_cfg)
    kind.refuse_foreign(cfg, REQUESTS.values())
    return kind.conditions(cfg, model_cfg, device, text_encoder)


__all__ = ["REQUESTS", "RequestKind", "build_conditions", "request_kind", "request_kind_named"]
