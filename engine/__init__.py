"""The engine: a Llama-family model built from trtllm_kernels ops, checkpoint loading, and
build / save / load of engine directories."""
from .builder import Engine, EngineError, build_engine, load_engine
from .cache import cached_engine
from .config import BuildConfig, ModelConfig
from .default_model import default_checkpoint
from .model import AttentionMetadata, LlamaModel

__all__ = [
    "AttentionMetadata", "BuildConfig", "Engine", "EngineError", "LlamaModel", "ModelConfig",
    "build_engine", "cached_engine", "default_checkpoint", "load_engine",
]
