"""The benchmark harness's own logic, on CPU: timing, rotation, roofline arithmetic, the case
registry, result files and the CLI. (Numbers on CPU mean nothing; the code paths are the ones
the GPU run takes, except CUDA events and graphs, covered by the `gpu` test at the end.)
"""
import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from trtllm_kernels.bench import cli as bench_cli
from trtllm_kernels.bench.kernels import (
    build_cases,
    compare_outputs,
    paged_from_contiguous,
    run_kernel_benchmarks,
    select_cases,
)
from trtllm_kernels.bench.report import REQUIRED_FIELDS, Case, load_results, markdown_table, plot_results, write_results
from trtllm_kernels.bench.roofline import fraction_of_roofline, measure_copy_bandwidth, measure_matmul_peak, roofline_us
from trtllm_kernels.bench.timing import _device_of, num_rotations, tensor_bytes, time_fn

HAS_MPL = importlib.util.find_spec("matplotlib") is not None
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# --- timing ----------------------------------------------------------------------------------


def test_time_fn_rotates_every_input_set_evenly():
    sets = [(torch.full((4,), float(i)),) for i in range(5)]
    seen = []
    result = time_fn(lambda x: seen.append(int(x[0])), sets, warmup=5, iters=20)
    assert result["n"] == 20 and result["n_sets"] == 5
    assert len(seen) == 25  # warm-up calls happen too
    timed = seen[5:]
    assert sorted(set(timed)) == [0, 1, 2, 3, 4]
    assert all(timed.count(i) == 4 for i in range(5)), timed
    assert timed[:6] == [0, 1, 2, 3, 4, 0]  # in turn, not one set over and over
    assert 0 < result["min_us"] <= result["p10_us"] <= result["median_us"] <= result["p90_us"]


def test_time_fn_finds_the_device_inside_nested_inputs():
    # Inputs passed as dicts (as the kernel cases do) must still select the device's clock:
    # a CUDA tensor timed with perf_counter would time only its asynchronous launch.
    meta = torch.empty(2, device="meta")
    assert _device_of([({"a": 1, "b": [meta]},)]) == torch.device("meta")
    assert _device_of([({"a": 1},)]) is None


def test_time_fn_reports_microseconds():
    result = time_fn(lambda: time.sleep(0.002), [()], warmup=1, iters=5)
    assert 1900 <= result["median_us"] < 20000, result  # 2 ms is ~2000 us, not 2 or 2e6


def test_time_fn_budget_caps_calls():
    calls = []
    result = time_fn(lambda: (calls.append(1), time.sleep(0.01)), [()], warmup=2, iters=1000,
                     budget_s=0.1, min_iters=3)
    assert 3 <= result["n"] <= 15, result["n"]
    with pytest.raises(ValueError):
        time_fn(lambda: None, [], iters=1)


def test_num_rotations_exceeds_l2():
    l2 = 50 << 20
    n = num_rotations(10 << 20, l2)
    assert n * (10 << 20) > l2 and (n - 1) * (10 << 20) <= 2 * l2
    assert num_rotations(1 << 30, l2) == 1
    assert num_rotations(8, l2, max_sets=64) == 64
    assert num_rotations(10 << 20, l2, max_total_bytes=30 << 20) == 3
    assert num_rotations(0, l2) >= 1
    assert tensor_bytes({"a": torch.zeros(10, dtype=torch.bfloat16), "b": (torch.zeros(3),)}) == 32


# --- roofline --------------------------------------------------------------------------------


def test_roofline_arithmetic():
    bw, peak = 3e12, 700e12
    # memory-bound: 3 GB at 3 TB/s is 1000 us; measured 2000 us -> half the roofline
    assert roofline_us(3e9, 0, bw, peak) == pytest.approx(1000.0)
    assert fraction_of_roofline(2000.0, 3e9, 0, bw, peak) == pytest.approx(0.5)
    # compute-bound: 1.4 PFLOP... 7e12 FLOP at 700 TFLOP/s is 10000 us; the bytes matter less
    assert fraction_of_roofline(12500.0, 3e9, 7e12, bw, peak) == pytest.approx(0.8)
    # the larger of the two bounds wins
    assert fraction_of_roofline(1000.0, 3e9, 7e11, bw, peak) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        fraction_of_roofline(0.0, 1, 1, bw, peak)


def test_ceiling_measurements_run_on_cpu():
    assert measure_copy_bandwidth("cpu", 1 << 20, iters=5) > 1e8
    assert measure_matmul_peak("cpu", n=64, iters=5) > 1e6


def test_case_derives_ratio_and_rates():
    c = Case.from_times("x", 50.0, "torch", 100.0, "dev", nbytes=3_000_000, flops=0, bandwidth=3e12, peak=1e15)
    assert c.ratio_vs_baseline == pytest.approx(2.0)
    assert c.fraction_of_roofline == pytest.approx(1.0 / 50.0)  # 1 us roofline / 50 us
    assert c.baseline_fraction_of_roofline == pytest.approx(1.0 / 100.0)
    assert c.ours_GBps == pytest.approx(60.0)


# --- cases -----------------------------------------------------------------------------------


def test_paged_cache_holds_the_contiguous_kv():
    b, h, s, d, bs = 3, 2, 21, 8, 4
    k, v = torch.randn(b, h, s, d), torch.randn(b, h, s, d)
    kc, vc, bt = paged_from_contiguous(k, v, bs)
    assert kc.shape == (b * 6, h, bs, d) and bt.shape == (b, 6) and bt.dtype == torch.int32
    assert sorted(bt.flatten().tolist()) == list(range(b * 6))  # each block used once
    assert not torch.equal(bt.flatten(), torch.arange(b * 6, dtype=torch.int32))  # shuffled
    for i in range(b):
        for pos in range(s):
            blk = bt[i, pos // bs]
            assert torch.equal(kc[blk, :, pos % bs], k[i, :, pos])
            assert torch.equal(vc[blk, :, pos % bs], v[i, :, pos])
    assert torch.isnan(kc[bt[0, -1], :, s % bs:]).all()  # past the end: NaN


def test_registry_names_filter_and_full_shapes():
    tiny = build_cases("tiny", torch.float32)
    names = [c.name for c in tiny]
    assert len(names) == len(set(names))
    ops = {c.op for c in tiny}
    assert ops == {"rms_norm", "fused_add_rms_norm", "silu_and_mul", "linear", "rotary_embedding",
                   "write_kv_cache", "paged_attention_decode", "paged_attention_prefill"}
    assert [c.name for c in select_cases("decode", "tiny", torch.float32)] == [n for n in names if "decode" in n]
    full = {c.name: c for c in build_cases("full", torch.bfloat16)}  # built lazily: no allocation
    dec = full["paged_attention_decode/B64_ctx4096_page16_H32-8_D128"]
    assert dec.nbytes >= 2 * 64 * 4096 * 8 * 128 * 2  # K and V, read once
    assert dec.flops == 4 * 64 * 32 * 4096 * 128
    for label in ("B64_ctx4096_page64", "B256_ctx512_page16", "B4_ctx32768_page16"):
        assert any(label in n for n in full)
    assert "paged_attention_prefill/B4_S4096_page16_H32-8_D128_causal" in full
    assert full["linear/gate_up_M64_N28672_K4096"].flops == 2 * 64 * 28672 * 4096


def test_every_tiny_case_agrees_with_its_baseline():
    for case in build_cases("tiny", torch.float32):
        inputs = case.make_inputs(torch.device("cpu"), torch.float32)
        a, b = case.outputs(inputs) if case.outputs else (case.ours(inputs), case.baseline(inputs))
        err, ok = compare_outputs(a, b, torch.float32)
        assert ok, (case.name, err)


def test_compare_outputs_catches_errors():
    x = torch.randn(4, 8)
    assert compare_outputs(x, x.clone(), torch.float32) == (0.0, True)
    assert not compare_outputs(x + 0.1, x, torch.float32)[1]
    y = x.clone()
    y[0, 0] = float("nan")
    assert not compare_outputs(y, x, torch.float32)[1]  # a leaked NaN is a mismatch
    assert not compare_outputs(x[:2], x, torch.float32)[1]


# --- end to end ------------------------------------------------------------------------------


def _check_results(out_dir, stem, pattern):
    data = load_results(out_dir / f"{stem}.json")
    for key in ("device", "date", "command", "torch", "triton", "copy_bandwidth_GBps", "matmul_peak_TFLOPs"):
        assert key in data
    assert data["copy_bandwidth_GBps"] > 0 and data["matmul_peak_TFLOPs"] > 0
    expected = [c.name for c in select_cases(pattern, "tiny", torch.float32)]
    assert [c["name"] for c in data["cases"]] == expected
    for c in data["cases"]:
        assert all(f in c for f in REQUIRED_FIELDS)
        assert c["ours_us"] > 0 and c["baseline_us"] > 0
        assert c["ratio_vs_baseline"] == pytest.approx(c["baseline_us"] / c["ours_us"], rel=1e-9)
        assert 0 < c["fraction_of_roofline"] < 10
        assert c["device"] == data["device"]
        assert "MISMATCH" not in c["notes"]
    md = (out_dir / f"{stem}.md").read_text()
    assert "| case | ours (us) |" in md
    for c in data["cases"]:
        assert re.search(rf"\| {re.escape(c['name'])} \| {c['ours_us']:.2f} \|", md)
    return data


def test_run_kernel_benchmarks_writes_json_markdown_and_plot(tmp_path):
    pattern = "rms_norm|paged_attention_decode"
    cases = run_kernel_benchmarks(pattern, "cpu", str(tmp_path), "k", quick=True, verbose=False)
    assert {c.name for c in cases} == {c.name for c in select_cases(pattern, "tiny", torch.float32)}
    assert len(cases) == 4
    data = _check_results(tmp_path, "k", pattern)
    assert json.loads((tmp_path / "k.json").read_text()) == data
    if HAS_MPL:
        assert (tmp_path / "k.png").read_bytes()[:8] == PNG_MAGIC


def test_no_matching_case_is_an_error():
    with pytest.raises(ValueError, match="no tiny kernel benchmark matches"):
        run_kernel_benchmarks("no_such_kernel", "cpu", None, quick=True, verbose=False)


def test_cli_kernels_then_plot_from_json(tmp_path, capsys):
    out = tmp_path / "res"
    args = ["kernels", "--filter", "silu|linear", "--out", str(out), "--quick", "--no-plot", "--device", "cpu"]
    assert bench_cli.main(args) == 0
    data = _check_results(out, "kernels", "silu|linear")
    assert data["command"].startswith("trtllm-kernels bench kernels --filter")
    assert not (out / "kernels.png").exists()
    if HAS_MPL:
        assert bench_cli.main(["plot", str(out / "kernels.json"), "-o", str(tmp_path / "p.png")]) == 0
        assert (tmp_path / "p.png").read_bytes()[:8] == PNG_MAGIC
    assert bench_cli.main(["kernels", "--list", "--filter", "prefill", "--device", "cpu"]) == 0
    listed = capsys.readouterr().out.split()
    assert "paged_attention_prefill/B2_S24_page16_H4-2_D32_causal" in listed
    assert bench_cli.main(["kernels", "--filter", "nothing_matches", "--no-write", "--device", "cpu"]) == 2


def test_plot_without_matplotlib_says_how_to_get_it(tmp_path, monkeypatch):
    c = Case.from_times("a", 1.0, "b", 2.0, "cpu")
    json_path, _ = write_results([c], tmp_path, "r", {"device": "cpu"})
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)
    with pytest.raises(ImportError, match="pip install matplotlib"):
        plot_results(json_path)


def test_markdown_table_and_required_fields_check(tmp_path):
    c = Case.from_times("op/s1", 10.0, "torch", 25.0, "dev", nbytes=1000, flops=0, bandwidth=1e9, peak=1e12)
    md = markdown_table([c], {"device": "dev", "copy_bandwidth_GBps": 1.0, "matmul_peak_TFLOPs": 1.0})
    assert "| op/s1 | 10.00 | torch | 25.00 | 2.50x | 0.1 |" in md
    (tmp_path / "bad.json").write_text(json.dumps({"cases": [{"name": "x"}]}))
    with pytest.raises(ValueError, match="lacks"):
        load_results(tmp_path / "bad.json")


@pytest.mark.gpu
def test_cuda_events_and_graph_timing_rotate_sets():
    x = [(torch.full((1 << 20,), float(i), device="cuda"),) for i in range(3)]
    for graph in (False, True):
        seen = []  # host-side record of which set each call (or captured call) used
        r = time_fn(lambda t: (seen.append(t.data_ptr()), t * 2), x, warmup=3, iters=20, graph=graph)
        assert r["mode"] == ("cuda-graph" if graph else "cuda-events")
        assert set(seen) == {t.data_ptr() for (t,) in x}
        assert 0 < r["min_us"] <= r["median_us"] < 1e5


@pytest.mark.gpu
def test_kernel_benchmarks_time_cuda_work_with_events(tmp_path):
    cases = run_kernel_benchmarks("rms_norm|decode", "cuda", str(tmp_path), "g", quick=True, sizes="tiny",
                                  verbose=False)
    assert len(cases) == 4
    for c in cases:
        assert c.timing["ours"]["mode"] == "cuda-events" == c.timing["baseline"]["mode"]
        assert "MISMATCH" not in c.notes and "ROOFLINE" not in c.notes
    graphed = run_kernel_benchmarks("linear", "cuda", None, quick=True, sizes="tiny", graph=True, verbose=False)
    assert graphed[0].timing["ours"]["mode"] in ("cuda-graph", "cuda-events")


@pytest.mark.gpu
def test_graph_mode_refuses_uncapturable_calls_and_recovers():
    from trtllm_kernels.bench.timing import GraphCaptureError

    x = [(torch.randn(1024, device="cuda"),)]
    with pytest.raises(GraphCaptureError, match="synchronizes"):
        time_fn(lambda t: t.sum().item(), x, iters=5, graph=True)  # caught before capture
    with pytest.raises(GraphCaptureError):  # passes the check, fails in capture
        time_fn(lambda t: (torch.cuda.synchronize(), t * 2), x, iters=5, graph=True)
    assert torch.randn(4, device="cuda").isfinite().all()  # the CUDA RNG still works
    assert time_fn(lambda t: t * 2, x, iters=5, graph=True)["mode"] == "cuda-graph"


# --- same-machine A/B of two revisions -------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not (REPO / ".git").exists() or shutil.which("git") is None, reason="needs a git checkout")
def test_tree_at_exports_a_revision_that_runs_its_own_engine_runtime_and_kernels(tmp_path):
    """benchmarks/tree_at.sh's copy, on PYTHONPATH, imports its own engine and runtime and builds
    its own csrc sources, not the working tree's (an editable install maps those subpackages to
    the repository's folders); it refuses to overwrite a folder."""
    copy = tmp_path / "old"
    tree_at = ["bash", str(REPO / "benchmarks" / "tree_at.sh"), "HEAD", str(copy)]
    subprocess.run(tree_at, check=True, capture_output=True)
    probe = ("import trtllm_kernels.engine as e, trtllm_kernels.runtime as r\n"
             "from trtllm_kernels.kernels import csrc\n"
             "print(e.__file__, r.__file__, csrc.source_dir(), sep='\\n')")
    env = dict(os.environ, PYTHONPATH=str(copy))
    out = subprocess.run([sys.executable, "-c", probe], cwd=copy, env=env, check=True, capture_output=True,
                         text=True).stdout.split("\n")[:3]
    assert all(Path(p).resolve().is_relative_to(copy.resolve()) for p in out), out
    assert (Path(out[2]) / "fp4_gemm.cu").is_file()
    again = subprocess.run(tree_at, capture_output=True, text=True)
    assert again.returncode != 0 and "exists" in again.stderr
