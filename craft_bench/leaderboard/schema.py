"""The leaderboard's row schemas (measured rows and published reference rows) and their validation.
Every problem is reported with the row and column it sits in; CSV files are read and written as exact text."""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import io
import json
import math
import numbers
import re
import subprocess
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from craft_bench import SUITE_VERSION

#: Version of the measured-row schema. 2 added schema_version, policy_sha256 and task_score; 3 added per_dataset.
#: Files written under schema 1 (no schema_version column) are read as schema-1 rows with policy_sha256 'unknown',
#: task_score 'NA' and per_dataset 'NA'; files written under schema 2 as schema-2 rows with per_dataset 'NA'.
SCHEMA_VERSION = "3"
SCHEMA_VERSIONS: tuple[str, ...] = ("1", "2", "3")
LEADERBOARD_COLUMNS_V1: tuple[str, ...] = (
    "suite_version", "env_id", "env_version", "data_source", "data_sha256", "split", "method", "method_config",
    "teacher_context", "model", "model_params", "seed", "train_steps", "n_eval_episodes", "success_rate",
    "success_se", "progress_mean", "return_mean", "steps_mean", "invalid_action_rate", "per_task_type",
    "wall_clock_s", "env_steps_per_s", "git_commit", "date", "source",
)
LEADERBOARD_COLUMNS_V2: tuple[str, ...] = (
    "schema_version", "suite_version", "env_id", "env_version", "data_source", "data_sha256", "split", "method",
    "method_config", "teacher_context", "model", "model_params", "policy_sha256", "seed", "train_steps",
    "n_eval_episodes", "success_rate", "success_se", "task_score", "progress_mean", "return_mean", "steps_mean",
    "invalid_action_rate", "per_task_type", "wall_clock_s", "env_steps_per_s", "git_commit", "date", "source",
)
LEADERBOARD_COLUMNS: tuple[str, ...] = (
    *LEADERBOARD_COLUMNS_V2[: LEADERBOARD_COLUMNS_V2.index("per_task_type") + 1], "per_dataset",
    *LEADERBOARD_COLUMNS_V2[LEADERBOARD_COLUMNS_V2.index("per_task_type") + 1:],
)
# method_config is part of the key: two configurations of one method are two entries, not two seeds of one.
# policy_sha256 is too: the same configuration started from other initial weights is another experiment.
# teacher_context is not: it is a property of the method's configuration, so it cannot differ under one key.
KEY_COLUMNS: tuple[str, ...] = ("env_id", "split", "method", "method_config", "model", "policy_sha256", "seed",
                                "source")

REFERENCE_COLUMNS: tuple[str, ...] = ("source", "table", "model", "method", "benchmark", "metric", "value", "unit")
REFERENCE_KEY_COLUMNS: tuple[str, ...] = ("source", "table", "model", "method", "benchmark", "metric")
REFERENCE_UNITS: tuple[str, ...] = ("percent", "score")

EVAL_TEMPERATURE = "eval_temperature"
RUN_SOURCE = "run"
#: The method name of the untrained model's row (SDAR's "Vanilla"): train_steps must be 0.
BASE_METHOD = "base"
#: How a row says "this environment has no such number" (task_score outside WebShop); an empty cell stays an error.
NOT_APPLICABLE = "NA"
#: policy_sha256 of rows that do not know their initial weights (all schema-1 rows).
UNKNOWN = "unknown"
PAPER_SOURCE = re.compile(r"paper:[0-9]{4}\.[0-9]{4,5}(v[0-9]+)?")

#: Size limits on untrusted files. A cell holds at most MAX_CELL_CHARS characters (the longest real cell, a full
#: method_config with its trainer settings, is about 1,000); a result, submission or reference file at most
#: MAX_TABLE_BYTES; a metrics.csv or stored curve at most MAX_CURVE_BYTES (about 100,000 steps of 40 metrics).
MAX_CELL_CHARS = 8_192
MAX_TABLE_BYTES = 8 * 2**20
MAX_CURVE_BYTES = 32 * 2**20

# Characters that make a spreadsheet treat a cell as a formula (OWASP "CSV injection").
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")
# ASCII digits only: Python's \d also matches other scripts' digits, which int() accepts as the same number.
_DECIMAL = re.compile(r"[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+)?")
_INTEGER = re.compile(r"[+-]?[0-9]+")
# One spelling per integer, so "7", "07", "+7" and "007" cannot be four keys.
_CANONICAL_COUNT = re.compile(r"0|[1-9][0-9]*")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_GIT_COMMIT = re.compile(r"[0-9a-f]{7,40}|unknown")
_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
# C0 and C1 control characters and the Unicode line/paragraph separators: a cell is one line of printable text.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


class LeaderboardValidationError(ValueError):
    """Rows that break the schema; `problems` lists every (row, column, message) found, not just the first."""

    def __init__(self, problems: Sequence["Problem"], origin: str = "rows", hint: str = ""):
        self.problems = list(problems)
        lines = "\n".join(f"  {p}" for p in self.problems)
        super().__init__(f"{origin}: {len(self.problems)} problem(s)\n{lines}" + (f"\n{hint}" if hint else ""))


@dataclass(frozen=True)
class Problem:
    """One schema violation. `row` is 1-based over data rows (0 means the header, None the file as a whole);
    `column` is empty when the problem is not in one column (a malformed line)."""

    row: int | None
    column: str
    message: str

    def __str__(self) -> str:
        where = "file" if self.row is None else "header" if self.row == 0 else f"row {self.row}"
        return f"{where}, column '{self.column}': {self.message}" if self.column else f"{where}: {self.message}"


# A cell checker returns an error message, or None when the cell is fine.
Checker = Callable[[Any], "str | None"]


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"


def _text(pattern: re.Pattern[str] | None = None, hint: str = "") -> Checker:
    def check(value: Any) -> str | None:
        if not isinstance(value, str):
            return f"expected text, got {_describe(value)}"
        if value != value.strip():
            return f"has leading or trailing whitespace: {value!r}"
        if pattern is not None and not pattern.fullmatch(value):
            return f"expected {hint}, got {value!r}"
        return None

    return check


def _number(value: Any) -> tuple[float | None, str | None]:
    """The value as a finite float, or an error: text must be a plain decimal, Python values a real number."""
    if isinstance(value, bool):
        return None, f"expected a number, got {_describe(value)}"
    if isinstance(value, str):
        if not _DECIMAL.fullmatch(value):
            return None, f"expected a number, got {value!r}"
        number = float(value)
    elif isinstance(value, numbers.Real):
        number = float(value)
    else:
        return None, f"expected a number, got {_describe(value)}"
    if not math.isfinite(number):
        return None, f"expected a finite number, got {value!r}"
    return number, None


def _real(low: float = -math.inf, high: float = math.inf, not_applicable: bool = False) -> Checker:
    def check(value: Any) -> str | None:
        if not_applicable and value == NOT_APPLICABLE:
            return None
        number, error = _number(value)
        if error:
            return error + (f" or '{NOT_APPLICABLE}' (not applicable)" if not_applicable else "")
        if not low <= number <= high:
            return f"{value!r} is outside [{low:g}, {high:g}]"
        return None

    return check


def _count(low: int = 0) -> Checker:
    def check(value: Any) -> str | None:
        if isinstance(value, bool) or not isinstance(value, (str, numbers.Integral)):
            return f"expected an integer, got {_describe(value)}"
        if isinstance(value, str) and not _CANONICAL_COUNT.fullmatch(value):
            return ("expected an integer in canonical form (ASCII digits 0-9, no sign, no leading zeros, no spaces), "
                    f"got {value!r}")
        if int(value) < low:
            return f"expected an integer >= {low}, got {value!r}"
        return None

    return check


def _iso_date(value: Any) -> str | None:
    if error := _text(_DATE, "an ISO date YYYY-MM-DD")(value):
        return error
    try:
        dt.date.fromisoformat(value)
    except ValueError:
        return f"expected a real calendar date YYYY-MM-DD, got {value!r}"
    return None


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number (write a finite number)")


def _finite_float(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        raise ValueError(f"{text} overflows to an infinite number")
    return number


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            raise ValueError(f"duplicate key {key!r}")
        seen.add(key)
    return dict(pairs)


def strict_json(text: str) -> Any:
    """Parse JSON as RFC 8259 defines it: no NaN or Infinity, no number overflowing to infinity, no key given twice
    in one object (Python's json module accepts all three). Raises ValueError saying which."""
    try:
        return json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float,
                          object_pairs_hook=_no_duplicate_keys)
    except json.JSONDecodeError as err:
        raise ValueError(f"is not valid JSON ({err.msg} at position {err.pos})") from None
    except RecursionError:
        raise ValueError("is nested too deeply") from None
    except ValueError as err:
        raise ValueError(f"is not strict JSON: {err}") from None


def _json_object(value: Any) -> tuple[dict[str, Any] | None, str | None]:
    if not isinstance(value, str):
        return None, f"expected a JSON object as text, got {_describe(value)}"
    try:
        parsed = strict_json(value)
    except ValueError as err:
        return None, f"{err}: {value[:200]!r}"
    if not isinstance(parsed, dict):
        return None, f"expected a JSON object, got {type(parsed).__name__}: {value[:200]!r}"
    return parsed, None


def _method_config(value: Any) -> str | None:
    """A JSON object that states the evaluation temperature, as the protocol requires of every entry; trainer
    settings, when recorded (schema 2, see identity.run_config), sit in a "train" object."""
    parsed, error = _json_object(value)
    if error:
        return error
    temperature = parsed.get(EVAL_TEMPERATURE)
    if temperature is None:
        return f"must state the evaluation temperature as \"{EVAL_TEMPERATURE}\" (0 = greedy): {value[:200]!r}"
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 <= temperature < math.inf:
        return f"\"{EVAL_TEMPERATURE}\" must be a number >= 0, got {temperature!r}"
    if "train" in parsed and not isinstance(parsed["train"], dict):
        return f"\"train\" must be a JSON object of trainer settings, got {parsed['train']!r}"
    return None


def _rate(value: Any) -> bool:
    return (not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
            and 0 <= value <= 1)


def _per_task_type(value: Any) -> str | None:
    """A JSON object: task type (non-empty text) -> success rate in [0, 1], or -> {"success_rate" or "success": rate
    in [0, 1], "n": episodes (integer >= 0)}."""
    parsed, error = _json_object(value)
    if error:
        return error
    for task_type, result in parsed.items():
        if not task_type or task_type != task_type.strip() or _CONTROL.search(task_type):
            return f"task type {task_type!r} must be non-empty text without control characters or outer spaces"
        if isinstance(result, dict):
            unknown = sorted(set(result) - {"success_rate", "success", "n"})
            if unknown:
                return f"task type {task_type!r}: unknown field(s) {unknown}; allowed: success_rate, success, n"
            bad = [k for k in ("success_rate", "success") if k in result and not _rate(result[k])]
            if bad or not ({"success_rate", "success"} & set(result)):
                return f"task type {task_type!r}: needs a success rate in [0, 1], got {result!r}"
            n = result.get("n", 0)
            if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                return f"task type {task_type!r}: \"n\" must be an integer >= 0, got {n!r}"
        elif not _rate(result):
            return f"task type {task_type!r}: success rate must be a number in [0, 1], got {result!r}"
    return None


def _per_dataset(value: Any) -> str | None:
    """'NA' (the environment's episodes name no dataset), or a non-empty JSON object: dataset (non-empty text) ->
    {"success_rate": rate in [0, 1], "n": episodes (integer >= 1)}, as `per_dataset_success` writes it."""
    if value == NOT_APPLICABLE:
        return None
    parsed, error = _json_object(value)
    if error:
        return error + f" or '{NOT_APPLICABLE}' (not applicable)"
    if not parsed:
        return f"an empty object: write '{NOT_APPLICABLE}' when the episodes name no dataset"
    for dataset, result in parsed.items():
        if not dataset or dataset != dataset.strip() or _CONTROL.search(dataset):
            return f"dataset {dataset!r} must be non-empty text without control characters or outer spaces"
        if not isinstance(result, dict) or set(result) != {"success_rate", "n"}:
            return f"dataset {dataset!r}: expected {{\"success_rate\": rate, \"n\": episodes}}, got {result!r}"
        n = result["n"]
        if not _rate(result["success_rate"]) or isinstance(n, bool) or not isinstance(n, int) or n < 1:
            return f"dataset {dataset!r}: needs a success rate in [0, 1] and n >= 1, got {result!r}"
    return None


def per_dataset_success(records: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """A row's `per_dataset`: for each dataset named by the records' `dataset` key (Search-QA's nq, hotpotqa, ...),
    in sorted order, {"success_rate": wins / n, "n": n}. Every record needs `dataset` (non-empty text) and `won`."""
    wins: dict[str, float] = {}
    counts: dict[str, int] = {}
    for number, record in enumerate(records, start=1):
        dataset = record.get("dataset")
        if not isinstance(dataset, str) or not dataset or "won" not in record:
            raise ValueError(f"record {number}: needs 'dataset' (non-empty text) and 'won', got {dict(record)!r:.200}")
        wins[dataset] = wins.get(dataset, 0.0) + float(bool(record["won"]))
        counts[dataset] = counts.get(dataset, 0) + 1
    if not counts:
        raise ValueError("per_dataset_success needs at least one record")
    return {d: {"success_rate": wins[d] / counts[d], "n": counts[d]} for d in sorted(counts)}


def macro_average(per_dataset: Mapping[str, Mapping[str, Any]]) -> float:
    """The mean of the per-dataset success rates, each dataset weighing the same whatever its size (the average
    Search-R1 and SDAR report over their QA datasets)."""
    if not per_dataset:
        raise ValueError("macro_average needs at least one dataset")
    return math.fsum(float(v["success_rate"]) for v in per_dataset.values()) / len(per_dataset)


def _source(allow_run: bool, allow_paper: bool) -> Checker:
    def check(value: Any) -> str | None:
        if not isinstance(value, str):
            return f"expected text, got {_describe(value)}"
        if allow_run and value == RUN_SOURCE:
            return None
        if allow_paper and PAPER_SOURCE.fullmatch(value):
            return None
        allowed = " or ".join([f"'{RUN_SOURCE}'"] * allow_run + ["'paper:<arXiv id>'"] * allow_paper)
        return f"expected {allowed}, got {value!r}"

    return check


def _one_of(options: Sequence[str], what: str = "") -> Checker:
    def check(value: Any) -> str | None:
        if value not in options:
            return f"expected one of {', '.join(options)}{what}, got {value!r}"
        return None

    return check


def _base_rows_are_untrained(row: Mapping[str, Any]) -> tuple[str, str] | None:
    if row["method"] == BASE_METHOD and str(row["train_steps"]) != "0":
        return "train_steps", f"a '{BASE_METHOD}' row is the untrained model: train_steps must be 0"
    return None


# A row checker sees a row whose cells all passed, and returns (column, message) or None.
RowChecker = Callable[[Mapping[str, Any]], "tuple[str, str] | None"]


@dataclass(frozen=True)
class TableSchema:
    """A CSV table: its ordered columns, one checker per column, checks across the columns of a row, the columns
    that must be unique together, and the columns holding JSON (compared by value when looking for duplicate keys)."""

    name: str
    columns: tuple[str, ...]
    checkers: Mapping[str, Checker]
    key: tuple[str, ...]
    json_columns: tuple[str, ...] = field(default=())
    row_checkers: tuple[RowChecker, ...] = field(default=())

    def key_of(self, row: Mapping[str, Any]) -> tuple[str, ...]:
        return tuple(_json_key(row[c]) if c in self.json_columns else to_cell(row[c]) for c in self.key)

    def sort_key(self, row: Mapping[str, Any]) -> tuple[tuple[int, int, str], ...]:
        """The key with integer cells compared as numbers, so seed 10 sorts after seed 2."""
        return tuple((0, int(k), "") if _INTEGER.fullmatch(k) else (1, 0, k) for k in self.key_of(row))


LEADERBOARD_SCHEMA = TableSchema(
    name="leaderboard row",
    columns=LEADERBOARD_COLUMNS,
    checkers={
        "schema_version": _one_of(SCHEMA_VERSIONS, f" (this craft-bench reads schemas {', '.join(SCHEMA_VERSIONS)})"),
        "suite_version": _text(),
        "env_id": _text(),
        "env_version": _text(),
        "data_source": _text(),
        "data_sha256": _text(_SHA256, "64 lowercase hex digits"),
        "split": _text(),
        "method": _text(),
        "method_config": _method_config,
        "teacher_context": _text(),
        "model": _text(),
        "model_params": _count(0),
        "policy_sha256": _text(re.compile(f"{_SHA256.pattern}|{UNKNOWN}"), f"64 lowercase hex digits or '{UNKNOWN}'"),
        "seed": _count(0),
        "train_steps": _count(0),
        "n_eval_episodes": _count(1),
        "success_rate": _real(0.0, 1.0),
        "success_se": _real(0.0, 1.0),
        "task_score": _real(0.0, 1.0, not_applicable=True),
        "progress_mean": _real(0.0, 1.0),
        "return_mean": _real(),
        "steps_mean": _real(0.0),
        "invalid_action_rate": _real(0.0, 1.0),
        "per_task_type": _per_task_type,
        "per_dataset": _per_dataset,
        "wall_clock_s": _real(0.0),
        "env_steps_per_s": _real(0.0),
        "git_commit": _text(_GIT_COMMIT, "a lowercase hex git commit (7 to 40 digits) or 'unknown'"),
        "date": _iso_date,
        "source": _source(allow_run=True, allow_paper=True),
    },
    key=KEY_COLUMNS,
    json_columns=("method_config", "per_task_type", "per_dataset"),
    row_checkers=(_base_rows_are_untrained,),
)

REFERENCE_SCHEMA = TableSchema(
    name="reference row",
    columns=REFERENCE_COLUMNS,
    checkers={
        "source": _source(allow_run=False, allow_paper=True),
        "table": _text(),
        "model": _text(),
        "method": _text(),
        "benchmark": _text(),
        "metric": _text(),
        "value": _real(0.0, 100.0),
        "unit": _one_of(REFERENCE_UNITS),
    },
    key=REFERENCE_KEY_COLUMNS,
)


def _is_missing(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and not value.strip()


def _is_formula(value: Any) -> bool:
    """Text a spreadsheet would run as a formula; a plain signed number such as -0.5 is data, not a formula."""
    return isinstance(value, str) and value.startswith(FORMULA_PREFIXES) and not _DECIMAL.fullmatch(value)


def cell_problem(value: Any) -> str | None:
    """What every cell of every table (rows and curves alike) must satisfy, before its column's own check: present,
    at most MAX_CELL_CHARS characters, one line without control characters, and not a spreadsheet formula."""
    if _is_missing(value):
        return "missing value"
    if isinstance(value, str):
        if len(value) > MAX_CELL_CHARS:
            return f"holds {len(value)} characters, over the limit of {MAX_CELL_CHARS} per cell"
        if control := _CONTROL.search(value):
            return (f"holds a control character (U+{ord(control.group()):04X}); a cell is one line of printable "
                    f"text: {value[:80]!r}")
        if _is_formula(value):
            return f"looks like a spreadsheet formula: {value[:80]!r}"
    return None


def _as_records(rows: pd.DataFrame | Iterable[Mapping[str, Any]]) -> tuple[list[dict[str, Any]], list[str] | None]:
    """Rows as plain dicts (numpy scalars unwrapped), plus the shared header when the input was a table."""
    if isinstance(rows, pd.DataFrame):
        header = [str(c) for c in rows.columns]
        records = [{k: (v.item() if hasattr(v, "item") else v) for k, v in zip(header, values)}
                   for values in rows.itertuples(index=False, name=None)]
        return records, header
    records = []
    for index, row in enumerate(rows, start=1):
        if not isinstance(row, Mapping):
            raise TypeError(f"row {index}: expected a mapping of column to value, got {type(row).__name__}")
        records.append(dict(row))
    return records, None


def find_problems(rows: pd.DataFrame | Iterable[Mapping[str, Any]], schema: TableSchema = LEADERBOARD_SCHEMA,
                  ) -> list[Problem]:
    """Every schema violation in `rows`: unknown or missing columns, missing values, oversized cells, control
    characters, formula cells, wrong types, non-canonical integers, out-of-range numbers, malformed or non-strict
    JSON, impossible dates, rows inconsistent across columns, and rows repeating an earlier row's key."""
    records, header = _as_records(rows)
    problems: list[Problem] = []
    known = set(schema.columns)
    if header is not None:
        problems += [Problem(0, c[:80], "unknown column") for c in header if c not in known]
        problems += [Problem(0, c, "column appears more than once") for c in sorted({c for c in header
                                                                                   if header.count(c) > 1})]
        problems += [Problem(0, c, "missing column") for c in schema.columns if c not in header]
    first_row_of_key: dict[tuple[str, ...], int] = {}
    for number, row in enumerate(records, start=1):
        if header is None:
            problems += [Problem(number, str(c)[:80], "unknown column") for c in row if c not in known]
        row_ok = True
        for column in schema.columns:
            if column not in row:
                if header is None:
                    problems.append(Problem(number, column, "missing column"))
                row_ok = False
                continue
            value = row[column]
            if error := cell_problem(value) or schema.checkers[column](value):
                problems.append(Problem(number, column, error))
                row_ok = False
        if not row_ok:
            continue
        row_errors = [found for check in schema.row_checkers if (found := check(row))]
        problems += [Problem(number, column, message) for column, message in row_errors]
        if row_errors:
            continue
        key = schema.key_of(row)
        if key in first_row_of_key:
            first = first_row_of_key[key]
            problems.append(Problem(number, "/".join(schema.key),
                                    f"duplicate key {dict(zip(schema.key, key))}, first seen in row {first}"))
        else:
            first_row_of_key[key] = number
    return problems


def validate_rows(rows: pd.DataFrame | Iterable[Mapping[str, Any]], schema: TableSchema = LEADERBOARD_SCHEMA,
                  origin: str = "rows") -> None:
    """Raise `LeaderboardValidationError` naming each bad row and column; return None when all rows are valid."""
    problems = find_problems(rows, schema)
    if problems:
        columns_wrong = any(p.message in ("unknown column", "missing column") for p in problems)
        hint = f"a {schema.name} has exactly these columns: {', '.join(schema.columns)}" if columns_wrong else ""
        if columns_wrong and schema is LEADERBOARD_SCHEMA:
            hint += (f"\n(or, written by schema 2, exactly these: {', '.join(LEADERBOARD_COLUMNS_V2)})"
                     f"\n(or, written by schema 1, exactly these: {', '.join(LEADERBOARD_COLUMNS_V1)})")
        raise LeaderboardValidationError(problems, origin, hint)


def canonical_json(value: Any) -> str:
    """One text per JSON value (sorted keys, no spaces), so equal configurations compare and hash equal."""
    parsed = strict_json(value) if isinstance(value, str) else value
    return json.dumps(parsed, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _same_number(value: Any) -> Any:
    """Integral floats as ints, recursively: 0 and 0.0 are one setting when deciding whether two keys are equal."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _same_number(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_same_number(v) for v in value]
    return value


def _json_key(value: Any) -> str:
    parsed = strict_json(value) if isinstance(value, str) else value
    return canonical_json(_same_number(parsed))


def config_id(config: str | Mapping[str, Any]) -> str:
    """The one identity of a run's configuration: the first 8 hex digits of the SHA-256 of its canonical JSON.

    `config` is a row's `method_config` (JSON text or dict), which the harness builds with
    `craft_bench.leaderboard.identity.run_config` from every setting that changes results; the harness names the run
    directory with the same id, so a run directory and its leaderboard entry carry one id.
    """
    return hashlib.sha256(canonical_json(config).encode()).hexdigest()[:8]


def to_cell(value: Any) -> str:
    """The exact CSV text of one value: ints as integers, floats in shortest round-trip form, dicts as JSON."""
    if isinstance(value, (dict, list)):
        return canonical_json(value)
    if isinstance(value, bool):
        raise TypeError(f"a leaderboard cell cannot be a bool ({value!r}); write the number or text meant")
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        return repr(float(value))
    return str(value)


def _line_of(text: str, position: int) -> int:
    return text.count("\n", 0, position) + 1


def parse_table(text: str, origin: str = "text") -> pd.DataFrame:
    """CSV text as a frame of untouched text cells (the first line is the header; LF or CRLF line ends).

    One message per malformed line instead of a cascade of "missing value": a carriage return that does not end a
    line, a line with more or fewer fields than the header, broken quoting.
    """
    text = text.removeprefix("\ufeff").replace("\r\n", "\n")
    if (position := text.find("\r")) >= 0:
        line = _line_of(text, position)
        raise LeaderboardValidationError([Problem(max(line - 1, 0), "", (
            f"line {line} holds a carriage return (\\r) that does not end a line; cells cannot hold control "
            "characters, and lines end with LF or CRLF"))], origin)
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    records: list[tuple[int, list[str]]] = []
    try:
        for fields in reader:
            records.append((reader.line_num, fields))  # line_num: the line this record ends on
    except csv.Error as err:
        raise LeaderboardValidationError([Problem(None, "", f"is not valid CSV ({err})")], origin) from None
    records = [(line, fields) for line, fields in records if fields]
    if not records:
        raise LeaderboardValidationError([Problem(None, "", "is empty: expected a header line")], origin)
    (_, header), body = records[0], records[1:]
    ragged = [Problem(number, "", f"line {line} has {len(fields)} fields, the header has {len(header)}")
              for number, (line, fields) in enumerate(body, start=1) if len(fields) != len(header)]
    if ragged:
        raise LeaderboardValidationError(ragged, origin)
    return pd.DataFrame([fields for _, fields in body], columns=header, dtype=str)


def read_table(path: str | Path, max_bytes: int | None = None) -> pd.DataFrame:
    """A CSV file as untouched text cells (no type guessing; empty cells stay empty strings), for exact round trips.

    The file must be at most `max_bytes` (default MAX_TABLE_BYTES), UTF-8 (a BOM is allowed) and well-formed CSV;
    every error names the file.
    """
    path = Path(path)
    limit = MAX_TABLE_BYTES if max_bytes is None else max_bytes
    size = path.stat().st_size
    with path.open("rb") as handle:
        data = handle.read(limit + 1)
    if size > limit or len(data) > limit:
        raise LeaderboardValidationError([Problem(None, "", (
            f"holds {max(size, len(data))} bytes, over the limit of {limit} bytes for this file"))], str(path))
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise LeaderboardValidationError([Problem(None, "", (
            f"is not UTF-8 text: byte 0x{data[err.start]:02x} at offset {err.start} (line {line}) does not decode; "
            "save the file as UTF-8"))], str(path)) from None
    return parse_table(text, origin=str(path))


def upgrade_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows of an older file in the current form. Schema 1 (exactly its columns): schema_version '1',
    policy_sha256 'unknown' (schema 1 did not record the initial weights), task_score 'NA', per_dataset 'NA'.
    Schema 2 (exactly its columns): per_dataset 'NA'. Any other table is returned as is."""
    columns = sorted(frame.columns)
    if columns == sorted(LEADERBOARD_COLUMNS_V1):
        upgraded = frame.assign(schema_version="1", policy_sha256=UNKNOWN, task_score=NOT_APPLICABLE,
                                per_dataset=NOT_APPLICABLE)
    elif columns == sorted(LEADERBOARD_COLUMNS_V2):
        upgraded = frame.assign(per_dataset=NOT_APPLICABLE)
    else:
        return frame
    return upgraded[list(LEADERBOARD_COLUMNS)]


def write_table(path: str | Path, rows: Iterable[Mapping[str, Any]], schema: TableSchema) -> None:
    """Write rows as CSV text in schema column order, sorted by key, with LF line ends."""
    cells = [{c: to_cell(row[c]) for c in schema.columns} for row in rows]
    cells.sort(key=schema.sort_key)
    frame = pd.DataFrame(cells, columns=list(schema.columns), dtype=str)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path, index=False, lineterminator="\n")


def validate_csv(path: str | Path, schema: TableSchema = LEADERBOARD_SCHEMA) -> pd.DataFrame:
    """Read and validate one CSV file (schema-1 and schema-2 leaderboard files are read in the current form, see
    `upgrade_rows`); the error names the file, the row and the column."""
    frame = read_table(path)
    if schema is LEADERBOARD_SCHEMA:
        frame = upgrade_rows(frame)
    validate_rows(frame, schema, origin=str(path))
    return frame


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    commit = out.stdout.strip()
    return commit if _GIT_COMMIT.fullmatch(commit) else "unknown"


def make_result_row(**fields: Any) -> dict[str, Any]:
    """One validated leaderboard row, in column order, for a run craft-bench produced.

    Fills `schema_version` (this schema), `suite_version`, `git_commit` (of this checkout, 'unknown' outside git),
    `date` (today, UTC) and `source='run'` unless given; `task_score=None` (or absent) is written 'NA' (the
    environment has no task score), and so is `per_dataset=None` (no dataset per episode); an absent
    `policy_sha256` is written 'unknown' (give
    `identity.weights_sha256` of the initial weights: rows of unknown weights are compared only with each other);
    `method_config` and `per_task_type` may be dicts (stored as canonical JSON).
    """
    row = dict(fields)
    row.setdefault("schema_version", SCHEMA_VERSION)
    row.setdefault("suite_version", SUITE_VERSION)
    row.setdefault("git_commit", _git_commit())
    row.setdefault("date", dt.datetime.now(dt.timezone.utc).date().isoformat())
    row.setdefault("source", RUN_SOURCE)
    row.setdefault("policy_sha256", UNKNOWN)
    for column in ("task_score", "per_dataset"):
        if row.get(column) is None:
            row[column] = NOT_APPLICABLE
    for column in LEADERBOARD_SCHEMA.json_columns:
        if isinstance(row.get(column), (dict, list)):
            row[column] = canonical_json(row[column])
    validate_rows([row], origin="make_result_row")
    return {c: row[c] for c in LEADERBOARD_COLUMNS}


def write_result_csv(path: str | Path, rows: Iterable[Mapping[str, Any]]) -> None:
    """Validate `rows` and write them as a run's result.csv (column order, sorted by key)."""
    rows = list(rows)
    validate_rows(rows, origin=str(path))
    write_table(path, rows, LEADERBOARD_SCHEMA)
