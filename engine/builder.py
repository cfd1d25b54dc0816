"""Build an engine directory from a checkpoint, and load it back.

An engine directory holds:
- `model.safetensors`: the weights under our fused names (engine/model.py), in the build dtype;
- `engine_config.json`: {"format_version", "model": ModelConfig, "build": BuildConfig};
- the tokenizer files (tokenizer.json, tokenizer_config.json with the chat template, ...).
Loading is a memory map plus a copy to the device: no dequantization, no renaming.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .checkpoint import CheckpointError, read_checkpoint, save_tokenizer
from .config import DTYPES, BuildConfig, ModelConfig
from .model import LlamaModel, weight_names
from .quantize import (FP4_FORMATS, Fp4LlamaModel, Fp4W4A8LlamaModel, Fp8LlamaModel, extra_names,
                       load_dtype_any, quantize_weights, quantize_weights_fp4)

FORMAT_VERSION = 1
ENGINE_CONFIG = "engine_config.json"
WEIGHTS_FILE = "model.safetensors"


class EngineError(ValueError):
    """An engine directory is missing, incomplete or corrupt."""


@dataclass
class Engine:
    model: LlamaModel
    model_config: ModelConfig
    build_config: BuildConfig
    tokenizer: object  # a transformers tokenizer
    path: Path


def fuse_weights(config: ModelConfig, hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face Llama parameter names -> our fused layout (q|k|v and gate|up stacked)."""
    def take(name):
        if name not in hf:
            raise CheckpointError(f"checkpoint has no tensor {name!r}")
        return hf[name]

    out = {"embed": take("model.embed_tokens.weight"), "norm": take("model.norm.weight")}
    if not config.tie_word_embeddings:
        out["lm_head"] = take("lm_head.weight")
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        out[f"layers.{i}.attn_norm"] = take(p + "input_layernorm.weight")
        out[f"layers.{i}.mlp_norm"] = take(p + "post_attention_layernorm.weight")
        out[f"layers.{i}.qkv"] = torch.cat([take(p + f"self_attn.{n}_proj.weight") for n in "qkv"])
        out[f"layers.{i}.o"] = take(p + "self_attn.o_proj.weight")
        out[f"layers.{i}.gate_up"] = torch.cat([take(p + f"mlp.{n}_proj.weight") for n in ("gate", "up")])
        out[f"layers.{i}.down"] = take(p + "mlp.down_proj.weight")
    return out


def quantize(model_config: ModelConfig, build_config: BuildConfig,
             weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fused weights in the build dtype -> the weights an engine of build_config.quantization
    stores (the same dict when there is none; engine/quantize.py has the formats)."""
    if build_config.quantization == "fp8":  # FP8 linear weights, per-channel scales
        return quantize_weights(model_config, weights)
    if build_config.quantization in FP4_FORMATS:  # packed e2m1 linear weights and their scales
        return quantize_weights_fp4(model_config, weights, build_config.quantization)
    return weights


def make_model(model_config: ModelConfig, build_config: BuildConfig, weights: dict[str, torch.Tensor]) -> LlamaModel:
    """The model class that runs weights made by `quantize` for this build config."""
    model_class = {"fp8": Fp8LlamaModel, "nvfp4": Fp4LlamaModel, "mxfp4": Fp4LlamaModel,
                   "mxfp4_w4a8": Fp4W4A8LlamaModel}.get(build_config.quantization, LlamaModel)
    return model_class(model_config, weights)


def build_engine(
    checkpoint: str | os.PathLike, output_dir: str | os.PathLike,
    build_config: BuildConfig | None = None, progress: bool = True,
) -> Path:
    """Read a checkpoint (HF directory or GGUF), fuse and cast its weights, write an engine dir.

    The directory appears atomically: it is written beside its final place and renamed.
    """
    build_config = build_config or BuildConfig()
    ckpt = read_checkpoint(checkpoint, progress=progress)
    model_config = ModelConfig.from_hf(ckpt.config)
    if build_config.max_seq_len is None:
        build_config = dataclasses.replace(build_config, max_seq_len=model_config.max_position_embeddings)
    weights = fuse_weights(model_config, ckpt.tensors)
    if build_config.dtype != "auto":
        weights = {k: v.to(DTYPES[build_config.dtype]) for k, v in weights.items()}
    weights = {k: v.contiguous() for k, v in weights.items()}
    weights = quantize(model_config, build_config, weights)

    output_dir = Path(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.", dir=output_dir.parent))
    try:
        save_file(weights, tmp / WEIGHTS_FILE)
        save_tokenizer(checkpoint, tmp)
        meta = {
            "format_version": FORMAT_VERSION,
            "model": dataclasses.asdict(model_config),
            "build": build_config.to_dict(),
            "source": str(Path(checkpoint).resolve()),
        }
        (tmp / ENGINE_CONFIG).write_text(json.dumps(meta, indent=2))
        if output_dir.exists():
            shutil.rmtree(output_dir)
        os.replace(tmp, output_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return output_dir


def read_engine_config(engine_dir: str | os.PathLike) -> tuple[ModelConfig, BuildConfig]:
    path = Path(engine_dir) / ENGINE_CONFIG
    if not path.is_file():
        raise EngineError(f"{engine_dir} is not an engine directory (no {ENGINE_CONFIG})")
    try:
        meta = json.loads(path.read_text())
        if meta.get("format_version") != FORMAT_VERSION:
            raise EngineError(
                f"{path}: engine format {meta.get('format_version')} is not {FORMAT_VERSION}; rebuild it"
            )
        return ModelConfig(**meta["model"]), BuildConfig.from_dict(meta["build"])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise EngineError(f"{path} is corrupt: {e}") from e


def load_engine(
    engine_dir: str | os.PathLike, device: str | torch.device | None = None,
    dtype: str = "auto", progress: bool = True,
) -> Engine:
    """Load an engine directory onto `device` (default: cuda if available, else cpu).

    dtype "auto": bfloat16 on CUDA (float16 if the engine was built in float16), float32 on CPU.
    """
    from transformers import AutoTokenizer

    engine_dir = Path(engine_dir)
    model_config, build_config = read_engine_config(engine_dir)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch_dtype = resolve_dtype(dtype, device, build_config.dtype)
    weights = {}
    try:
        with safe_open(engine_dir / WEIGHTS_FILE, framework="pt", device="cpu") as f:
            for name in tqdm(list(f.keys()), desc="Loading engine", unit="tensor", disable=not progress):
                t = f.get_tensor(name)  # FP8 engines keep fp8 weights and fp32 scales as stored
                weights[name] = t.to(device=device, dtype=load_dtype_any(name, t, torch_dtype))
    except (OSError, RuntimeError, Exception) as e:  # safetensors raises its own error types
        if isinstance(e, EngineError):
            raise
        raise EngineError(f"cannot read {engine_dir / WEIGHTS_FILE}: {e}") from e
    unknown = set(weights) - set(weight_names(model_config)) - set(extra_names(model_config, build_config.quantization))
    if unknown:
        raise EngineError(f"{engine_dir / WEIGHTS_FILE} has unexpected tensors {sorted(unknown)[:5]}")
    model = make_model(model_config, build_config, weights)
    tokenizer = AutoTokenizer.from_pretrained(str(engine_dir))
    return Engine(model, model_config, build_config, tokenizer, engine_dir)


def resolve_dtype(dtype: str, device: torch.device, built: str = "auto") -> torch.dtype:
    if dtype != "auto":
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be 'auto' or one of {sorted(DTYPES)}, got {dtype!r}")
        return DTYPES[dtype]
    if device.type == "cpu":
        return torch.float32
    return torch.float16 if built == "float16" else torch.bfloat16
