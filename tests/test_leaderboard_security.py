"""Tests of the leaderboard against hostile or unlucky input (issue 15): each test reproduces one finding and pins
its fix: symlinked outputs, markdown injection, seed forms, unvalidated curves, half-done submits, size limits,
strict JSON and dates, undecodable files, stray carriage returns and one-seed entries."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest

from craft_bench.leaderboard import LeaderboardValidationError, validate_rows, write_result_csv
from craft_bench.leaderboard import schema as lb_schema
from craft_bench.leaderboard.build import build
from craft_bench.leaderboard.schema import LEADERBOARD_COLUMNS, validate_csv
from craft_bench.leaderboard.store import load_submissions, submit
from test_leaderboard import _row, _write_run


def _problem_text(rows) -> str:
    with pytest.raises(LeaderboardValidationError) as caught:
        validate_rows(rows)
    return str(caught.value)


def _csv_text(rows: list[dict]) -> str:
    """Rows as the exact CSV text a file would hold (every cell quoted, so any character can be placed in one)."""
    def quote(cell) -> str:
        return '"' + str(cell).replace('"', '""') + '"'

    lines = [",".join(LEADERBOARD_COLUMNS)] + [",".join(quote(r[c]) for c in LEADERBOARD_COLUMNS) for r in rows]
    return "\n".join(lines) + "\n"


def _run_with_text(path: Path, text: str | bytes) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    data = text.encode("utf-8") if isinstance(text, str) else text
    (path / "result.csv").write_bytes(data)
    return path


# --- 2: symlinked outputs ------------------------------------------------------------------------------------------

def test_build_refuses_a_symlinked_leaderboard_md_and_leaves_its_target_alone(tmp_path):
    root = tmp_path / "leaderboard"
    submit(_write_run(tmp_path / "run", [0, 1], [0.5, 0.7]), root)
    outside = tmp_path / "outside.txt"
    outside.write_text("precious\n")
    (root / "LEADERBOARD.md").symlink_to(outside)
    with pytest.raises(ValueError, match="symbolic link"):
        build(root)
    assert outside.read_text() == "precious\n"


def test_build_refuses_a_symlinked_plot_or_plots_folder(tmp_path):
    root = tmp_path / "leaderboard"
    submit(_write_run(tmp_path / "run", [0, 1], [0.5, 0.7]), root)
    outside = tmp_path / "outside.png"
    outside.write_bytes(b"precious")
    (root / "plots").mkdir()
    (root / "plots" / "craft-TextWorld-v0__tiny.png").symlink_to(outside)
    with pytest.raises(ValueError, match="symbolic link"):
        build(root)
    assert outside.read_bytes() == b"precious"

    (root / "plots" / "craft-TextWorld-v0__tiny.png").unlink()
    (root / "plots").rmdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (root / "plots").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(ValueError, match="symbolic link"):
        build(root)
    assert list(elsewhere.iterdir()) == []


def test_submit_refuses_symlinked_submission_and_curve_outputs(tmp_path):
    root = tmp_path / "leaderboard"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    root.mkdir()
    (root / "curves").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(ValueError, match="symbolic link"):
        submit(_write_run(tmp_path / "run", [0], [0.5]), root)
    assert list(elsewhere.iterdir()) == []
    assert not (root / "submissions").exists() or not list((root / "submissions").glob("*.csv"))


# --- 3: markdown injection -----------------------------------------------------------------------------------------

def test_build_escapes_html_markdown_and_pipes_from_cells(tmp_path):
    root = tmp_path / "leaderboard"
    hostile = dict(model="<img src=x onerror=alert(1)>|x", teacher_context="[click](javascript:alert(1)) **bold**",
                   split="`code` <b>", env_id="craft/<script>-v0")
    run = tmp_path / "run"
    run.mkdir()
    write_result_csv(run / "result.csv", [_row(seed=s, **hostile) for s in (0, 1)])
    submit(run, root)
    build(root)
    text = (root / "LEADERBOARD.md").read_text()
    for raw in ("<img", "<script>", "<b>", "](javascript", "**bold**", "`code`"):
        assert raw not in text
    table = [line for line in text.splitlines() if line.startswith("| ")]
    header = table[0]
    # Every table line has as many cell separators as its header: an escaped `\|` is not one.
    separators = lambda line: line.replace("\\|", "").count("|")  # noqa: E731
    measured = [line for line in table if "javascript" in line]
    assert measured and all(separators(line) == separators(header) for line in measured)


def test_validation_rejects_line_breaks_and_control_characters_in_cells():
    for bad in ("two\nlines", "tab\tinside", "bell\x07", "carriage\rreturn"):
        message = _problem_text([{**_row(), "teacher_context": bad}])
        assert "row 1, column 'teacher_context'" in message and "control character" in message


# --- 10: canonical seeds -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("form", ["07", "+7", "007", " 7", "7 ", "7.0", "\u0667"])
def test_non_canonical_seed_text_is_refused(form):
    message = _problem_text(pd.DataFrame([{k: str(v) for k, v in {**_row(), "seed": form}.items()}], dtype=str))
    assert "row 1, column 'seed'" in message and "canonical" in message


def test_four_spellings_of_seed_7_cannot_become_four_seeds(tmp_path):
    rows = [{**_row(), "seed": form} for form in ("7", "07", "+7", "007")]
    run = _run_with_text(tmp_path / "run", _csv_text(rows))
    with pytest.raises(LeaderboardValidationError) as caught:
        submit(run, tmp_path / "lb")
    assert str(caught.value).count("canonical") == 3
    assert not (tmp_path / "lb" / "submissions").exists() or load_submissions(tmp_path / "lb").empty


# --- 11: curves are validated --------------------------------------------------------------------------------------

@pytest.mark.parametrize(("cell", "words"), [("=HYPERLINK(\"http://x\")", "formula"), ("high", "number"),
                                              ("0x1p3", "number"), ("inf", "finite"), ("1e999", "finite"),
                                              ("NaN", "number"), ("x" * 9000, "limit")])
def test_submit_refuses_a_metrics_file_with_bad_cells_and_writes_nothing(tmp_path, cell, words):
    run = _write_run(tmp_path / "run", [0], [0.5])
    metrics = pd.read_csv(run / "metrics.csv", dtype=str, keep_default_na=False)
    metrics.loc[2, "env/success"] = cell
    metrics.to_csv(run / "metrics.csv", index=False)
    root = tmp_path / "lb"
    with pytest.raises(LeaderboardValidationError) as caught:
        submit(run, root)
    message = str(caught.value)
    assert "metrics.csv" in message and "row 3, column 'env/success'" in message and words in message
    assert not list(root.rglob("*.csv"))


def test_build_refuses_a_stored_curve_with_a_formula_header(tmp_path):
    root = tmp_path / "lb"
    submit(_write_run(tmp_path / "run", [0], [0.5]), root)
    (curve,) = (root / "curves").glob("*.csv")
    text = curve.read_text()
    curve.write_text(text.replace("loss/total", "=cmd|' /C calc'!A0", 1))
    with pytest.raises(LeaderboardValidationError, match="header"):
        build(root)


# --- 12: atomic submit ---------------------------------------------------------------------------------------------

def test_a_submit_that_fails_on_its_metrics_writes_nothing_and_the_retry_is_not_a_duplicate(tmp_path):
    run = _write_run(tmp_path / "run", [0], [0.5])
    good = (run / "metrics.csv").read_text()
    (run / "metrics.csv").write_text(good.replace("step,", "stpe,", 1))
    root = tmp_path / "lb"
    with pytest.raises(ValueError, match="step"):
        submit(run, root)
    assert not list(root.rglob("*.csv"))
    (run / "metrics.csv").write_text(good)
    report = submit(run, root)
    assert report.added == 1 and len(report.curves) == 1


# --- 13: size limits -----------------------------------------------------------------------------------------------

def test_a_cell_over_the_size_limit_is_refused():
    huge = "x" * (lb_schema.MAX_CELL_CHARS + 1)
    message = _problem_text([{**_row(), "teacher_context": huge}])
    assert "row 1, column 'teacher_context'" in message and str(lb_schema.MAX_CELL_CHARS) in message


def test_a_file_over_the_size_limit_is_refused_before_it_is_parsed(tmp_path):
    path = tmp_path / "result.csv"
    write_result_csv(path, [_row()])
    with path.open("a") as out:
        out.write("#" * lb_schema.MAX_TABLE_BYTES)
    with pytest.raises(ValueError, match=r"(?s)result.csv.*bytes"):
        validate_csv(path)


def test_a_metrics_file_over_the_curve_limit_is_refused(tmp_path, monkeypatch):
    run = _write_run(tmp_path / "run", [0], [0.5])
    monkeypatch.setattr(lb_schema, "MAX_CURVE_BYTES", (run / "metrics.csv").stat().st_size - 1)
    with pytest.raises(ValueError, match=r"(?s)metrics.csv.*bytes"):
        submit(run, tmp_path / "lb")
    assert not list((tmp_path / "lb").rglob("*.csv"))


# --- 14: strict JSON and dates -------------------------------------------------------------------------------------

@pytest.mark.parametrize(("cell", "words"), [
    ('{"pick": NaN}', "NaN"), ('{"pick": Infinity}', "Infinity"), ('{"pick": 0.5, "pick": 0.9}', "duplicate"),
    ('{"pick": 1.5}', "[0, 1]"), ('{"pick": "high"}', "[0, 1]"), ('{"": 0.5}', "task type"),
])
def test_per_task_type_is_strict_json_with_rates_in_range(cell, words):
    message = _problem_text([{**_row(), "per_task_type": cell}])
    assert "row 1, column 'per_task_type'" in message and words in message


@pytest.mark.parametrize("cell", ['{"eval_temperature": NaN}', '{"eval_temperature": 0, "eval_temperature": 1}'])
def test_method_config_is_strict_json(cell):
    assert "row 1, column 'method_config'" in _problem_text([{**_row(), "method_config": cell}])


@pytest.mark.parametrize("date", ["2026-13-45", "2026-02-30", "2026-1-05", "２０２６-01-05"])
def test_dates_are_real_iso_calendar_dates(date):
    message = _problem_text([{**_row(), "date": date}])
    assert "row 1, column 'date'" in message


# --- 17, 18: undecodable files and stray carriage returns ----------------------------------------------------------

def test_a_non_utf8_file_gives_a_message_naming_the_file(tmp_path):
    path = tmp_path / "result.csv"
    write_result_csv(path, [_row(model="caf\u00e9")])
    path.write_bytes(path.read_bytes().replace("caf\u00e9".encode(), "caf\u00e9".encode("latin-1")))
    with pytest.raises(ValueError) as caught:
        validate_csv(path)
    assert str(path) in str(caught.value) and "UTF-8" in str(caught.value)


def test_a_carriage_return_prefixed_cell_gives_one_clear_message(tmp_path):
    path = tmp_path / "result.csv"
    write_result_csv(path, [_row()])
    text = path.read_text().replace(",tiny,", ",\rtiny,", 1)
    path.write_bytes(text.encode())
    with pytest.raises(LeaderboardValidationError) as caught:
        validate_csv(path)
    message = str(caught.value)
    assert "1 problem(s)" in message and "carriage return" in message and "missing value" not in message


def test_crlf_line_ends_are_read_like_lf(tmp_path):
    path = tmp_path / "result.csv"
    write_result_csv(path, [_row(), _row(seed=1)])
    path.write_bytes(path.read_bytes().replace(b"\n", b"\r\n"))
    assert len(validate_csv(path)) == 2


def test_a_ragged_line_gives_one_message_naming_its_line(tmp_path):
    path = tmp_path / "result.csv"
    write_result_csv(path, [_row(), _row(seed=1)])
    lines = path.read_text().splitlines()
    lines[2] = lines[2].rsplit(",", 3)[0]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(LeaderboardValidationError) as caught:
        validate_csv(path)
    message = str(caught.value)
    assert "1 problem(s)" in message and "row 2" in message and "fields" in message


# --- 23: one-seed entries ------------------------------------------------------------------------------------------

def test_a_one_seed_entry_beside_multi_seed_entries_shows_no_nan(tmp_path):
    root = tmp_path / "lb"
    submit(_write_run(tmp_path / "grpo", [0, 1, 2], [0.5, 0.7, 0.6]), root)
    submit(_write_run(tmp_path / "sdar", [0], [0.25], method="sdar"), root)
    build(root)
    text = (root / "LEADERBOARD.md").read_text()
    assert "nan" not in text.lower()
    sdar_line = next(line for line in text.splitlines() if line.startswith("| sdar "))
    assert "0.250 ± —" in sdar_line


def test_symlinked_input_files_are_not_read(tmp_path):
    root = tmp_path / "lb"
    submit(_write_run(tmp_path / "run", [0], [0.5]), root)
    (src,) = (root / "submissions").glob("*.csv")
    moved = tmp_path / "moved.csv"
    os.replace(src, moved)
    src.symlink_to(moved)
    with pytest.raises(ValueError, match="symbolic link"):
        load_submissions(root)
