"""The files of a run directory, written so that crashes, kills and concurrent starts never lose or mix data: the
run lock, metrics.csv rows (append, widen, truncate, torn-line repair), atomic JSON/CSV writes.

It also holds the two checks that decide whether a run may start: `validate_train_config` (every field's type and
range, before anything is created) and `config_differences` (which settings a resume would change).
"""

from __future__ import annotations

import csv
import dataclasses
import difflib
import io
import json
import math
import os
import socket
import time
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LOCK_FILE = ".lock"
#: Descriptors of the run locks this process holds; a forked child closes its copies at once (see RunLock).
_HELD_LOCK_FDS: set[int] = set()


def _close_inherited_locks() -> None:
    for fd in list(_HELD_LOCK_FDS):
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD_LOCK_FDS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_inherited_locks)

# ---------------------------------------------------------------------------------------------------- the run lock


class RunLockedError(RuntimeError):
    """Another live process holds the run directory."""


class RunLock:
    """An exclusive lock on a run directory for the run's lifetime: `with RunLock(run_dir): ...`.

    It is a `flock` on `<run_dir>/.lock`, so the kernel releases it when the holder exits, however it exits: a lock
    file left by a dead process never blocks (no stale-lock cleanup needed). The holder writes its pid, host and
    start time into the file, so a refused run can name it. Local file systems only: flock over NFS is not reliable.
    No worker keeps the lock alive after its parent died: spawned and forkserver workers never get the descriptor
    (Python opens files non-inheritable), and a forked child closes its copy at once (os.register_at_fork).
    """

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        import fcntl

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "a process that has not written its pid yet"
            os.close(fd)
            raise RunLockedError(
                f"{self.path.parent} is in use by another run ({holder}); wait for it to finish, stop it, or choose "
                "another --out"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%dT%H:%M:%S%z')}\n".encode(), 0)
        self._fd = fd
        _HELD_LOCK_FDS.add(fd)
        return self

    def release(self) -> None:
        """Unlock; the file stays (removing it would let a third process lock a different inode than a second)."""
        if self._fd is not None:
            _HELD_LOCK_FDS.discard(self._fd)
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# ---------------------------------------------------------------------------------------------------- atomic writes
def write_json_atomic(path: str | Path, payload: Any) -> None:
    """Replace `path` with pretty, key-sorted JSON; a crash leaves the old file or the new one, never a mix."""
    write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")


def write_csv_atomic(path: str | Path, columns: Sequence[str], rows: Iterable[Mapping[str, Any]]) -> None:
    """Replace `path` with a CSV of `columns` (missing cells empty, extra keys ignored), atomically."""
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=list(columns), restval="", extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(path, buffer.getvalue())


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write to `<name>.tmp`, fsync, rename over `path`; on any failure (e.g. disk full) the temporary file is
    removed and `path` is untouched."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with tmp.open("w", newline="") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------------------------------------------- metrics.csv
def read_metrics(path: str | Path) -> tuple[list[str], list[dict[str, str]]]:
    """(header, complete rows) of a metrics CSV; ([], []) if it does not exist or is empty.

    A row is complete when it ends with a newline and has exactly the header's number of fields: a kill during an
    append can leave a torn last line, which is dropped here rather than parsed as a short row.
    """
    header, rows, _ = _read_metrics(Path(path))
    return header, rows


def _read_metrics(path: Path) -> tuple[list[str], list[dict[str, str]], bool]:
    """read_metrics, and whether every line of the file was a complete row (False: something was dropped)."""
    if not path.exists():
        return [], [], True
    with path.open(newline="") as handle:
        lines = handle.read().split("\n")
    clean = lines.pop() == ""  # "" after a final newline, else a torn line the writer died in
    if not lines:
        return [], [], clean
    header = next(csv.reader([lines[0]]))
    parsed = list(csv.reader(lines[1:]))
    rows = [dict(zip(header, fields)) for fields in parsed if len(fields) == len(header)]
    return header, rows, clean and len(rows) == len(parsed)


def truncate_metrics(path: str | Path, steps_done: int) -> None:
    """Keep the complete rows of steps < `steps_done` (the ones the checkpoint covers), in step order, once each.

    Drops torn lines, malformed rows, rows of steps the checkpoint does not hold (a kill between the metrics append
    and the checkpoint) and duplicates; rewrites the file only when something was dropped. `steps_done=0` (no
    checkpoint) leaves just the header.
    """
    path = Path(path)
    if not path.exists():
        return
    header, rows, clean = _read_metrics(path)
    if not header:
        path.unlink()  # nothing but a torn header: the next append writes a fresh one
        return
    kept: dict[int, dict[str, str]] = {}
    for row in rows:
        step = _as_step(row.get("step"))
        if step is not None and 0 <= step < steps_done and step not in kept:
            kept[step] = row
    ordered = [kept[s] for s in sorted(kept)]
    if ordered != rows or not clean:
        write_csv_atomic(path, header, ordered)


def append_metrics(path: str | Path, row: Mapping[str, Any]) -> None:
    """Append one row, fsync'd. A metric that first appears mid-run widens the file (rewritten atomically); a torn
    last line left by a kill is dropped first, so the new row never continues it. Reads only the header and the
    last byte unless it has to rewrite."""
    path = Path(path)
    header = _header(path)
    if header and (not set(row) <= set(header) or _torn(path)):
        _, rows = read_metrics(path)
        header = header + [key for key in row if key not in header]
        write_csv_atomic(path, header, rows)
    elif not header and path.exists():
        path.unlink()  # empty, or not even a complete header
    with path.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=header or list(row), restval="", lineterminator="\n")
        if not header:
            writer.writeheader()
        writer.writerow(row)
        handle.flush()
        os.fsync(handle.fileno())


def _header(path: Path) -> list[str]:
    """The header of a CSV if its first line is complete, else []."""
    if not path.exists():
        return []
    with path.open(newline="") as handle:
        first = handle.readline()
    return next(csv.reader([first.rstrip("\r\n")])) if first.endswith("\n") else []


def _torn(path: Path) -> bool:
    """Whether a non-empty file's last line lacks its newline."""
    with path.open("rb") as handle:
        handle.seek(0, os.SEEK_END)
        if handle.tell() == 0:
            return False
        handle.seek(-1, os.SEEK_END)
        return handle.read(1) != b"\n"


def _as_step(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------------- resume
#: TrainConfig fields a resume may change: `steps` (a resumed run may be asked to train longer), and the settings
#: that do not change results (craft_bench.leaderboard.identity.NEUTRAL_SETTINGS, which leaves them out of the run
#: id): `num_workers` (every random draw comes from (seed, step, task, sibling), not from the worker that plays it),
#: `checkpoint_every` (a resumed run equals an uninterrupted one), `micro_batch_rows` and `device` (float rounding
#: only: a run resumed on another device or micro-batch size is no longer bit-identical to an uninterrupted one).
RESUME_MAY_CHANGE = frozenset(
    {"steps", "num_workers", "env_workers", "ray_address", "checkpoint_every", "micro_batch_rows", "device",
     "torch_threads", "rollout_threads"}
)


def config_differences(
    saved: Mapping[str, Any], current: Mapping[str, Any], defaults: Mapping[str, Any] | None = None
) -> list[str]:
    """Fields (outside RESUME_MAY_CHANGE) whose values differ between a checkpoint's config and this run's, sorted;
    [] = resumable. A field the checkpoint lacks (it predates the field) takes its value from `defaults`, if given."""
    theirs = {**(defaults or {}), **saved}
    names = (set(current) | set(theirs)) - RESUME_MAY_CHANGE
    return sorted(k for k in names if current.get(k, _MISSING) != theirs.get(k, _MISSING))


_MISSING = object()


# ---------------------------------------------------------------------------------------------------- validation
class ConfigError(ValueError):
    """Settings that a run cannot start with; the message names every bad field and what it accepts."""


@dataclass(frozen=True)
class Range:
    """Allowed interval of a numeric field; `None` ends are open-ended."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def contains(self, value: float) -> bool:
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        if self.high is not None and (value >= self.high if self.high_open else value > self.high):
            return False
        return True

    def __str__(self) -> str:
        if self.low is not None and self.high is not None:
            return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        if self.low is not None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        return f"{'<' if self.high_open else '<='} {self.high:g}"


#: The range of every numeric TrainConfig field. A new numeric field must get an entry (tests/test_run_files.py
#: checks that every one has); fields listed here but absent from TrainConfig are ignored.
FIELD_RANGES: dict[str, Range] = {
    "seed": Range(0),
    "steps": Range(0),
    "tasks_per_step": Range(1),
    "group_size": Range(1),
    "max_turns": Range(1),
    "history_turns": Range(0),
    "temperature": Range(0),  # 0 = greedy
    "top_p": Range(0, 1, low_open=True),
    "max_new_tokens": Range(1),
    "lr": Range(0, low_open=True),
    "weight_decay": Range(0),
    "grad_clip": Range(0),  # 0 disables clipping
    "micro_batch_rows": Range(1),
    "mini_batch_rows": Range(1),
    "ppo_epochs": Range(1),
    "success_reward": Range(0, low_open=True),
    "invalid_penalty": Range(0),
    "progress_reward": Range(0),
    "ema_decay": Range(0, 1, high_open=True),
    "eval_episodes": Range(1),
    "eval_samples": Range(1),
    "eval_temperature": Range(0),  # 0 = greedy
    "num_workers": Range(0),  # 0 = environments in this process
    "checkpoint_every": Range(1),
    "rollout_waves": Range(1),
    "torch_threads": Range(1),
    "rollout_threads": Range(1),
}

#: Fields with a fixed set of values.
FIELD_CHOICES: dict[str, tuple[str, ...]] = {
    "on_nonfinite": ("stop", "skip"),
    "engine": ("hf", "vllm"),
    "env_workers": ("local", "ray", "inprocess"),
    "old_logprobs": ("rescore", "rollout", "auto"),
}


def validate_train_config(values: Mapping[str, Any], config_cls: type) -> None:
    """Check every field of `values` against the dataclass `config_cls` (TrainConfig): its declared type, and
    `FIELD_RANGES`/`FIELD_CHOICES`; raises ConfigError listing each problem by field name. Unknown fields are named
    with the closest valid ones. Ints must be integers (2.5 and true are refused), floats finite."""
    hints = typing.get_type_hints(config_cls)
    known = [f.name for f in dataclasses.fields(config_cls)]
    problems = []
    for name, value in values.items():
        if name not in hints or name not in known:
            close = difflib.get_close_matches(name, known, n=3)
            problems.append(f"unknown field {name!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
            continue
        problem = _type_problem(value, hints[name])
        if problem is None and name in FIELD_RANGES and isinstance(value, (int, float)) and not isinstance(value, bool):
            if not FIELD_RANGES[name].contains(value):
                problem = f"must be {FIELD_RANGES[name]}"
        if problem is None and name in FIELD_CHOICES and value not in FIELD_CHOICES[name]:
            problem = f"must be one of {', '.join(FIELD_CHOICES[name])}"
        if problem:
            problems.append(f"{name}={value!r}: {problem}")
    if problems:
        raise ConfigError("invalid setting(s): " + "; ".join(problems))


def _type_problem(value: Any, hint: Any) -> str | None:
    """Why `value` does not fit the annotation `hint` (None if it does)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        others = [a for a in args if a is not type(None)]
        problems = [_type_problem(value, a) for a in others]
        return None if any(p is None for p in problems) else problems[0]
    if hint is bool:
        return None if isinstance(value, bool) else "must be true or false"
    if hint is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else "must be an integer"
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return "must be a number"
        return None if math.isfinite(value) else "must be a finite number"
    if hint is str:
        return None if isinstance(value, str) else "must be a string"
    if origin is dict or hint is dict:
        return None if isinstance(value, dict) else "must be a JSON object, e.g. {\"key\": 1}"
    if origin is list or hint is list:
        return None if isinstance(value, list) else "must be a JSON list"
    return None  # Any and other annotations: the dataclass checks them
