"""Stage 2: the autoregressive generator over code caches (model, chunked loss, sampling, training)."""
from .cache_loader import CacheLoader
from .cache_reader import CodeCache
from .config import GeneratorConfig, GeneratorTrainConfig, SamplingConfig
from .model import Generator
from .sampling import generate

__all__ = ["CacheLoader", "CodeCache", "Generator", "GeneratorConfig", "GeneratorTrainConfig", "SamplingConfig",
           "generate"]
