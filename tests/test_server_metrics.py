"""The hand-written Prometheus exposition (runtime/metrics.py): no server, no model needed."""
import math

import pytest

from trtllm_kernels.runtime.metrics import Registry, parse


def test_counters_gauges_histograms_render_in_the_text_format():
    reg = Registry()
    c = reg.counter("req_total", "Requests.", ("path", "status"))
    c.inc(path="/v1/completions", status="200")
    c.inc(2, path="/v1/completions", status="200")
    c.inc(path='/x"y\\z', status="404")
    state = {"v": 3}
    reg.gauge("queue_depth", "Waiting.", fn=lambda: state["v"])
    h = reg.histogram("ttft_seconds", "TTFT.", buckets=(0.1, 1.0))
    for v in (0.05, 0.5, 0.5, 7.0):
        h.observe(v)
    text = reg.render()
    assert "# TYPE req_total counter" in text and "# TYPE ttft_seconds histogram" in text
    m = parse(text)
    assert m['req_total{path="/v1/completions",status="200"}'] == 3
    assert m['req_total{path="/x\\"y\\\\z",status="404"}'] == 1  # label values escaped
    assert m["queue_depth"] == 3
    state["v"] = 5  # gauges with a callback are read at scrape time
    assert parse(reg.render())["queue_depth"] == 5
    # buckets are cumulative; +Inf equals the count
    assert m['ttft_seconds_bucket{le="0.1"}'] == 1
    assert m['ttft_seconds_bucket{le="1"}'] == 3
    assert m['ttft_seconds_bucket{le="+Inf"}'] == m["ttft_seconds_count"] == 4
    assert math.isclose(m["ttft_seconds_sum"], 8.05)


def test_wrong_labels_are_refused():
    c = Registry().counter("x_total", "X.", ("reason",))
    with pytest.raises(ValueError, match="takes labels"):
        c.inc(status="1")
