"""Engines with random weights at real model shapes, for performance work: speed does not
depend on the values, and no checkpoint of that size needs to exist on the machine."""
from __future__ import annotations

import torch

from .builder import Engine, make_model, quantize
from .config import BuildConfig, ModelConfig
from .model import weight_names

SHAPES = {
    "llama-3.1-8b": ModelConfig(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, vocab_size=128256, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192},
        max_position_embeddings=131072, eos_token_id=128009),
    "llama-3.1-70b": ModelConfig(
        hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
        num_key_value_heads=8, head_dim=128, vocab_size=128256, rms_norm_eps=1e-5, rope_theta=500000.0,
        max_position_embeddings=131072, eos_token_id=128009),
    "smollm2-135m": ModelConfig(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, head_dim=64, vocab_size=49152, rms_norm_eps=1e-5, rope_theta=100000.0,
        max_position_embeddings=8192, tie_word_embeddings=True, eos_token_id=2),
}


def weight_shapes(c: ModelConfig) -> dict[str, tuple[int, ...]]:
    per_layer = {
        "attn_norm": (c.hidden_size,), "mlp_norm": (c.hidden_size,),
        "qkv": ((c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim, c.hidden_size),
        "o": (c.hidden_size, c.num_attention_heads * c.head_dim),
        "gate_up": (2 * c.intermediate_size, c.hidden_size),
        "down": (c.hidden_size, c.intermediate_size),
    }
    top = {"embed": (c.vocab_size, c.hidden_size), "norm": (c.hidden_size,), "lm_head": (c.vocab_size, c.hidden_size)}
    return {n: top.get(n) or per_layer[n.rsplit(".", 1)[-1]] for n in weight_names(c)}


def random_engine(
    config: ModelConfig | str, build_config: BuildConfig | None = None,
    device: str | torch.device | None = None, dtype: torch.dtype = torch.bfloat16, seed: int = 0,
) -> Engine:
    """An Engine (no tokenizer) with N(0, 0.02) weights and unit norms, made on the device."""
    if isinstance(config, str):
        if config not in SHAPES:
            raise ValueError(f"unknown model shape {config!r}; known: {sorted(SHAPES)}")
        config = SHAPES[config]
    build_config = build_config or BuildConfig(max_seq_len=min(config.max_position_embeddings, 8192))
    if build_config.max_seq_len is None:
        raise ValueError("random engines need BuildConfig.max_seq_len")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gen = torch.Generator(device=device).manual_seed(seed)
    weights = {}
    for name, shape in weight_shapes(config).items():
        if len(shape) == 1:
            weights[name] = torch.ones(shape, dtype=dtype, device=device)
        else:
            w = torch.empty(shape, dtype=dtype, device=device)
            weights[name] = w.normal_(0.0, 0.02, generator=gen)
    weights = quantize(config, build_config, weights)
    return Engine(make_model(config, build_config, weights), config, build_config, tokenizer=None, path=None)
