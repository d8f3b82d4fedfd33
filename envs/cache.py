"""Where craft-bench keeps its caches, how several processes build one cache entry safely, and how entries prove
their integrity. Everything generated offline (games, indexes, tiny models) lives under $CRAFT_BENCH_HOME
(default ~/.cache/craft-bench)."""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock

#: The file in a verified cache entry (a directory) that lists the sha256 of every other file in it.
MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1


class CorruptCacheError(RuntimeError):
    """A cache entry fails its manifest check even after a rebuild; the message names it and how to clear it."""


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
        if not target.exists():
            _build_into(target, build)
    return target


def _build_into(target: Path, build: Callable[[Path], None], finish: Callable[[Path], None] = lambda _: None) -> None:
    """Build in a temporary sibling, `finish` it (e.g. write its manifest), and rename it into place (lock held)."""
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", suffix=".tmp", dir=target.parent))
    staged = tmp / target.name
    try:
        build(staged)
        if not staged.exists():
            raise RuntimeError(f"cache builder for {target} wrote nothing at {staged}")
        finish(staged)
        os.replace(staged, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------- integrity
def clear_command(entry: Path) -> str:
    """The shell command that deletes a cache entry (the next use rebuilds it)."""
    return f"rm -rf {shlex.quote(str(entry))}"


def _file_hashes(entry: Path) -> dict[str, str]:
    return {
        path.relative_to(entry).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(entry.rglob("*"))
        if path.is_file() and path.name != MANIFEST_NAME
    }


def write_manifest(entry: Path) -> None:
    """Record the sha256 of every file of the directory `entry` in its manifest."""
    manifest = {"version": MANIFEST_VERSION, "files": _file_hashes(entry)}
    (entry / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1, sort_keys=True))


def check_manifest(entry: Path) -> str | None:
    """None if the directory `entry` holds exactly the files its manifest lists, with their hashes; else the
    problem, in words."""
    if not entry.is_dir():
        return "it is not a directory"
    try:
        manifest = json.loads((entry / MANIFEST_NAME).read_text())
        expected = manifest["files"]
        if manifest.get("version") != MANIFEST_VERSION or not isinstance(expected, dict):
            return f"{MANIFEST_NAME} has an unknown format"
    except FileNotFoundError:
        return f"it has no {MANIFEST_NAME} (built by an older craft-bench, or by a build that was interrupted)"
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        return f"its {MANIFEST_NAME} is unreadable ({type(error).__name__}: {error})"
    actual = _file_hashes(entry)
    missing = sorted(set(expected) - set(actual))
    if missing:
        return f"file(s) {missing} are missing"
    changed = sorted(name for name in expected if actual[name] != expected[name])
    if changed:
        return f"file(s) {changed} do not match their sha256 in {MANIFEST_NAME}"
    extra = sorted(set(actual) - set(expected))
    if extra:
        return f"file(s) {extra} are not in {MANIFEST_NAME}"
    return None


# Entries verified by this process, with the (name, size, mtime) of their files then: hashing again is needed only
# when a file changes, so a game is hashed once per process, not on every reset.
_VERIFIED: dict[Path, tuple] = {}


def _signature(entry: Path) -> tuple:
    return tuple(
        (path.relative_to(entry).as_posix(), stat.st_size, stat.st_mtime_ns)
        for path in sorted(entry.rglob("*"))
        if path.is_file() and (stat := path.stat())
    )


def build_verified(target: Path, build: Callable[[Path], None]) -> Path:
    """`build_once` for a directory entry that carries a manifest of its files' sha256, checked on every load.

    A corrupt entry (a changed, missing or extra file, or no manifest) is rebuilt, with a warning naming it; if the
    rebuilt entry fails too, `CorruptCacheError` names it and the command that clears it. A check hashes the entry's
    files once per process and again only when their size or mtime changes.
    """
    target = Path(target)
    if target.is_dir() and _VERIFIED.get(target) == _signature(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        problem = check_manifest(target) if target.exists() else None
        if problem is not None:
            warnings.warn(f"craft-bench cache entry {target} is corrupt ({problem}); rebuilding it", stacklevel=2)
            _remove(target)
        if not target.exists():
            _build_into(target, build, finish=write_manifest)
        problem = check_manifest(target)
        if problem is not None:
            raise CorruptCacheError(
                f"cache entry {target} is corrupt ({problem}) even after a rebuild; clear it with "
                f"`{clear_command(target)}` and check the disk and $CRAFT_BENCH_HOME"
            )
        _VERIFIED[target] = _signature(target)
    return target


def _remove(entry: Path) -> None:
    """Delete an entry: renamed aside first (atomic), so a reader never sees a half-deleted one."""
    aside = Path(tempfile.mkdtemp(prefix=entry.name + ".", suffix=".corrupt", dir=entry.parent))
    os.replace(entry, aside / entry.name)
    shutil.rmtree(aside, ignore_errors=True)
