"""Model and build configuration of an engine, and the JSON they are saved as."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
KV_CACHE_DTYPES = ("auto", "fp8")
QUANTIZATIONS = (None, "fp8", "nvfp4", "mxfp4", "mxfp4_w4a8")
IMPLEMENTED_QUANTIZATIONS = QUANTIZATIONS


@dataclass(frozen=True)
class ModelConfig:
    """The architecture of a Llama-family model (names follow Hugging Face's LlamaConfig)."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    @classmethod
    def from_hf(cls, hf: dict) -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in hf.items() if k in names and v is not None}
        # transformers >= 5 writes rope settings as one `rope_parameters` dict.
        rope = hf.get("rope_parameters") or {}
        if "rope_theta" in rope:
            values.setdefault("rope_theta", rope["rope_theta"])
            if rope.get("rope_type", "default") != "default":
                values.setdefault("rope_scaling", {k: v for k, v in rope.items() if k != "rope_theta"})
        values.setdefault("head_dim", hf["hidden_size"] // hf["num_attention_heads"])
        values.setdefault("num_key_value_heads", hf["num_attention_heads"])
        return cls(**values)

    @property
    def eos_token_ids(self) -> list[int]:
        eos = self.eos_token_id
        return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)


@dataclass
class BuildConfig:
    """How an engine is built: limits, precisions and the KV-cache page size.

    max_seq_len: longest sequence (prompt + output); None takes the model's
    max_position_embeddings. max_num_tokens: tokens processed in one step (prefill chunking).
    dtype: "auto" keeps the checkpoint's precision (GGUF dequantizes to float32).
    kv_cache_dtype: "auto" (the activation dtype) or "fp8" (e4m3 with a scale per cache).
    quantization: None, "fp8" (FP8 weights and activations), "nvfp4" / "mxfp4" (FP4 weights,
    W4A16) or "mxfp4_w4a8" (MXFP4 weights, fp8 activations: engine/quantize.py).
    """

    max_batch_size: int = 256
    max_seq_len: int | None = None
    max_num_tokens: int = 8192
    dtype: str = "auto"
    kv_cache_dtype: str = "auto"
    quantization: str | None = None
    page_size: int = 32

    def __post_init__(self):
        for name in ("max_batch_size", "max_num_tokens", "page_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"BuildConfig.{name} must be a positive integer, got {value!r}")
        if self.max_seq_len is not None and (not isinstance(self.max_seq_len, int) or self.max_seq_len < 1):
            raise ValueError(f"BuildConfig.max_seq_len must be a positive integer, got {self.max_seq_len!r}")
        if self.page_size & (self.page_size - 1):
            raise ValueError(f"BuildConfig.page_size must be a power of two, got {self.page_size}")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"BuildConfig.dtype must be 'auto' or one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"BuildConfig.kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {self.kv_cache_dtype!r}")
        if self.quantization not in QUANTIZATIONS:
            raise ValueError(f"BuildConfig.quantization must be one of {QUANTIZATIONS}, got {self.quantization!r}")
        if self.quantization not in IMPLEMENTED_QUANTIZATIONS:
            raise NotImplementedError(f"quantization {self.quantization!r} is not implemented yet")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "BuildConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})
