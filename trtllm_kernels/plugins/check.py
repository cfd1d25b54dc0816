"""Check the plugins against an installed TensorRT and write a JSON report.

    python -m trtllm_kernels.plugins.check --out DIR [--trt tensorrt_rtx_bindings]

1. registers every creator and looks each up in the registry by name / version / namespace;
2. builds serialized engines of the Llama graphs (every plugin appears in at least one) through
   the ONNX parser (or add_plugin_v3 where the module has it), recording which build-time
   methods TensorRT called;
3. with CUDA: runs the graphs eagerly with each plugin's real `enqueue` (PluginTensorDesc and
   raw device pointers, on a side stream) and compares with the engine's LlamaModel on the
   same GPU kernels;
4. with CUDA: deserializes and runs one engine, recording TensorRT's exact words if it refuses
   (TensorRT-RTX does on compute capability 9.0).
"""
from __future__ import annotations

import argparse
import json
import os
import time
import traceback


def _configs():
    from trtllm_kernels.engine.config import ModelConfig

    tiny = ModelConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16, vocab_size=96, max_position_embeddings=64,
                       tie_word_embeddings=True, rms_norm_eps=1e-5)
    smol = ModelConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=2, num_attention_heads=9,
                       num_key_value_heads=3, head_dim=64, vocab_size=49152, max_position_embeddings=2048,
                       tie_word_embeddings=True, rms_norm_eps=1e-5, rope_theta=100000.0)
    return tiny, smol


VARIANTS = [
    ("prefill_fp16", dict()),
    ("decode_fp16", dict(mode="decode")),
    ("prefill_fp8_bf16", dict(quantization="fp8", dtype="bfloat16")),
    ("decode_fp8_bf16_fp8kv", dict(quantization="fp8", dtype="bfloat16", kv_cache_dtype="fp8", mode="decode")),
    ("prefill_bf16_fusedmlp_fp8kv", dict(fused_mlp=True, kv_cache_dtype="fp8", dtype="bfloat16")),
    ("decode_nvfp4_bf16", dict(quantization="nvfp4", dtype="bfloat16", mode="decode")),
    ("prefill_mxfp4_fp16", dict(quantization="mxfp4")),
]


def _step_feeds(cfg, lens, page, nb, dtype, cache_dtype, device):
    import itertools

    import torch

    mb = max(-(-n // page) for n in lens)
    blocks = torch.arange(len(lens) * mb, dtype=torch.int32).reshape(len(lens), mb) + 1
    positions = torch.cat([torch.arange(n) for n in lens])
    slots = torch.cat([blocks[i, torch.arange(n) // page].long() * page + torch.arange(n) % page
                       for i, n in enumerate(lens)])
    qsl = torch.tensor([0] + list(itertools.accumulate(lens)), dtype=torch.int32)
    feeds = {"input_ids": torch.randint(0, cfg.vocab_size, (sum(lens),)), "positions": positions,
             "slot_mapping": slots, "block_tables": blocks, "seq_lens": torch.tensor(lens, dtype=torch.int32),
             "query_start_loc": qsl, "logits_indices": qsl[1:].long() - 1}
    shape = (nb, cfg.num_key_value_heads, page, cfg.head_dim)
    for i in range(cfg.num_hidden_layers):
        feeds[f"k_cache_{i}"] = torch.zeros(shape).to(cache_dtype)
        feeds[f"v_cache_{i}"] = torch.zeros(shape).to(cache_dtype)
    return {k: v.to(device) for k, v in feeds.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--trt", default=None, help="TensorRT module (default: tensorrt, else tensorrt_rtx_bindings)")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)

    import torch

    from . import SPECS, build_engine, default_profile, llama_graph, random_weights, register_plugins
    from .graph import run_engine, run_torch
    from .spec import torch_dtype
    from .trt_plugin import CALLS, CREATED, enqueue_runner, load_tensorrt

    report: dict = {"torch": torch.__version__, "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        report["device"] = torch.cuda.get_device_name()
        report["compute_capability"] = list(torch.cuda.get_device_capability())
    trt = load_tensorrt(args.trt)
    report["trt_module"], report["trt_version"] = trt.__name__, getattr(trt, "__version__", "?")
    register_plugins(trt)
    registry = trt.get_plugin_registry()
    report["registered"] = {n: registry.get_creator(n, "1", "trtllm_kernels") is not None for n in SPECS}
    print("registered:", report["registered"], flush=True)

    tiny, smol = _configs()
    builds, blobs = [], {}
    for cfg_name, cfg in (("tiny", tiny), ("smollm2_shape_2layers", smol)):
        for label, kw in VARIANTS:
            if cfg_name != "tiny" and label not in ("prefill_fp16", "decode_fp8_bf16_fp8kv"):
                continue
            CALLS.clear()
            entry = {"config": cfg_name, "variant": label, "kwargs": kw}
            t0 = time.time()
            try:
                graph = llama_graph(cfg, page_size=16 if cfg_name != "tiny" else 4, **kw)
                profile = default_profile(kw.get("mode", "prefill"), num_blocks=64)
                try:
                    blob, info = build_engine(graph, trt, profile=profile)
                except RuntimeError as first:
                    # TensorRT-RTX targets SM75..SM121 but has no SM90 entry: if the default
                    # (build for the current GPU) fails, name a target explicitly and say so.
                    if not hasattr(trt, "ComputeCapability"):
                        raise
                    entry["default_target_error"] = str(first)

                    def sm89(config):
                        config.num_compute_capabilities = 1
                        config.set_compute_capability(trt.ComputeCapability.SM89, 0)

                    blob, info = build_engine(graph, trt, profile=profile, configure=sm89)
                    entry["target"] = "SM89"
                entry.update(ok=True, engine_bytes=len(blob), **info)
                entry["plugin_types"] = sorted({n.op for n in graph.plugin_nodes()})
                entry["build_calls"] = {f"{k[0]}.{k[1]}": v for k, v in sorted(CALLS.items())}
                blobs[(cfg_name, label)] = (blob, graph)
            except Exception as e:  # noqa: BLE001 - the report records any failure
                entry.update(ok=False, error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()[-2000:])
            entry["seconds"] = round(time.time() - t0, 2)
            print(json.dumps({k: entry[k] for k in entry if k not in ("build_calls", "traceback")}), flush=True)
            builds.append(entry)
    report["builds"] = builds
    report["plugins_in_built_engines"] = sorted({p for b in builds if b.get("ok") for p in b["plugin_types"]})
    report["created_phases"] = sorted({p for p, _ in CREATED})
    tiny_graph = blobs.get(("tiny", "prefill_fp16"), (None, None))[1]
    if tiny_graph is not None:
        import onnx

        onnx.save(tiny_graph.to_onnx(), os.path.join(args.out, "llama_tiny_prefill_fp16.onnx"))

    if torch.cuda.is_available():
        from trtllm_kernels.engine.model import AttentionMetadata, LlamaModel
        from trtllm_kernels.engine.quantize import Fp8LlamaModel, quantize_weights

        enq = []
        for label, kw in VARIANTS:
            dt = kw.get("dtype", "float16")
            torch.manual_seed(0)
            w = {k: v.cuda() for k, v in random_weights(tiny, dt).items()}
            if kw.get("quantization") == "fp8":
                # one quantization of the weights for both sides, so only the kernels differ
                w = quantize_weights(tiny, w)
                model = Fp8LlamaModel(tiny, w)
            elif kw.get("quantization") in ("nvfp4", "mxfp4"):
                # W4A16: the model on the FP4 weights dequantized (the graph quantizes the same way)
                from trtllm_kernels.fp4 import dequantize_fp4, quantize_fp4

                deq = dict(w)
                for key in [k for k in w if k.endswith((".qkv", ".o", ".gate_up", ".down"))]:
                    deq[key] = dequantize_fp4(*quantize_fp4(w[key].float().cpu(), kw["quantization"])).to(w[key])
                model = LlamaModel(tiny, deq)
            else:
                model = LlamaModel(tiny, w)
            graph = llama_graph(tiny, {k: v.cpu() for k, v in w.items()}, page_size=4, **kw)
            lens = (1, 1, 1) if kw.get("mode") == "decode" else (5, 3)
            cache_dt = torch.float8_e4m3fn if kw.get("kv_cache_dtype") == "fp8" else torch_dtype(dt)
            feeds = _step_feeds(tiny, lens, 4, 12, torch_dtype(dt), cache_dt, "cuda")
            if kw.get("mode") == "decode":
                feeds.pop("query_start_loc")
            f_enq = {k: v.clone() for k, v in feeds.items()}
            f_run = {k: v.clone() for k, v in feeds.items()}
            CALLS.clear()
            got = run_torch(graph, f_enq, plugin_runner=enqueue_runner(trt))["logits"]
            ref = run_torch(graph, f_run)["logits"]
            caches = [(feeds[f"k_cache_{i}"].clone(), feeds[f"v_cache_{i}"].clone()) for i in range(tiny.num_hidden_layers)]
            qsl = feeds.get("query_start_loc", torch.arange(len(lens) + 1, dtype=torch.int32, device="cuda"))
            nd = len(lens) if kw.get("mode") == "decode" else 0
            meta = AttentionMetadata(feeds["slot_mapping"], feeds["block_tables"], feeds["seq_lens"], qsl, nd)
            hidden = model.forward(feeds["input_ids"], feeds["positions"], meta, caches)
            want = model.compute_logits(hidden[feeds["logits_indices"]])
            torch.cuda.synchronize()
            e = {"variant": label, "enqueues": {k[0]: v for k, v in CALLS.items() if k[1] == "enqueue"},
                 "enqueue_vs_run_max_abs": (got - ref).abs().max().item(),
                 "enqueue_vs_engine_model_max_abs": (got - want).abs().max().item(),
                 "logits_max_abs": want.abs().max().item(),
                 "k_cache_max_abs_diff": max((f_enq[f"k_cache_{i}"].float() - caches[i][0].float()).abs().max().item()
                                             for i in range(tiny.num_hidden_layers))}
            print(json.dumps(e), flush=True)
            enq.append(e)
        report["enqueue_checks"] = enq

        blob_graph = blobs.get(("tiny", "prefill_fp16"))
        if blob_graph is not None:
            blob, graph = blob_graph
            feeds = _step_feeds(tiny, (5, 3), 4, 64, torch.float16, torch.float16, "cuda")
            try:
                out = run_engine(blob, feeds, trt)
                report["engine_run"] = {"ok": True, "outputs": {k: list(v.shape) for k, v in out.items()}}
            except Exception as ex:  # noqa: BLE001 - expected on TensorRT-RTX + CC 9.0
                report["engine_run"] = {"ok": False, "error": f"{type(ex).__name__}: {ex}"}
            print("engine_run:", report["engine_run"], flush=True)

    with open(os.path.join(args.out, "plugins_check.json"), "w") as f:
        json.dump(report, f, indent=1, default=str)
    ok = all(report["registered"].values()) and all(b.get("ok") for b in builds)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
