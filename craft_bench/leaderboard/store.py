"""The leaderboard directory on disk: where submissions and learning curves live, and `submit` of a run into it.
A submit validates everything before it writes anything; writes are atomic (temp file + rename), never through links."""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from filelock import FileLock

from craft_bench.leaderboard import schema
from craft_bench.leaderboard.schema import (
    KEY_COLUMNS,
    LEADERBOARD_SCHEMA,
    REFERENCE_SCHEMA,
    RUN_SOURCE,
    UNKNOWN,
    LeaderboardValidationError,
    Problem,
    cell_problem,
    config_id,
    read_table,
    validate_csv,
    validate_rows,
    write_table,
)

DEFAULT_ROOT = Path("leaderboard")
SUBMISSIONS = "submissions"
REFERENCE = "reference"
CURVES = "curves"
PLOTS = "plots"
#: Curve cells that mean "not logged at this step": empty (a metric that first appears mid-run) and Python's `nan`
#: (a statistic not defined yet, e.g. a controller's EMA before its first update).
CURVE_MISSING = ("", "nan")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


class UnsafePathError(ValueError):
    """A leaderboard file or folder is a symbolic link: reading or writing through it could reach any file."""


def slug(text: str) -> str:
    """A file-name-safe form of an id such as 'craft/ALFWorld-v0' or 'Qwen/Qwen2.5-3B-Instruct'."""
    return _UNSAFE.sub("-", text).strip("-.")[:80] or "x"


def entry_name(row: Mapping[str, Any]) -> str:
    """The stable name of one leaderboard entry (env x method x model x configuration, and the initial weights'
    hash when known); seeds and splits share it. Rows of unknown weights (schema 1) keep their schema-1 names."""
    parts = [slug(row["env_id"]), slug(row["method"]), slug(row["model"]), config_id(row["method_config"])]
    if row.get("policy_sha256", UNKNOWN) != UNKNOWN:
        parts.append("p" + row["policy_sha256"][:8])
    return "__".join(parts)


def submission_path(root: Path, row: Mapping[str, Any]) -> Path:
    return root / SUBMISSIONS / f"{entry_name(row)}.csv"


def curve_path(root: Path, row: Mapping[str, Any]) -> Path:
    return root / CURVES / f"{entry_name(row)}__seed{int(row['seed'])}.csv"


def check_not_linked(root: Path, path: Path) -> None:
    """Refuse when `root`, or any folder or file from `root` down to `path`, is a symbolic link.

    A cloned repository can hold links (git stores them), so `leaderboard/LEADERBOARD.md -> ~/.bashrc` would make
    `build` overwrite a file outside the leaderboard. Existing real files are fine; missing ones are created later.
    """
    relative = path.relative_to(root)
    for depth in range(len(relative.parts) + 1):
        current = root.joinpath(*relative.parts[:depth])
        if current.is_symlink():
            raise UnsafePathError(f"{current} is a symbolic link: the leaderboard reads and writes only real files and "
                                  f"folders inside {root}; replace the link with the file or folder itself")


def atomic_write_bytes(root: Path, path: Path, data: bytes) -> None:
    """Write `data` to `path` under `root` through a temp file and a rename, refusing symbolic links on the way."""
    check_not_linked(root, path)
    path.parent.mkdir(parents=True, exist_ok=True)
    check_not_linked(root, path)  # the folders exist now: check them as they are
    handle, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _rows_text(rows: list[dict[str, Any]]) -> bytes:
    handle, tmp = tempfile.mkstemp(suffix=".csv")
    os.close(handle)
    try:
        write_table(tmp, rows, LEADERBOARD_SCHEMA)
        return Path(tmp).read_bytes()
    finally:
        os.unlink(tmp)


def _listed(root: Path, folder: str) -> list[Path]:
    """The CSV files of root/folder, after refusing a linked root, folder or file."""
    check_not_linked(root, root / folder)
    paths = sorted((root / folder).glob("*.csv"))
    for path in paths:
        check_not_linked(root, path)
    return paths


def _submission_files(root: Path) -> dict[Path, list[dict[str, Any]]]:
    return {p: validate_csv(p).to_dict("records") for p in _listed(root, SUBMISSIONS)}


def _check_across_files(files: dict[Path, list[dict[str, Any]]], root: Path) -> list[dict[str, Any]]:
    """All rows of all submission files, after checking that each file holds measured rows only and that no key
    appears twice anywhere (the error names both files and rows)."""
    first_seen: dict[tuple[str, ...], tuple[Path, int]] = {}
    problems = []
    for path, file_rows in files.items():
        _require_run_source(file_rows, str(path))
        for number, row in enumerate(file_rows, start=1):
            key = LEADERBOARD_SCHEMA.key_of(row)
            if key in first_seen:
                other, other_number = first_seen[key]
                problems.append(Problem(number, "/".join(KEY_COLUMNS), f"in {path}: duplicate key "
                                        f"{dict(zip(KEY_COLUMNS, key))}, first seen in {other} row {other_number}"))
            else:
                first_seen[key] = (path, number)
    if problems:
        raise LeaderboardValidationError(problems, f"{root / SUBMISSIONS} (all files together)")
    return [row for file_rows in files.values() for row in file_rows]


def load_submissions(root: Path) -> pd.DataFrame:
    """Every measured row under root/submissions, validated file by file and then across files (keys unique,
    source 'run' only), in the current schema's form; an empty frame with the leaderboard columns when there are none."""
    rows = _check_across_files(_submission_files(root), root)
    return pd.DataFrame(rows, columns=list(LEADERBOARD_SCHEMA.columns), dtype=str)


def load_reference(root: Path) -> pd.DataFrame:
    """Every published row under root/reference, validated against the reference schema."""
    frames = [validate_csv(p, REFERENCE_SCHEMA) for p in _listed(root, REFERENCE)]
    if not frames:
        return pd.DataFrame(columns=list(REFERENCE_SCHEMA.columns), dtype=str)
    frame = pd.concat(frames, ignore_index=True)
    validate_rows(frame, REFERENCE_SCHEMA, origin=f"{root / REFERENCE} (all files together)")
    return frame


def _curve_cell_problem(value: str) -> str | None:
    if value in CURVE_MISSING:
        return None
    if error := cell_problem(value):
        return error
    if value.lower().lstrip("+-") in ("inf", "infinity"):
        return f"expected a finite number, got {value!r}"
    return schema._number(value)[1]


def validate_curve(frame: pd.DataFrame, origin: str) -> None:
    """A learning curve (a run's metrics.csv, or a stored curve) under the rules of rows: header names and cells
    neither formulas nor control characters nor over the cell limit; `step` (and `seed`, if present) canonical
    integers, each (seed, step) once; every other cell a finite number, or empty / `nan` for "not logged"."""
    header = [str(c) for c in frame.columns]
    problems = [Problem(0, name[:80], error) for name in header if (error := cell_problem(name))]
    problems += [Problem(0, name, "column appears more than once") for name in sorted({c for c in header
                                                                                      if header.count(c) > 1})]
    if "step" not in header:
        problems.append(Problem(0, "step", "missing column: a learning curve needs each row's training step"))
    if problems:
        raise LeaderboardValidationError(problems, origin)
    integers = {"step", "seed"}
    seen: dict[tuple[str, str], int] = {}
    for number, values in enumerate(frame.itertuples(index=False, name=None), start=1):
        for name, value in zip(header, values):
            if name in integers:
                error = cell_problem(value) or schema._count(0)(value)
            else:
                error = _curve_cell_problem(value)
            if error:
                problems.append(Problem(number, name, error))
        row = dict(zip(header, values))
        at = (row.get("seed", ""), row["step"])
        if at in seen:
            of_seed = f" of seed {at[0]}" if "seed" in row else ""
            problems.append(Problem(number, "step", f"step {row['step']}{of_seed} again (first in row {seen[at]})"))
        seen.setdefault(at, number)
        if len(problems) >= 50:  # enough to act on; a broken file would otherwise list every cell
            break
    if problems:
        raise LeaderboardValidationError(problems, origin)


def read_curve(path: Path) -> pd.DataFrame:
    """A metrics.csv or stored curve, size-limited (MAX_CURVE_BYTES) and validated by `validate_curve`."""
    frame = read_table(path, max_bytes=schema.MAX_CURVE_BYTES)
    validate_curve(frame, str(path))
    return frame


def _require_run_source(rows: list[dict[str, Any]], origin: str) -> None:
    problems = [Problem(i, "source", f"submissions hold measured rows only (source '{RUN_SOURCE}'); published "
                                     f"numbers belong in leaderboard/{REFERENCE}/")
                for i, row in enumerate(rows, start=1) if row["source"] != RUN_SOURCE]
    if problems:
        raise LeaderboardValidationError(problems, origin)


class DuplicateSubmissionError(ValueError):
    """A submitted row has the key of a row already on the leaderboard, and --replace was not given."""


@dataclass
class SubmitReport:
    """What one `submit` changed."""

    added: int = 0
    replaced: int = 0
    files: list[Path] = field(default_factory=list)
    curves: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


#: Lock file (git-ignored) that serialises concurrent `submit` calls on one leaderboard directory.
SUBMIT_LOCK = ".submit.lock"


def submit(run_dir: str | Path, root: str | Path = DEFAULT_ROOT, replace: bool = False) -> SubmitReport:
    """Validate run_dir/result.csv and merge its rows into root/submissions/<entry>.csv; copy run_dir/metrics.csv
    per seed to root/curves/ for the learning-curve plots.

    Everything is checked before anything is written (rows, metrics, existing files, links), so a refused submit
    leaves the leaderboard as it was and can simply be retried. Rows whose key is already on the leaderboard are
    refused unless `replace`; then they, and only they, are replaced. Curves are written before rows, so a row on
    the leaderboard always has its curve. Concurrent submits are serialised by a lock file.
    """
    run_dir, root = Path(run_dir), Path(root)
    check_not_linked(root, root / SUBMIT_LOCK)
    root.mkdir(parents=True, exist_ok=True)
    check_not_linked(root, root / SUBMIT_LOCK)
    with FileLock(str(root / SUBMIT_LOCK)):
        return _submit_locked(run_dir, root, replace)


def _submit_locked(run_dir: Path, root: Path, replace: bool) -> SubmitReport:
    # 1. Validate everything; write nothing.
    result = run_dir / "result.csv"
    if not result.is_file():
        raise FileNotFoundError(f"{result} not found: `submit` takes a run directory written by craft_bench.run")
    rows = validate_csv(result).to_dict("records")
    _require_run_source(rows, str(result))
    files = _submission_files(root)
    existing_keys = {LEADERBOARD_SCHEMA.key_of(r) for r in _check_across_files(files, root)}
    clashes = [(i, r) for i, r in enumerate(rows, start=1) if LEADERBOARD_SCHEMA.key_of(r) in existing_keys]
    if clashes and not replace:
        listed = "\n".join(f"  row {i}: {dict(zip(KEY_COLUMNS, LEADERBOARD_SCHEMA.key_of(r)))}" for i, r in clashes)
        raise DuplicateSubmissionError(f"{result}: {len(clashes)} row(s) already on the leaderboard (pass --replace "
                                       f"to overwrite them):\n{listed}")
    report = SubmitReport(added=len(rows) - len(clashes), replaced=len(clashes))

    new_keys = {LEADERBOARD_SCHEMA.key_of(r) for r in rows}
    updated = {path: [r for r in file_rows if LEADERBOARD_SCHEMA.key_of(r) not in new_keys]
               for path, file_rows in files.items()}
    touched = {path for path in files if len(updated[path]) != len(files[path])}
    for row in rows:
        path = submission_path(root, row)
        updated.setdefault(path, []).append(row)
        touched.add(path)
    for path in sorted(touched):
        validate_rows(updated[path], origin=str(path))
        check_not_linked(root, path)
    curves = _prepare_curves(run_dir, root, rows, replace, report)
    for path in curves:
        check_not_linked(root, path)

    # 2. Write: curves first, then the rows that refer to them.
    for path, data in sorted(curves.items()):
        atomic_write_bytes(root, path, data)
        report.curves.append(path)
    for path in sorted(touched):
        if updated[path]:
            atomic_write_bytes(root, path, _rows_text(updated[path]))
            report.files.append(path)
        else:
            path.unlink()
    return report


def _prepare_curves(run_dir: Path, root: Path, rows: list[dict[str, Any]], replace: bool,
                    report: SubmitReport) -> dict[Path, bytes]:
    """The run's per-step metrics as one validated curve file per seed (path -> bytes), without writing them; a
    run without metrics.csv (no training) has no curve."""
    metrics_path = run_dir / "metrics.csv"
    if not metrics_path.is_file():
        report.notes.append(f"{metrics_path} not found: no learning curve stored")
        return {}
    metrics = read_table(metrics_path, max_bytes=schema.MAX_CURVE_BYTES)
    entries = {curve_path(root, r): int(r["seed"]) for r in rows}
    seeds = sorted(set(entries.values()))
    if "seed" not in metrics.columns and len(seeds) > 1:
        raise ValueError(f"{metrics_path} has no 'seed' column but {run_dir / 'result.csv'} holds seeds {seeds}: "
                         "cannot tell their curves apart")
    validate_curve(metrics, str(metrics_path))
    curves = {}
    for path, seed in sorted(entries.items()):
        curve = metrics[metrics["seed"].astype(int) == seed] if "seed" in metrics.columns else metrics
        data = curve.to_csv(index=False, lineterminator="\n").encode("utf-8")
        if len(data) > schema.MAX_CURVE_BYTES:
            raise ValueError(f"{metrics_path}: the curve of seed {seed} holds {len(data)} bytes, over the limit of "
                             f"{schema.MAX_CURVE_BYTES}")
        check_not_linked(root, path)
        if path.exists() and not replace and path.read_bytes() != data:
            report.notes.append(f"{path} exists with a different curve: kept it (pass --replace to overwrite)")
            continue
        curves[path] = data
    return curves
