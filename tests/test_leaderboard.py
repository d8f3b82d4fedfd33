"""Tests of the leaderboard: row validation (each rejection names row and column), submit, build and the reference
rows converted from SDAR's Table 1."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from craft_bench.leaderboard import (
    LEADERBOARD_COLUMNS,
    LeaderboardValidationError,
    make_result_row,
    validate_rows,
    write_result_csv,
)
from craft_bench.leaderboard.__main__ import SDAR_REFERENCE_FILE, main
from craft_bench.leaderboard.build import build, mean_se
from craft_bench.leaderboard.reference import SDAR_SOURCE, sdar_table1_rows
from craft_bench.leaderboard.schema import REFERENCE_SCHEMA, read_table
from craft_bench.leaderboard.store import DuplicateSubmissionError, load_submissions, submit

REPO = Path(__file__).resolve().parents[1]
SHARED_SDAR = Path("/work/shared/reference/sdar-table1.csv")


def _row(**overrides) -> dict:
    fields = dict(
        env_id="craft/TextWorld-v0", env_version="0", data_source="generated", data_sha256="ab" * 32,
        split="test", method="grpo", method_config={"lr": 1e-5, "group_size": 4, "eval_temperature": 0.0},
        teacher_context="none",
        model="tiny", model_params=1234567, seed=0, train_steps=20, n_eval_episodes=50, success_rate=0.5,
        success_se=0.07, progress_mean=0.6, return_mean=-0.25, steps_mean=12.5, invalid_action_rate=0.1,
        per_task_type={"coin": {"success": 0.5, "n": 50}}, wall_clock_s=12.0, env_steps_per_s=340.5,
        git_commit="0123abc", date="2026-11-22",
    )
    fields.update(overrides)
    return make_result_row(**fields)


def _text_rows(rows: list[dict]) -> pd.DataFrame:
    """Rows as a CSV reader would give them: every cell text."""
    return pd.DataFrame([{k: str(v) for k, v in r.items()} for r in rows], dtype=str)


def _problem_text(rows) -> str:
    with pytest.raises(LeaderboardValidationError) as caught:
        validate_rows(rows)
    return str(caught.value)


def test_make_result_row_fills_provenance_and_orders_columns():
    row = _row()
    assert tuple(row) == LEADERBOARD_COLUMNS
    assert row["source"] == "run" and row["suite_version"]
    assert json.loads(row["method_config"]) == {"eval_temperature": 0.0, "group_size": 4, "lr": 1e-5}
    filled = make_result_row(**{k: v for k, v in _row().items() if k not in ("git_commit", "date", "source")})
    assert filled["source"] == "run"
    assert len(filled["date"]) == 10 and filled["git_commit"]


def test_valid_rows_pass_as_dicts_and_as_csv_text():
    rows = [_row(seed=s) for s in range(3)]
    validate_rows(rows)
    validate_rows(_text_rows(rows))


@pytest.mark.parametrize(
    ("rows", "row", "column", "words"),
    [
        ([{**_row(), "colour": "red"}], "row 1", "colour", "unknown column"),
        ([{k: v for k, v in _row().items() if k != "seed"}], "row 1", "seed", "missing column"),
        ([_row(), {**_row(seed=1), "model": ""}], "row 2", "model", "missing value"),
        ([{**_row(), "success_rate": float("nan")}], "row 1", "success_rate", "missing value"),
        ([{**_row(), "success_rate": 1.5}], "row 1", "success_rate", "outside [0, 1]"),
        ([{**_row(), "steps_mean": -1.0}], "row 1", "steps_mean", "outside"),
        ([{**_row(), "return_mean": float("inf")}], "row 1", "return_mean", "finite"),
        ([{**_row(), "seed": -1}], "row 1", "seed", ">= 0"),
        ([{**_row(), "n_eval_episodes": 0}], "row 1", "n_eval_episodes", ">= 1"),
        ([{**_row(), "seed": 1.5}], "row 1", "seed", "expected an integer"),
        ([{**_row(), "train_steps": "ten"}], "row 1", "train_steps", "expected an integer"),
        ([{**_row(), "success_rate": "high"}], "row 1", "success_rate", "expected a number"),
        ([{**_row(), "success_rate": True}], "row 1", "success_rate", "expected a number"),
        ([{**_row(), "model": 7}], "row 1", "model", "expected text"),
        ([{**_row(), "per_task_type": "{not json"}], "row 1", "per_task_type", "not valid JSON"),
        ([{**_row(), "method_config": "[1, 2]"}], "row 1", "method_config", "expected a JSON object"),
        ([{**_row(), "method_config": '{"lr": 0.1}'}], "row 1", "method_config", "evaluation temperature"),
        ([{**_row(), "method_config": '{"eval_temperature": -1}'}], "row 1", "method_config", "number >= 0"),
        ([{**_row(), "data_sha256": "abc"}], "row 1", "data_sha256", "64 lowercase hex"),
        ([{**_row(), "date": "22/11/2026"}], "row 1", "date", "ISO date"),
        ([{**_row(), "source": "paper:someday"}], "row 1", "source", "paper:<arXiv id>"),
        ([{**_row(), "model": "=HYPERLINK(\"http://x\")"}], "row 1", "model", "formula"),
        ([{**_row(), "method": "@SUM(A1)"}], "row 1", "method", "formula"),
        ([{**_row(), "split": "+cmd|' /C calc'!A0"}], "row 1", "split", "formula"),
        ([{**_row(), "return_mean": "-1+2"}], "row 1", "return_mean", "formula"),
        ([_row(), _row(seed=1), _row()], "row 3", "env_id/split/method/method_config/model/policy_sha256/seed/source",
         "duplicate key"),
    ],
    ids=["unknown-column", "missing-column", "empty-cell", "nan", "rate-above-1", "negative-steps", "inf",
         "negative-seed", "zero-episodes", "float-seed", "text-count", "text-rate", "bool-rate", "int-text",
         "bad-json", "json-not-object", "no-temperature", "negative-temperature", "bad-sha", "bad-date", "bad-source",
         "formula-eq", "formula-at",
         "formula-plus", "formula-minus", "duplicate-key"],
)
def test_validation_rejects_with_row_and_column(rows, row, column, words):
    message = _problem_text(rows)
    assert f"{row}, column '{column}'" in message
    assert words in message


def test_table_input_reports_header_problems_and_text_cells():
    frame = _text_rows([_row(), _row(seed=1)]).drop(columns="seed").assign(extra="x")
    frame.loc[1, "success_rate"] = "=1+1"
    message = _problem_text(frame)
    assert "header, column 'extra': unknown column" in message
    assert "header, column 'seed': missing column" in message
    assert "row 2, column 'success_rate': looks like a spreadsheet formula" in message
    doubled = pd.concat([_text_rows([_row()]), _text_rows([_row()])[["seed"]]], axis=1)
    assert "header, column 'seed': column appears more than once" in _problem_text(doubled)


def test_duplicate_keys_compare_method_config_as_json():
    first = _row()
    second = {**_row(), "method_config": '{"lr": 1e-05,  "eval_temperature": 0.0, "group_size": 4}'}
    assert "duplicate key" in _problem_text([first, second])
    validate_rows([first, _row(method_config={"lr": 2e-5, "group_size": 4, "eval_temperature": 0.0})])


def test_signed_numbers_are_data_not_formulas():
    validate_rows(_text_rows([_row(return_mean=-0.5), _row(seed=1, return_mean=1e-3)]))


def _write_run(path: Path, seeds: list[int], successes: list[float], method: str = "grpo", steps: int = 4,
               with_seed_column: bool = True) -> Path:
    rows = [_row(seed=s, success_rate=v, method=method) for s, v in zip(seeds, successes)]
    write_result_csv(path / "result.csv", rows)
    metrics = pd.DataFrame([{"step": t, "seed": s, "env/success": round(v * t / steps, 4), "loss/total": 1.0 / (t + 1)}
                            for s, v in zip(seeds, successes) for t in range(steps + 1)])
    if not with_seed_column:
        metrics = metrics.drop(columns="seed")
    metrics.to_csv(path / "metrics.csv", index=False)
    return path


def test_write_result_csv_round_trips_exact_text(tmp_path):
    rows = [_row(seed=s, success_rate=0.1 + 0.2) for s in (10, 2)]
    write_result_csv(tmp_path / "result.csv", rows)
    stored = read_table(tmp_path / "result.csv")
    assert list(stored["seed"]) == ["2", "10"]
    assert stored.loc[0, "success_rate"] == repr(0.1 + 0.2)
    validate_rows(stored)


def test_submit_merges_refuses_duplicates_and_replaces_only_clashing_rows(tmp_path):
    root = tmp_path / "leaderboard"
    first = submit(_write_run(tmp_path / "a", [0, 1], [0.5, 0.7]), root)
    assert (first.added, first.replaced) == (2, 0)
    assert len(first.curves) == 2
    submit(_write_run(tmp_path / "b", [2], [0.6]), root)
    assert sorted(load_submissions(root)["seed"].astype(int)) == [0, 1, 2]

    with pytest.raises(DuplicateSubmissionError, match="row 1"):
        submit(_write_run(tmp_path / "c", [1], [0.9]), root)
    assert sorted(load_submissions(root)["success_rate"]) == ["0.5", "0.6", "0.7"]

    report = submit(tmp_path / "c", root, replace=True)
    assert (report.added, report.replaced) == (0, 1)
    stored = load_submissions(root).set_index("seed")
    assert stored.loc["1", "success_rate"] == "0.9" and stored.loc["0", "success_rate"] == "0.5"
    assert len(list((root / "submissions").glob("*.csv"))) == 1


def test_submit_refuses_published_rows_and_unseparable_curves(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    pd.DataFrame([{**_row(), "source": SDAR_SOURCE}]).to_csv(run / "result.csv", index=False)
    with pytest.raises(LeaderboardValidationError, match="row 1, column 'source'"):
        submit(run, tmp_path / "lb")
    with pytest.raises(ValueError, match="no 'seed' column"):
        submit(_write_run(tmp_path / "two", [0, 1], [0.1, 0.2], with_seed_column=False), tmp_path / "lb")


def test_build_tables_mean_se_over_seeds_and_is_byte_identical_twice(tmp_path):
    root = tmp_path / "leaderboard"
    shutil.copytree(REPO / "leaderboard" / "reference", root / "reference")
    submit(_write_run(tmp_path / "grpo", [0, 1], [0.5, 0.7]), root)
    submit(_write_run(tmp_path / "craft", [0, 1, 2], [0.8, 0.8, 0.8], method="craft"), root)

    first = {p: p.read_bytes() for p in build(root)}
    second = {p: p.read_bytes() for p in build(root)}
    assert first == second
    # Another process (another hash seed, fresh matplotlib state) writes the same bytes too.
    subprocess.run([sys.executable, "-m", "craft_bench.leaderboard", "build", "--root", str(root)], check=True,
                   capture_output=True, env={**os.environ, "PYTHONHASHSEED": "12345"})
    assert {p: p.read_bytes() for p in first} == first
    (png,) = [data for p, data in first.items() if p.suffix == ".png"]
    assert png.startswith(b"\x89PNG") and not any(chunk in png for chunk in (b"tEXt", b"iTXt", b"zTXt", b"tIME"))

    text = (root / "LEADERBOARD.md").read_text()
    measured, published = text.split("## Published numbers")
    grpo_line = next(line for line in measured.splitlines() if line.startswith("| grpo "))
    assert "| 2 |" in grpo_line and "0.600 ± 0.100" in grpo_line
    assert measured.index("| craft ") < measured.index("| grpo ")
    assert "0.800 ± 0.000" in measured
    assert SDAR_SOURCE not in measured and "Qwen2.5-3B-Instruct" not in measured
    assert SDAR_SOURCE in published and "| Qwen3-1.7B | SDAR | 53.9 |" in published


def test_build_removes_plots_no_entry_needs(tmp_path):
    root = tmp_path / "leaderboard"
    (root / "plots").mkdir(parents=True)
    (root / "plots" / "old.png").write_bytes(b"stale")
    assert build(root) == [root / "LEADERBOARD.md"]
    assert not (root / "plots" / "old.png").exists()
    assert "No measured results yet" in (root / "LEADERBOARD.md").read_text()


def test_mean_se_is_sample_standard_error():
    assert mean_se([0.5, 0.7]) == pytest.approx((0.6, 0.1))
    assert mean_se([0.3]) == (0.3, None)


def test_committed_reference_matches_sdar_table1_and_is_marked_published():
    stored = read_table(REPO / "leaderboard" / "reference" / SDAR_REFERENCE_FILE)
    validate_rows(stored, REFERENCE_SCHEMA)
    assert set(stored["source"]) == {SDAR_SOURCE}
    assert len(stored) == 30 * 4
    if SHARED_SDAR.exists():
        converted = pd.DataFrame(sdar_table1_rows(SHARED_SDAR))
        key = list(REFERENCE_SCHEMA.key)
        assert converted.sort_values(key).reset_index(drop=True).equals(stored.sort_values(key).reset_index(drop=True))


def test_reference_rows_are_not_leaderboard_rows():
    stored = read_table(REPO / "leaderboard" / "reference" / SDAR_REFERENCE_FILE)
    assert "header, column 'source'" not in _problem_text(stored)
    assert "missing column" in _problem_text(stored)


def test_cli_submit_validate_build(tmp_path, capsys):
    root = tmp_path / "lb"
    run = _write_run(tmp_path / "run", [0], [0.25])
    main(["--root", str(root), "submit", str(run)])
    main(["--root", str(root), "validate"])
    main(["--root", str(root), "validate", str(run)])
    main(["build", "--root", str(root)])
    assert "1 measured row(s)" in capsys.readouterr().out
    assert (root / "LEADERBOARD.md").exists()
    with pytest.raises(SystemExit, match="already on the leaderboard"):
        main(["--root", str(root), "submit", str(run)])


def _submit_in_process(args: tuple[str, str]) -> None:
    submit(Path(args[0]), Path(args[1]))


def test_concurrent_submits_keep_every_row(tmp_path):
    import multiprocessing

    root = tmp_path / "leaderboard"
    runs = [str(_write_run(tmp_path / f"run{seed}", [seed], [0.1 * seed])) for seed in range(4)]
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        pool.map(_submit_in_process, [(run, str(root)) for run in runs])
    assert sorted(load_submissions(root)["seed"].astype(int)) == [0, 1, 2, 3]
