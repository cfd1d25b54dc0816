"""Wave quantization of the FP8 token-scaled Gluon GEMM at the Llama-3.1-8B shapes (CPU only).

The kernel runs one persistent program per SM over BLOCK_M x BLOCK_N output tiles
(`gluon_fp8_gemm.token_block_n` picks the width; the GLU gate_up takes 128 output columns, 128
gate + 128 up rows of the weight). A GEMM takes as long as its busiest SM, so its tiles cost
ceil(tiles / SMs) tile-times: the table gives, per row count M, the tile width, the tiles, the
waves (tiles / SMs) and the fraction of the last-rounded waves that does work. Decode steps of
the 1000/1000 run sit at M ~ 480-512, where qkv and gate_up leave SMs idle. ("down" is the
token kernel's; the fused MLP's group-scaled down takes the same widths at these M.)

    python benchmarks/gemm_waves.py [--sms 132] [--ms 256,512,1024]
"""
from __future__ import annotations

import argparse

import triton

from trtllm_kernels.kernels.gluon_fp8_gemm import BLOCK_M, token_block_n

# name: (output columns, GLU epilogue)
SHAPES = {"qkv": (6144, False), "o": (4096, False), "gate_up (GLU)": (14336, True), "down": (4096, False)}


def waves(m: int, n: int, glu: bool, sms: int) -> tuple[int, int, float]:
    """(tile width, tiles, waves) of the token kernel's launch for an M x N output."""
    bn = 128 if glu else token_block_n(m, n, sms)
    tiles = triton.cdiv(m, BLOCK_M) * triton.cdiv(n, bn)
    return bn, tiles, tiles / sms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sms", type=int, default=132, help="SMs (H100 SXM: 132)")
    ap.add_argument("--ms", default="256,384,512,768,1024,2048,8192")
    args = ap.parse_args()
    print("| M | " + " | ".join(SHAPES) + " |")
    print("|---:|" + "---|" * len(SHAPES))
    for m in map(int, args.ms.split(",")):
        cells = []
        for n, glu in SHAPES.values():
            bn, tiles, w = waves(m, n, glu, args.sms)
            cells.append(f"{bn} wide: {tiles} tiles, {w:.2f} waves, {w / triton.cdiv(tiles, args.sms):.0%} busy")
        print(f"| {m} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
