"""Where craft-bench keeps its caches, and how several processes build one cache entry safely.
Everything generated offline (games, indexes, tiny models) lives under $CRAFT_BENCH_HOME (default ~/.cache/craft-bench)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock


def home() -> Path:
    """The root of craft-bench's cache: `$CRAFT_BENCH_HOME`, else `~/.cache/craft-bench`."""
    root = os.environ.get("CRAFT_BENCH_HOME")
    path = Path(root).expanduser() if root else Path.home() / ".cache" / "craft-bench"
    path.mkdir(parents=True, exist_ok=True)
    return path


def cache_dir(*parts: str) -> Path:
    """A sub-directory of the cache, created if missing."""
    path = home().joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def build_once(target: Path, build: Callable[[Path], None]) -> Path:
    """Make `target` (a file or directory) exactly once, even when several processes ask at the same time.

    `build(tmp)` writes the entry to a temporary path next to `target`; it is then renamed into place, so a
    reader never sees a half-written entry and a crash mid-build leaves nothing behind but a stale temp file.
    A lock file serialises builders; the second builder finds the entry done and returns at once.
    """
    target = Path(target)
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if target.exists():
            return target
        tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", suffix=".tmp", dir=target.parent))
        staged = tmp / target.name
        try:
            build(staged)
            if not staged.exists():
                raise RuntimeError(f"cache builder for {target} wrote nothing at {staged}")
            os.replace(staged, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target
