"""Property-based tests of leaderboard validation (hypothesis): generated valid rows pass and round-trip through CSV
exactly; each kind of corruption, put in any row and any column it applies to, is rejected by a message naming that
row and column; curves follow the same rules; markdown escaping leaves nothing live. Derandomized: CI is repeatable."""

from __future__ import annotations

import datetime as dt
import json
import re

import pandas as pd
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from craft_bench.leaderboard import SCHEMA_VERSION, LeaderboardValidationError, validate_rows, write_result_csv
from craft_bench.leaderboard.build import md_text
from craft_bench.leaderboard.schema import (
    LEADERBOARD_COLUMNS,
    LEADERBOARD_SCHEMA,
    MAX_CELL_CHARS,
    parse_table,
    strict_json,
    validate_csv,
)
from craft_bench.leaderboard.store import validate_curve

#: Examples per test; the counts are part of the test's contract (reported in the README).
FEW, SOME, MANY = 40, 80, 200


def _settings(examples: int):
    # No shrink phase: shrinking these wide rows takes many minutes, and the failing example (with the row and
    # column the assertion names) is already enough to act on.
    return settings(max_examples=examples, derandomize=True, database=None, deadline=None,
                    phases=[Phase.explicit, Phase.generate],
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# --- strategies ----------------------------------------------------------------------------------------------------

# Printable text of any script, markdown and HTML punctuation included; no control characters or line separators.
_CHARS = st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp", "Co", "Cn"))
_FIRST = st.sampled_from("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789<[|*_`#!(&")
text_cells = st.builds(lambda first, rest: (first + rest).rstrip(), _FIRST, st.text(_CHARS, max_size=12))
hex_digits = lambda n: st.text("0123456789abcdef", min_size=n, max_size=n)  # noqa: E731
rates = st.floats(0.0, 1.0, allow_nan=False)
reals = st.floats(allow_nan=False, allow_infinity=False)
non_negative = st.floats(0.0, 1e9, allow_nan=False)
counts = st.integers(0, 10**12)
json_scalars = st.one_of(st.integers(-10**6, 10**6), st.floats(allow_nan=False, allow_infinity=False),
                         st.booleans(), text_cells)


@st.composite
def method_configs(draw) -> str:
    config = draw(st.dictionaries(text_cells.filter(lambda k: k not in ("eval_temperature", "train")), json_scalars,
                                  max_size=3))
    config["eval_temperature"] = draw(st.floats(0.0, 5.0, allow_nan=False))
    if draw(st.booleans()):
        config["train"] = draw(st.dictionaries(text_cells, json_scalars, max_size=3))
    return json.dumps(config, ensure_ascii=draw(st.booleans()))


@st.composite
def per_task_types(draw) -> str:
    value = st.one_of(rates, st.fixed_dictionaries({"success_rate": rates, "n": st.integers(0, 10**6)}))
    return json.dumps(draw(st.dictionaries(text_cells, value, max_size=3)))


@st.composite
def per_datasets(draw) -> str:
    value = st.fixed_dictionaries({"success_rate": rates, "n": st.integers(1, 10**6)})
    return draw(st.one_of(st.just("NA"), st.dictionaries(text_cells, value, min_size=1, max_size=3).map(json.dumps)))


@st.composite
def valid_rows(draw, seed: int) -> dict[str, str]:
    """One current-schema row as CSV text cells, valid by construction."""
    method = draw(st.one_of(st.sampled_from(["base", "grpo", "sdar", "craft"]), text_cells))
    cell = {
        "schema_version": SCHEMA_VERSION,
        "suite_version": draw(text_cells), "env_id": draw(text_cells), "env_version": draw(text_cells),
        "data_source": draw(text_cells), "data_sha256": draw(hex_digits(64)), "split": draw(text_cells),
        "method": method, "method_config": draw(method_configs()), "teacher_context": draw(text_cells),
        "model": draw(text_cells), "model_params": str(draw(counts)),
        "policy_sha256": draw(st.one_of(hex_digits(64), st.just("unknown"))), "seed": str(seed),
        "train_steps": "0" if method == "base" else str(draw(counts)),
        "n_eval_episodes": str(draw(st.integers(1, 10**6))), "success_rate": repr(draw(rates)),
        "success_se": repr(draw(rates)), "task_score": draw(st.one_of(st.just("NA"), rates.map(repr))),
        "progress_mean": repr(draw(rates)), "return_mean": repr(draw(reals)), "steps_mean": repr(draw(non_negative)),
        "invalid_action_rate": repr(draw(rates)), "per_task_type": draw(per_task_types()),
        "per_dataset": draw(per_datasets()), "wall_clock_s": repr(draw(non_negative)), "env_steps_per_s": repr(draw(non_negative)),
        "git_commit": draw(st.one_of(st.integers(7, 40).flatmap(hex_digits), st.just("unknown"))),
        "date": draw(st.dates(dt.date(1970, 1, 1), dt.date(2999, 12, 31))).isoformat(), "source": "run",
    }
    return {c: cell[c] for c in LEADERBOARD_COLUMNS}


@st.composite
def row_lists(draw, max_rows: int = 3) -> list[dict[str, str]]:
    seeds = draw(st.lists(st.integers(0, 10**6), min_size=1, max_size=max_rows, unique=True))
    return [draw(valid_rows(seed)) for seed in seeds]


def _rejects(rows, row: int, column: str) -> str:
    with pytest.raises(LeaderboardValidationError) as caught:
        validate_rows(pd.DataFrame(rows, columns=list(LEADERBOARD_COLUMNS), dtype=str))
    message = str(caught.value)
    assert f"row {row}, column '{column}'" in message, message
    return message


# --- valid rows pass -----------------------------------------------------------------------------------------------

@_settings(SOME)
@given(rows=row_lists())
def test_generated_valid_rows_pass_as_text_cells(rows):
    validate_rows(pd.DataFrame(rows, dtype=str))


@_settings(FEW)
@given(rows=row_lists(), crlf=st.booleans(), bom=st.booleans())
def test_valid_rows_round_trip_through_a_csv_file_exactly(tmp_path_factory, rows, crlf, bom):
    path = tmp_path_factory.mktemp("props") / "result.csv"
    write_result_csv(path, rows)
    data = path.read_bytes()
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + (data.replace(b"\n", b"\r\n") if crlf else data))
    stored = validate_csv(path)
    expected = sorted(rows, key=LEADERBOARD_SCHEMA.sort_key)
    assert stored.to_dict("records") == [{c: r[c] for c in LEADERBOARD_COLUMNS} for r in expected]


# --- each corruption is named by row and column --------------------------------------------------------------------

INTEGER_COLUMNS = ("model_params", "seed", "train_steps", "n_eval_episodes")
RATE_COLUMNS = ("success_rate", "success_se", "progress_mean", "invalid_action_rate", "task_score")
NUMBER_COLUMNS = RATE_COLUMNS + ("return_mean", "steps_mean", "wall_clock_s", "env_steps_per_s")
JSON_COLUMNS = ("method_config", "per_task_type", "per_dataset")
CONTROL = [chr(c) for c in (*range(0x00, 0x20), *range(0x7F, 0xA0))] + ["\u2028", "\u2029"]


@st.composite
def corruptions(draw) -> tuple[str, str, str]:
    """(column, kind, bad cell) for a corruption that no row may pass."""
    kind = draw(st.sampled_from(["formula", "control", "empty", "oversize", "integer", "range", "non_finite", "json",
                                 "date", "hex"]))
    any_column = st.sampled_from(LEADERBOARD_COLUMNS)
    payload = draw(text_cells)
    if kind == "formula":
        return draw(any_column), kind, draw(st.sampled_from(["=", "@", "+", "-"])) + "x" + payload
    if kind == "control":
        position = draw(st.integers(0, len(payload)))
        return draw(any_column), kind, payload[:position] + draw(st.sampled_from(CONTROL)) + payload[position:]
    if kind == "empty":
        return draw(any_column), kind, draw(st.sampled_from(["", " ", "   ", "\u3000"]))
    if kind == "oversize":
        return draw(any_column), kind, "7" * draw(st.integers(MAX_CELL_CHARS + 1, MAX_CELL_CHARS + 50))
    if kind == "integer":
        n = draw(st.integers(0, 10**6))
        spelling = draw(st.sampled_from([f"0{n}", f"+{n}", f" {n}", f"{n} ", f"{n}.0", f"{n}e0", f"{n:,}x",
                                         str(n).translate(str.maketrans("0123456789", "٠١٢٣٤٥٦٧٨٩"))]))
        return draw(st.sampled_from(INTEGER_COLUMNS)), kind, spelling
    if kind == "range":
        outside = draw(st.one_of(st.floats(1.0, 1e6, exclude_min=True), st.floats(-1e6, 0.0, exclude_max=True)))
        return draw(st.sampled_from(RATE_COLUMNS)), kind, repr(outside)
    if kind == "non_finite":
        return draw(st.sampled_from(NUMBER_COLUMNS)), kind, draw(st.sampled_from(["nan", "NaN", "inf", "-inf",
                                                                                  "Infinity", "1e999", "-1e400"]))
    if kind == "json":
        bad = draw(st.sampled_from(['{"eval_temperature": NaN}', '{"eval_temperature": 0, "eval_temperature": 0}',
                                    '{"a": 0.5, "a": 0.5}', "[1, 2]", '{"eval_temperature": 0', '{"x": Infinity}',
                                    '{"eval_temperature": 1e999}', "null", '"text"']))
        return draw(st.sampled_from(JSON_COLUMNS)), kind, bad
    if kind == "date":
        year = draw(st.integers(1970, 2999))
        bad = draw(st.sampled_from([f"{year}-13-01", f"{year}-00-10", f"{year}-01-32", f"{year}-02-30",
                                    f"{year}-04-31", f"{year}-1-01", f"{year}/01/01", f"01-01-{year}"]))
        return "date", kind, bad
    digits = draw(hex_digits(64))
    bad = draw(st.sampled_from([digits.upper() if re.search("[a-f]", digits) else "G" + digits[1:], digits[:-1],
                                digits + "0", "0x" + digits[2:]]))
    return draw(st.sampled_from(["data_sha256", "policy_sha256"])), kind, bad


@_settings(MANY)
@given(rows=row_lists(), corruption=corruptions(), data=st.data())
def test_each_kind_of_corruption_is_rejected_naming_row_and_column(rows, corruption, data):
    column, kind, bad = corruption
    index = data.draw(st.integers(0, len(rows) - 1))
    rows[index] = {**rows[index], column: bad}
    message = _rejects(rows, index + 1, column)
    if kind == "integer":
        assert "canonical" in message or "control" in message


@_settings(SOME)
@given(n=st.integers(0, 10**9), others=st.lists(st.sampled_from(["0{}", "+{}", "00{}", " {}", "{} ", "{}.0"]),
                                                 min_size=1, max_size=4, unique=True), data=st.data())
def test_spellings_of_one_seed_never_make_two_keys(n, others, data):
    base = data.draw(valid_rows(n))
    spellings = [str(n)] + [form.format(n) for form in others]
    rows = [{**base, "seed": spelling} for spelling in spellings]
    with pytest.raises(LeaderboardValidationError) as caught:
        validate_rows(pd.DataFrame(rows, dtype=str))
    # Every spelling but the canonical one is refused, so the entry can hold seed n once.
    refused = {p.row for p in caught.value.problems if p.column == "seed"}
    assert refused == set(range(2, len(rows) + 1))


@_settings(SOME)
@given(rows=row_lists(max_rows=3), data=st.data())
def test_a_repeated_key_is_rejected_whatever_the_json_spacing_and_order(rows, data):
    twin = dict(rows[0])
    config = json.loads(twin["method_config"])
    indent = data.draw(st.sampled_from([None, 1]))
    twin["method_config"] = json.dumps(dict(reversed(list(config.items()))), indent=indent,
                                       ensure_ascii=data.draw(st.booleans())).replace("\n", "")
    message = _rejects([*rows, twin], len(rows) + 1, "/".join(LEADERBOARD_SCHEMA.key))
    assert "duplicate key" in message


# --- files: malformed lines give one message each ------------------------------------------------------------------

@_settings(SOME)
@given(rows=row_lists(max_rows=3), data=st.data())
def test_a_stray_carriage_return_anywhere_gives_exactly_one_message(rows, data):
    path_text = pd.DataFrame(rows, dtype=str).to_csv(index=False, lineterminator="\n")
    position = data.draw(st.integers(0, len(path_text) - 1))
    broken = path_text[:position] + "\r" + path_text[position:]
    if "\r\n" in broken:  # a CR just before a line end is a CRLF line end: legal
        return
    with pytest.raises(LeaderboardValidationError) as caught:
        parse_table(broken, "result.csv")
    assert len(caught.value.problems) == 1 and "carriage return" in str(caught.value)


# --- curves follow the rules of rows -------------------------------------------------------------------------------

@st.composite
def curves(draw) -> pd.DataFrame:
    names = draw(st.lists(st.sampled_from(["env/success", "loss/total", "optim/lr", "ctrl/ema", "time/step_s"]),
                          min_size=1, max_size=5, unique=True))
    steps = draw(st.integers(1, 12))
    cell = st.one_of(reals.map(repr), st.just(""), st.just("nan"), st.integers(-5, 5).map(str))
    rows = [{"step": str(t), "seed": "0", **{n: draw(cell) for n in names}} for t in range(steps)]
    return pd.DataFrame(rows, columns=["step", "seed", *names], dtype=str)


@_settings(SOME)
@given(curve=curves(), data=st.data())
def test_curves_pass_when_valid_and_name_row_and_column_when_corrupted(curve, data):
    validate_curve(curve, "metrics.csv")
    row = data.draw(st.integers(0, len(curve) - 1))
    column = data.draw(st.sampled_from(list(curve.columns)))
    bad = data.draw(st.sampled_from(["=1+1", "@SUM(A1)", "-cmd", "inf", "NaN", "high", "1e999", "x\ny", "0x10"]))
    if column in ("step", "seed"):
        bad = data.draw(st.sampled_from([bad, "07", "+3", "-1", "1.0"]))
    curve.iloc[row, list(curve.columns).index(column)] = bad
    with pytest.raises(LeaderboardValidationError) as caught:
        validate_curve(curve, "metrics.csv")
    assert f"row {row + 1}, column '{column}'" in str(caught.value)


# --- strict JSON and markdown --------------------------------------------------------------------------------------

json_values = st.recursive(json_scalars | st.none(), lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(text_cells, inner, max_size=4), max_leaves=12)


@_settings(SOME)
@given(value=json_values, key=text_cells)
def test_strict_json_reads_what_json_writes_and_refuses_a_repeated_key(value, key):
    assert strict_json(json.dumps(value)) == value
    doubled = "{" + f"{json.dumps(key)}: 1, {json.dumps(key)}: 2" + "}"
    with pytest.raises(ValueError, match="duplicate key"):
        strict_json(doubled)


@_settings(MANY)
@given(text=st.text(st.characters(blacklist_categories=("Cs",)), max_size=60))
def test_markdown_escaping_leaves_no_live_markup(text):
    escaped = md_text(text)
    assert not re.search(r"[<>\n\r\x00-\x1f\x7f-\x9f\u2028\u2029]", escaped)
    # Every markdown special character is escaped: removing the escape pairs leaves none of them.
    assert not re.search(r"[`*_\[\]()|~$#!{}]", re.sub(r"\\[\\`*_\[\]()|~$#!{}]", "", escaped))

