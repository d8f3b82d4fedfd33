"""Tests of agents/run_files.py: one process per run directory (with a named holder, and no stale locks), metrics.csv
survives torn lines and kills, atomic writes, which settings a resume may change, field validation."""

from __future__ import annotations

import dataclasses
import errno
import os
import subprocess
import sys
import textwrap
import typing
from pathlib import Path

import pandas as pd
import pytest

from craft_bench.agents import run_files as rf
from craft_bench.agents.run_files import (
    FIELD_RANGES,
    ConfigError,
    RunLock,
    RunLockedError,
    append_metrics,
    config_differences,
    read_metrics,
    truncate_metrics,
    validate_train_config,
    write_json_atomic,
)
from craft_bench.agents.trainer import TrainConfig

# ---------------------------------------------------------------------------------------------------- the lock


def test_a_second_lock_on_the_same_run_directory_is_refused_naming_the_holder(tmp_path):
    with RunLock(tmp_path):
        with pytest.raises(RunLockedError, match=rf"{tmp_path} is in use by another run \(pid {os.getpid()} on "):
            RunLock(tmp_path).acquire()
    with RunLock(tmp_path):  # released on exit: the next run gets it
        pass


def test_a_lock_held_by_another_process_names_its_pid_and_dies_with_it(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            from craft_bench.agents.run_files import RunLock
            lock = RunLock({str(tmp_path)!r}).acquire()
            print("locked", flush=True)
            time.sleep(60)
        """)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunLockedError, match=f"pid {holder.pid} "):
            RunLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait()
    # The dead holder's lock file is still there, with its pid, but blocks nobody.
    assert f"pid {holder.pid} " in (tmp_path / ".lock").read_text()
    with RunLock(tmp_path):
        assert f"pid {os.getpid()} " in (tmp_path / ".lock").read_text()


@pytest.mark.skipif(not Path("/proc/self/fd").exists(), reason="reads /proc")
def test_a_forked_worker_does_not_keep_the_run_lock(tmp_path):
    """Otherwise a worker that outlives a killed parent would keep the run locked. (Spawn and forkserver workers
    never get the descriptor: Python opens files non-inheritable.)"""
    import multiprocessing as mp

    context = mp.get_context("fork")
    with RunLock(tmp_path):
        queue = context.Queue()
        child = context.Process(target=_report_lock_fds, args=(queue,))
        child.start()
        held = queue.get(timeout=60)
        child.join(timeout=60)
    assert held == []


def _report_lock_fds(queue) -> None:
    paths = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            paths.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            pass
    queue.put([p for p in paths if p.endswith("/.lock")])


def test_a_stale_lock_file_of_a_dead_process_does_not_block(tmp_path):
    (tmp_path / ".lock").write_text("pid 999999 on elsewhere, since 2020-01-01T00:00:00\n")
    with RunLock(tmp_path):
        pass


# ---------------------------------------------------------------------------------------------------- metrics.csv
def _steps(path: Path) -> list[int]:
    return pd.read_csv(path)["step"].tolist()


def test_a_torn_last_line_is_dropped_on_resume_not_glued_to_the_next_row(tmp_path):
    path = tmp_path / "metrics.csv"
    for step in range(10):
        append_metrics(path, {"step": step, "loss": 0.5})
    with path.open("a") as handle:
        handle.write("1")  # the kill hit while step 10's row was being written: "10,0.5\n" became "1"
    truncate_metrics(path, 10)  # resume: the checkpoint holds 10 steps
    append_metrics(path, {"step": 10, "loss": 0.5})
    assert _steps(path) == list(range(11))


def test_append_after_a_torn_line_never_continues_it_even_without_truncate(tmp_path):
    path = tmp_path / "metrics.csv"
    append_metrics(path, {"step": 0, "loss": 0.5})
    with path.open("a") as handle:
        handle.write("1,0.")
    append_metrics(path, {"step": 1, "loss": 0.25})
    assert path.read_text() == "step,loss\n0,0.5\n1,0.25\n"


def test_truncate_keeps_only_checkpointed_complete_unique_rows(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text("step,loss\r\n0,1.0\r\n1,2.0\r\nbad\r\n1,2.0\r\n2,3.0\r\n3,4")  # CRLF, as csv's default writes
    truncate_metrics(path, 2)
    header, rows = read_metrics(path)
    assert header == ["step", "loss"] and [r["step"] for r in rows] == ["0", "1"]
    truncate_metrics(path, 0)  # no checkpoint: only the header stays
    assert path.read_text() == "step,loss\n"


def test_truncate_removes_a_complete_line_with_the_wrong_field_count(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text("step,loss\n0,1.0\n1,0,0,0\n")  # a stray row (e.g. from another writer) with extra fields
    truncate_metrics(path, 1)
    assert path.read_text() == "step,loss\n0,1.0\n"


def test_a_torn_header_is_discarded(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text("step,lo")
    truncate_metrics(path, 3)
    assert not path.exists()
    path.write_text("step,lo")
    append_metrics(path, {"step": 0, "loss": 1.0})
    assert path.read_text() == "step,loss\n0,1.0\n"


def test_a_metric_that_appears_mid_run_widens_the_file(tmp_path):
    path = tmp_path / "metrics.csv"
    append_metrics(path, {"step": 0, "env/success": 0.5})
    append_metrics(path, {"step": 1, "env/success": 0.25, "craft/new": 1.0})
    append_metrics(path, {"step": 2, "craft/new": 2.0})  # a metric missing this step: an empty cell
    frame = pd.read_csv(path)
    assert list(frame.columns) == ["step", "env/success", "craft/new"]
    assert frame["craft/new"].isna().tolist() == [True, False, False]
    assert frame["env/success"].isna().tolist() == [False, False, True]


def test_atomic_json_write_leaves_the_old_file_and_no_tmp_when_the_disk_is_full(tmp_path, monkeypatch):
    path = tmp_path / "config.json"
    write_json_atomic(path, {"a": 1})
    real_fsync = os.fsync

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(rf.os, "fsync", full)
    with pytest.raises(OSError):
        write_json_atomic(path, {"a": 2})
    monkeypatch.setattr(rf.os, "fsync", real_fsync)
    assert path.read_text() == '{\n  "a": 1\n}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]


# ---------------------------------------------------------------------------------------------------- resume
def _config(**overrides) -> dict:
    return dataclasses.asdict(TrainConfig(**overrides))


def test_resume_may_change_worker_count_and_steps_but_not_results_settings():
    saved = _config(num_workers=2, steps=10)
    assert config_differences(saved, _config(num_workers=8, steps=20, checkpoint_every=3)) == []
    assert config_differences(saved, _config(device="cuda:0", micro_batch_rows=8)) == []  # float rounding only
    assert config_differences(saved, _config(lr=3e-4, temperature=0.5)) == ["lr", "temperature"]
    assert config_differences(saved, _config(method_options={"alpha": 0.02})) == ["method_options"]


def test_a_checkpoint_predating_a_new_field_resumes_when_the_field_has_its_default():
    saved = _config()
    del saved["history_turns"]
    defaults = _config()
    assert config_differences(saved, _config(), defaults) == []
    assert config_differences(saved, _config(history_turns=5), defaults) == ["history_turns"]
    assert config_differences(saved, _config()) == ["history_turns"]  # without defaults, missing is a difference


# ---------------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize("values, message", [
    ({"temperature": -1}, r"temperature=-1: must be >= 0"),
    ({"top_p": 5}, r"top_p=5: must be in \(0, 1\]"),
    ({"top_p": 0}, r"top_p=0: must be in \(0, 1\]"),
    ({"eval_temperature": -3}, r"eval_temperature=-3: must be >= 0"),
    ({"history_turns": -2}, r"history_turns=-2: must be >= 0"),
    ({"lr": "abc"}, r"lr='abc': must be a number"),
    ({"lr": 0}, r"lr=0: must be > 0"),
    ({"lr": float("nan")}, r"lr=nan: must be a finite number"),
    ({"steps": 2.5}, r"steps=2.5: must be an integer"),
    ({"steps": True}, r"steps=True: must be an integer"),
    ({"group_size": 0}, r"group_size=0: must be >= 1"),
    ({"ema_decay": 1.0}, r"ema_decay=1.0: must be in \[0, 1\)"),
    ({"num_workers": -1}, r"num_workers=-1: must be >= 0"),
    ({"method_options": "x"}, r"method_options='x': must be a JSON object"),
    ({"model": 3}, r"model=3: must be a string"),
    ({"histroy_turns": 2}, r"unknown field 'histroy_turns' \(did you mean history_turns"),
])
def test_bad_values_are_rejected_by_field_with_the_allowed_range(values, message):
    with pytest.raises(ConfigError, match=message):
        validate_train_config(values, TrainConfig)


def test_every_problem_is_reported_at_once():
    with pytest.raises(ConfigError) as info:
        validate_train_config({"temperature": -1, "top_p": 5}, TrainConfig)
    assert "temperature" in str(info.value) and "top_p" in str(info.value)


def test_good_values_pass_including_none_workers_and_int_for_float():
    validate_train_config({"num_workers": None, "lr": 1, "temperature": 0, "top_p": 1.0, "steps": 0, "method_options": {}}, TrainConfig)
    validate_train_config(_config(), TrainConfig)


def test_every_numeric_train_config_field_has_a_range():
    """A new numeric TrainConfig field must say what it accepts (FIELD_RANGES in agents/run_files.py)."""
    hints = typing.get_type_hints(TrainConfig)
    numeric = {
        f.name for f in dataclasses.fields(TrainConfig)
        if hints[f.name] in (int, float) or set(typing.get_args(hints[f.name])) & {int, float}
    }
    assert numeric - set(FIELD_RANGES) == set()


def test_validation_is_generic_over_the_dataclass():
    @dataclasses.dataclass
    class Other:
        ppo_epochs: int = 1
        label: str = "x"

    validate_train_config({"ppo_epochs": 2}, Other)
    with pytest.raises(ConfigError, match=r"ppo_epochs=0: must be >= 1"):
        validate_train_config({"ppo_epochs": 0}, Other)
    with pytest.raises(ConfigError, match=r"unknown field 'lr'"):
        validate_train_config({"lr": 0.1}, Other)


