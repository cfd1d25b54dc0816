"""The engine cache: each (checkpoint, build config) is built once into
`cache_root()/engines/<checkpoint stem>-<key>` and reused after.

Engines are large (0.5 GB for the float32 default model, 16 GB for a bf16 8B one) and the key
holds the checkpoint's path, so a checkpoint that moves (a new clone, a fresh virtual
environment) builds anew. Left alone that fills the disk, so after every build the cache is
pruned, least recently used first, to $TRTLLM_KERNELS_CACHE_GB (default 32 GiB). Every use of
an engine stamps its engine_config.json, which is what "recently used" reads.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from pathlib import Path

from trtllm_kernels._paths import cache_root

from .builder import ENGINE_CONFIG, FORMAT_VERSION, build_engine
from .checkpoint import CheckpointError
from .config import BuildConfig

BUDGET_ENV = "TRTLLM_KERNELS_CACHE_GB"
DEFAULT_BUDGET_GB = 32
# A build writes into a hidden directory beside its final place (build_engine); one this old
# belongs to a process that died mid-build.
ABANDONED_BUILD_S = 24 * 3600


def cached_engine(checkpoint: str | os.PathLike, build_config: BuildConfig | None = None, progress: bool = True) -> Path:
    """The engine directory for a checkpoint, built once into the cache and reused after.

    The key covers the checkpoint's path, size and modification time, the build config and the
    engine format, so a changed checkpoint or config builds anew.
    """
    checkpoint = Path(checkpoint).resolve()
    if not checkpoint.exists():
        raise CheckpointError(f"model path {checkpoint} does not exist")
    build_config = build_config or BuildConfig()
    budget = budget_bytes()  # a bad setting fails before a build, not after
    stat = checkpoint.stat()
    key = json.dumps([str(checkpoint), stat.st_size, stat.st_mtime_ns, build_config.to_dict(), FORMAT_VERSION])
    engine_dir = cache_root() / "engines" / f"{checkpoint.stem}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
    if (engine_dir / ENGINE_CONFIG).is_file():
        _stamp_use(engine_dir)
        return engine_dir
    if progress:
        print(f"Building engine for {checkpoint} into {engine_dir} (once)")
    build_engine(checkpoint, engine_dir, build_config, progress=progress)
    removed = prune(engine_dir.parent, budget, keep=engine_dir)
    if progress and removed:
        print(f"Removed {len(removed)} least recently used cached engine(s) to stay within "
              f"{BUDGET_ENV}={budget / 2**30:g}")
    return engine_dir


def budget_bytes() -> int:
    """$TRTLLM_KERNELS_CACHE_GB in bytes (GiB, default 32; 0 keeps only the engine just built)."""
    raw = os.environ.get(BUDGET_ENV)
    if raw is None:
        return DEFAULT_BUDGET_GB * 2**30
    try:
        gib = float(raw)
    except ValueError:
        gib = math.nan
    if not (gib >= 0 and math.isfinite(gib)):
        raise ValueError(f"{BUDGET_ENV} must be a number of GiB >= 0, got {raw!r}")
    return int(gib * 2**30)


def prune(engines: Path, budget: int, keep: Path) -> list[Path]:
    """Remove engines under `engines`, least recently used first, until the rest fit in `budget`
    bytes; `keep` stays whatever its size. Returns the removed directories."""
    now = time.time()
    entries = []
    for path in engines.iterdir():
        if not path.is_dir():
            continue
        if path.name.startswith("."):  # a build under way, or abandoned
            if now - path.stat().st_mtime > ABANDONED_BUILD_S:
                shutil.rmtree(path, ignore_errors=True)
            continue
        entries.append((_last_use(path), path, _size(path)))
    total = sum(size for _, _, size in entries)
    removed = []
    for _, path, size in sorted(entries):
        if total <= budget:
            break
        if path == keep:
            continue
        shutil.rmtree(path, ignore_errors=True)
        total -= size
        removed.append(path)
    return removed


def _stamp_use(engine_dir: Path) -> None:
    try:
        os.utime(engine_dir / ENGINE_CONFIG)
    except OSError:  # a read-only cache is still a cache
        pass


def _last_use(engine_dir: Path) -> float:
    config = engine_dir / ENGINE_CONFIG
    return (config if config.is_file() else engine_dir).stat().st_mtime


def _size(directory: Path) -> int:
    return sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())
