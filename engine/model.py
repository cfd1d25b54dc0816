"""The Llama-family decoder, written only with trtllm_kernels ops (no Hugging Face modeling code).

One forward call runs a whole scheduler step: the tokens of every scheduled sequence back to
back ([T] ids), decodes first, then prefill chunks. Keys and values go into the paged cache
before attention reads them, so attention sees each sequence's whole context there.

Weights use our fused names (see `weight_names`): the q, k and v projections are one [qkv]
matrix and gate and up one [gate_up] matrix, so each is one GEMM.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

import trtllm_kernels as tk

from .config import ModelConfig


@dataclass
class AttentionMetadata:
    """Where each token of a step lives in the paged cache, and how tokens form sequences.

    The first `num_decodes` sequences have exactly one new token each (they run through the
    decode kernel), the rest through the prefill kernel. All index tensors live on the device.
    """

    slot_mapping: torch.Tensor  # [T] int64: block * page_size + offset of each new token
    block_tables: torch.Tensor  # [S, max_blocks] int32
    seq_lens: torch.Tensor  # [S] int32: context length including the new tokens
    query_start_loc: torch.Tensor  # [S + 1] int32
    num_decodes: int

    def decode_part(self):
        n = self.num_decodes
        return self.block_tables[:n], self.seq_lens[:n]

    def prefill_part(self):
        n = self.num_decodes
        return self.block_tables[n:], self.seq_lens[n:], self.query_start_loc[n:] - n


def weight_names(config: ModelConfig) -> list[str]:
    names = ["embed", "norm"]
    for i in range(config.num_hidden_layers):
        names += [f"layers.{i}.{w}" for w in ("attn_norm", "qkv", "o", "mlp_norm", "gate_up", "down")]
    if not config.tie_word_embeddings:
        names.append("lm_head")
    return names


class LlamaModel:
    def __init__(self, config: ModelConfig, weights: dict[str, torch.Tensor]):
        missing = [n for n in weight_names(config) if n not in weights]
        if missing:
            raise ValueError(f"engine weights are missing {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        self.config = config
        self.weights = weights
        self.device = weights["embed"].device
        self.dtype = weights["embed"].dtype
        self.lm_head = weights["embed"] if config.tie_word_embeddings else weights["lm_head"]
        self.layers = [
            {w: weights[f"layers.{i}.{w}"] for w in ("attn_norm", "qkv", "o", "mlp_norm", "gate_up", "down")}
            for i in range(config.num_hidden_layers)
        ]
        c = config
        self.q_size = c.num_attention_heads * c.head_dim
        self.kv_size = c.num_key_value_heads * c.head_dim
        self.scale = c.head_dim ** -0.5
        self.cos_sin_cache = tk.rope_cos_sin_cache(
            c.head_dim, c.max_position_embeddings, c.rope_theta, c.rope_scaling, device=self.device
        )

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]], kv_scales: tuple[float, float] = (1.0, 1.0),
    ) -> torch.Tensor:
        """input_ids, positions: [T]. Returns the final normed hidden states [T, hidden]."""
        eps = self.config.rms_norm_eps
        hidden = self.embed(input_ids)
        residual = None
        for layer, (k_cache, v_cache) in zip(self.layers, kv_caches):
            if residual is None:
                residual, normed = hidden, tk.rms_norm(hidden, layer["attn_norm"], eps)
            else:
                normed, residual = tk.fused_add_rms_norm(hidden, residual, layer["attn_norm"], eps)
            hidden = self._attention(layer, normed, positions, meta, k_cache, v_cache, kv_scales)
            normed, residual = tk.fused_add_rms_norm(hidden, residual, layer["mlp_norm"], eps)
            hidden = self.reduce(self._mlp(layer, normed))
        normed, _ = tk.fused_add_rms_norm(hidden, residual, self.weights["norm"], eps)
        return normed

    def _mlp(self, layer, x):
        return tk.fused_mlp(x, layer["gate_up"], layer["down"])  # gate_up, SiLU(gate) * up, down

    # Tensor parallelism (engine/parallel.py) overrides these two: a vocab-parallel embedding
    # and the all-reduce of a row-parallel layer's partial outputs. On one rank they are plain.
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.weights["embed"])

    def reduce(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def _attention(self, layer, x, positions, meta, k_cache, v_cache, kv_scales):
        qkv = tk.linear(x, layer["qkv"])
        return self.reduce(tk.linear(self._attend(qkv, positions, meta, k_cache, v_cache, kv_scales), layer["o"]))

    def _rope_and_cache(self, qkv, positions, meta, k_cache, v_cache, kv_scales):
        """qkv: [T, q_size + 2 kv_size] projections -> rotated queries [T, Hq, D]; the rotary
        embedding of q and k and the cache write of k and v are one fused op."""
        c = self.config
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, c.num_attention_heads, c.head_dim)
        k = k.view(-1, c.num_key_value_heads, c.head_dim)
        v = v.view(-1, c.num_key_value_heads, c.head_dim)
        return tk.rope_and_write_kv_cache(positions, q, k, v, self.cos_sin_cache, k_cache, v_cache,
                                          meta.slot_mapping, *kv_scales)

    def _attend(self, qkv, positions, meta, k_cache, v_cache, kv_scales):
        """qkv: [T, q_size + 2 kv_size] projections -> attention output [T, q_size]: rotary
        embedding and cache write, then decodes and prefills attend."""
        q = self._rope_and_cache(qkv, positions, meta, k_cache, v_cache, kv_scales)
        n = meta.num_decodes
        parts = []
        if n:
            parts.append(tk.paged_attention_decode(q[:n], k_cache, v_cache, *meta.decode_part(), self.scale, *kv_scales))
        if q.shape[0] > n:
            parts.append(tk.paged_attention_prefill(q[n:], k_cache, v_cache, *meta.prefill_part(), self.scale, *kv_scales))
        out = parts[0] if len(parts) == 1 else torch.cat(parts)
        return out.view(-1, self.q_size)

    def compute_logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """hidden: [N, hidden] -> float32 logits [N, vocab], into `out` if given (the decode
        graphs share one such buffer instead of each keeping its own). On CUDA a half-precision
        LM head writes float32 straight from cuBLAS's fp32 accumulators: no rounding to bf16 and
        no second pass to widen it (that pass took 0.4 ms of a 21 ms decode step at batch 1024,
        Llama-3.1-8B shape, on an H100)."""
        if hidden.is_cuda and hidden.dtype != torch.float32 and self.lm_head.dtype == hidden.dtype:
            return torch.mm(hidden, self.lm_head.t(), out_dtype=torch.float32, out=out)  # out=None: a new tensor
        logits = tk.linear(hidden, self.lm_head)
        return logits.float() if out is None else out.copy_(logits)
