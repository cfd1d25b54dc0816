"""Prometheus metrics in the text exposition format, written by hand.

Three kinds are enough for a server: counters (only go up), gauges (set to a value, or read
from a callback at scrape time) and histograms (cumulative buckets, sum and count). Each may
carry labels. Updates come from the step-loop thread and the HTTP event loop at once, so one
lock guards them all; an update is a few dict operations, far below a step's cost.

Format reference: https://prometheus.io/docs/instrumenting/exposition_formats/
"""
from __future__ import annotations

import math
import threading
from typing import Callable, Iterable

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Latency buckets in seconds: from a fast GPU decode step (ms) to a long queued CPU request.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5,
                   0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)


def _escape(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: tuple[str, ...], values: tuple, extra: str = "") -> str:
    parts = [f'{n}="{_escape(v)}"' for n, v in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _num(x: float) -> str:
    if math.isinf(x):
        return "+Inf" if x > 0 else "-Inf"
    if float(x).is_integer():
        return str(int(x))
    return repr(float(x))


class _Metric:
    kind = ""

    def __init__(self, registry: "Registry", name: str, help: str, labels: Iterable[str] = ()):
        self.name, self.help, self.label_names = name, help, tuple(labels)
        self._lock = registry.lock
        registry.metrics.append(self)

    def _key(self, labels: dict) -> tuple:
        if set(labels) != set(self.label_names):
            raise ValueError(f"{self.name} takes labels {self.label_names}, got {sorted(labels)}")
        return tuple(str(labels[n]) for n in self.label_names)

    def render(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}", *self._samples()]

    def _samples(self) -> list[str]:
        raise NotImplementedError


class Counter(_Metric):
    kind = "counter"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._values: dict[tuple, float] = {} if self.label_names else {(): 0.0}

    def inc(self, amount: float = 1.0, **labels) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels) -> float:
        return self._values.get(self._key(labels), 0.0)

    def _samples(self):
        return [f"{self.name}{_labels(self.label_names, k)} {_num(v)}" for k, v in sorted(self._values.items())]


class Gauge(_Metric):
    """A value set by the code, or read from `fn` at each scrape (for state owned elsewhere)."""

    kind = "gauge"

    def __init__(self, *args, fn: Callable[[], float] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.fn = fn
        self._value = 0.0

    def set(self, value: float) -> None:
        self._value = float(value)

    def value(self) -> float:
        return float(self.fn()) if self.fn is not None else self._value

    def _samples(self):
        return [f"{self.name} {_num(self.value())}"]


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, *args, buckets: Iterable[float] = LATENCY_BUCKETS, **kwargs):
        super().__init__(*args, **kwargs)
        self.buckets = tuple(sorted(buckets)) + (math.inf,)
        self._counts = [0] * len(self.buckets)  # per bucket, made cumulative when rendered
        self._sum = 0.0
        self._count = 0

    def observe(self, value: float) -> None:
        with self._lock:
            for i, upper in enumerate(self.buckets):
                if value <= upper:
                    self._counts[i] += 1
                    break
            self._sum += value
            self._count += 1

    @property
    def count(self) -> int:
        return self._count

    def _samples(self):
        lines, total = [], 0
        for upper, n in zip(self.buckets, self._counts):
            total += n
            lines.append(f'{self.name}_bucket{{le="{_num(upper)}"}} {total}')
        lines += [f"{self.name}_sum {_num(self._sum)}", f"{self.name}_count {self._count}"]
        return lines


class Registry:
    def __init__(self):
        self.lock = threading.Lock()
        self.metrics: list[_Metric] = []

    def counter(self, name, help, labels=()) -> Counter:
        return Counter(self, name, help, labels)

    def gauge(self, name, help, fn=None) -> Gauge:
        return Gauge(self, name, help, fn=fn)

    def histogram(self, name, help, buckets=LATENCY_BUCKETS) -> Histogram:
        return Histogram(self, name, help, buckets=buckets)

    def render(self) -> str:
        with self.lock:
            return "\n".join(line for m in self.metrics for line in m.render()) + "\n"


def parse(text: str) -> dict[str, float]:
    """Samples of an exposition text as {"name{labels}": value}: what tests and scripts read."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out
