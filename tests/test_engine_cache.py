"""The engine cache (engine/cache.py): built once per checkpoint and config, reused, pruned
least recently used first to $TRTLLM_KERNELS_CACHE_GB. The build itself is faked with a
directory of a chosen size; the real build is covered by test_llm / test_runtime."""
import os
import time

import pytest

from trtllm_kernels.engine import BuildConfig, cache
from trtllm_kernels.engine.builder import ENGINE_CONFIG

MIB = 2**20


@pytest.fixture
def builds(tmp_path, monkeypatch):
    """Every build writes a 1 MiB engine; returns the list of directories built."""
    built = []

    def fake_build(checkpoint, output_dir, build_config, progress):
        output_dir.mkdir(parents=True)
        (output_dir / "model.safetensors").write_bytes(b"\0" * MIB)
        (output_dir / ENGINE_CONFIG).write_text("{}")
        built.append(output_dir)
        return output_dir

    monkeypatch.setattr(cache, "build_engine", fake_build)
    monkeypatch.setenv("TRTLLM_KERNELS_CACHE", str(tmp_path / "cache"))
    return built


@pytest.fixture
def checkpoint(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF")
    return path


def engine(checkpoint, n):
    return cache.cached_engine(checkpoint, BuildConfig(max_seq_len=n), progress=False)


def age(engine_dir, seconds):
    t = time.time() - seconds
    os.utime(engine_dir / ENGINE_CONFIG, (t, t))


def test_built_once_then_reused(builds, checkpoint):
    first = engine(checkpoint, 64)
    assert engine(checkpoint, 64) == first and builds == [first]
    assert engine(checkpoint, 128) != first and len(builds) == 2


def test_prunes_least_recently_used(builds, checkpoint, monkeypatch):
    monkeypatch.setenv(cache.BUDGET_ENV, str(2.5 * MIB / 2**30))  # room for two engines
    a, b = engine(checkpoint, 64), engine(checkpoint, 128)
    age(a, 100)
    age(b, 50)
    assert engine(checkpoint, 64) == a  # a use: a is now the most recent
    c = engine(checkpoint, 256)
    assert a.is_dir() and c.is_dir() and not b.exists()
    assert len(builds) == 3


def test_zero_budget_keeps_only_the_new_engine(builds, checkpoint, monkeypatch):
    monkeypatch.setenv(cache.BUDGET_ENV, "0")
    a = engine(checkpoint, 64)
    b = engine(checkpoint, 128)
    assert b.is_dir() and not a.exists()


def test_default_budget_keeps_everything_small(builds, checkpoint):
    dirs = [engine(checkpoint, n) for n in (64, 128, 256)]
    assert all(d.is_dir() for d in dirs)
    assert cache.budget_bytes() == cache.DEFAULT_BUDGET_GB * 2**30


@pytest.mark.parametrize("value", ["lots", "-1", "nan", "inf"])
def test_bad_budget_fails_before_building(builds, checkpoint, monkeypatch, value):
    monkeypatch.setenv(cache.BUDGET_ENV, value)
    with pytest.raises(ValueError, match=cache.BUDGET_ENV):
        engine(checkpoint, 64)
    assert builds == []


def test_abandoned_builds_are_removed(builds, checkpoint):
    engines = engine(checkpoint, 64).parent
    old, fresh = engines / ".x-old.tmp", engines / ".x-fresh.tmp"
    old.mkdir()
    fresh.mkdir()
    t = time.time() - cache.ABANDONED_BUILD_S - 60
    os.utime(old, (t, t))
    engine(checkpoint, 128)
    assert not old.exists() and fresh.is_dir()


def test_missing_checkpoint(builds, tmp_path):
    from trtllm_kernels.engine.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="does not exist"):
        cache.cached_engine(tmp_path / "nope.gguf")
