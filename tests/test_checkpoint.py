"""Tests of agents/checkpoint.py: a trainer's payload round-trips under weights-only loading, damaged and forged
files are refused by name without running code, a full disk keeps the last checkpoint, and the non-finite guard."""

from __future__ import annotations

import errno
import io
import os
import pickle
import warnings
from pathlib import Path

import pytest
import torch

from craft_bench.agents import checkpoint as ckpt
from craft_bench.agents.checkpoint import CheckpointError, NonFiniteError, check_finite, digest_path, load_checkpoint, save_checkpoint


def trainer_like_payload(seed: int = 0) -> dict:
    """What Trainer.save_checkpoint writes, with a real AdamW state after one step and a controller's plain floats."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    model(torch.randn(3, 4)).pow(2).sum().backward()
    optimizer.step()
    return {
        "state": {"step": 3, "wall_clock_s": 1.5, "env_steps": 40, "env_time_s": 0.25},
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "method": {"controller": {"lam": 0.01, "alpha": 0.02, "ema": None, "steps": 3}},
        "ema": {k: v.clone() for k, v in model.state_dict().items()},
        "config": {"method": "craft", "method_options": {"alpha": 0.01}, "lr": 1e-4, "num_workers": None},
    }


def assert_same(a, b) -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b


def test_trainer_payload_with_adamw_state_round_trips_under_weights_only(tmp_path):
    payload = trainer_like_payload()
    path = tmp_path / "checkpoint.pt"
    digest = save_checkpoint(path, payload)
    assert digest_path(path).read_text() == f"{digest}  checkpoint.pt\n"
    assert ckpt.file_sha256(path) == digest
    loaded = load_checkpoint(path)
    assert_same(payload, loaded)
    # The optimizer state restores into a fresh AdamW (tuples such as betas survive weights-only loading).
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 2))
    torch.optim.AdamW(model.parameters(), lr=1e-3).load_state_dict(loaded["optimizer"])
    assert not list(tmp_path.glob("*.tmp"))


def test_saving_a_non_plain_object_is_refused_at_save_time(tmp_path):
    import numpy as np

    for bad in (np.float64(1.0), {1.0: 2}, Path("x"), object()):
        with pytest.raises(TypeError, match="payload/state/x|key"):
            save_checkpoint(tmp_path / "checkpoint.pt", {"state": {"x": bad} if not isinstance(bad, dict) else bad})
    assert not (tmp_path / "checkpoint.pt").exists()


class _Marker:
    """A pickle payload that would create a file when unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("container", ["torch_zip", "raw_pickle"])
@pytest.mark.parametrize("with_matching_digest", [False, True])
def test_a_code_executing_checkpoint_is_refused_and_never_runs(container, with_matching_digest, tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "checkpoint.pt"
    if container == "torch_zip":
        buffer = io.BytesIO()
        torch.save({"state": {"step": 1}, "model": _Marker(marker)}, buffer)
        path.write_bytes(buffer.getvalue())
    else:
        path.write_bytes(pickle.dumps({"model": _Marker(marker)}))
    assert not marker.exists()
    if with_matching_digest:  # a forger who also rewrites the digest file is still refused
        digest_path(path).write_text(f"{ckpt.file_sha256(path)}  checkpoint.pt\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(CheckpointError, match=r"checkpoint\.pt was refused.*could run code.*weights_only=False") as info:
            load_checkpoint(path)
    assert any("integrity is not verified" in str(w.message) for w in caught) == (not with_matching_digest)
    assert str(path) in str(info.value)
    assert not marker.exists()
    # The same file under the old loader really would have run code: the test's payload is live.
    if container == "torch_zip":
        torch.load(path, weights_only=False)
        assert marker.exists()


@pytest.mark.parametrize("damage, message", [
    ("empty", "is empty"),
    ("truncated", "does not match the SHA-256"),
    ("random", "does not match the SHA-256"),
    ("flipped_byte", "does not match the SHA-256"),
    ("digest_file_garbled", "does not match the SHA-256"),
])
def test_a_damaged_checkpoint_names_the_file_and_what_to_do(damage, message, tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, trainer_like_payload())
    data = bytearray(path.read_bytes())
    if damage == "empty":
        path.write_bytes(b"")
    elif damage == "truncated":
        path.write_bytes(bytes(data[: len(data) // 2]))
    elif damage == "random":
        path.write_bytes(os.urandom(len(data)))
    elif damage == "flipped_byte":
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))
    else:
        digest_path(path).write_text("not a digest\n")
    with pytest.raises(CheckpointError, match=message) as info:
        load_checkpoint(path)
    text = str(info.value)
    assert str(path) in text and "delete checkpoint.pt and checkpoint.pt.sha256" in text and "backup" in text


@pytest.mark.parametrize("damage, message", [
    ("truncated", "truncated or corrupt"),
    ("random", "refused|truncated or corrupt"),
])
def test_a_damaged_checkpoint_without_digest_file_still_gives_a_clear_error(damage, message, tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, trainer_like_payload())
    digest_path(path).unlink()
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncated" else os.urandom(len(data)))
    with pytest.warns(UserWarning, match="integrity is not verified"):
        with pytest.raises(CheckpointError, match=message):
            load_checkpoint(path)


def test_a_missing_checkpoint_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "checkpoint.pt")


def test_a_checkpoint_holding_nan_is_refused_on_load(tmp_path):
    # Written by older code (or by hand) with a matching digest: the NaN itself must stop the resume.
    path = tmp_path / "checkpoint.pt"
    payload = trainer_like_payload()
    payload["model"]["0.weight"][0, 0] = float("nan")
    payload["optimizer"]["state"][0]["exp_avg"][1] = float("inf")
    torch.save(payload, path)
    digest_path(path).write_text(f"{ckpt.file_sha256(path)}  checkpoint.pt\n")
    with pytest.raises(CheckpointError, match=r"non-finite values in model/0\.weight \(1 values\), optimizer/state/0/exp_avg"):
        load_checkpoint(path)


def test_a_nan_payload_never_replaces_the_last_good_checkpoint(tmp_path):
    path = tmp_path / "checkpoint.pt"
    good = trainer_like_payload()
    save_checkpoint(path, good)
    before = path.read_bytes()
    bad = trainer_like_payload()
    bad["model"]["2.bias"][0] = float("inf")
    with pytest.raises(CheckpointError, match=r"refusing to write .*2\.bias.*previous checkpoint is kept"):
        save_checkpoint(path, bad)
    assert path.read_bytes() == before
    assert_same(good, load_checkpoint(path))


def test_disk_full_during_save_keeps_the_previous_checkpoint_and_no_tmp(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    first = trainer_like_payload(seed=0)
    save_checkpoint(path, first)
    before = (path.read_bytes(), digest_path(path).read_text())

    written = {"bytes": 0}
    real_write = ckpt._HashingWriter.write

    def write_until_full(self, data):
        written["bytes"] += len(data)
        if written["bytes"] > 1500:  # a partial file is on disk when the disk fills up
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(self, data)

    monkeypatch.setattr(ckpt._HashingWriter, "write", write_until_full)
    with pytest.raises(CheckpointError, match=r"could not write checkpoint .*checkpoint\.pt: the disk is full; the last complete checkpoint .* is kept.*--resume"):
        save_checkpoint(path, trainer_like_payload(seed=1))
    assert written["bytes"] > 1500
    assert (path.read_bytes(), digest_path(path).read_text()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt", "checkpoint.pt.sha256"]
    monkeypatch.undo()
    assert_same(first, load_checkpoint(path))


def test_disk_full_while_writing_the_digest_leaves_a_loadable_pair(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, trainer_like_payload(seed=0))
    real = ckpt._write_text_atomic
    calls = {"n": 0}

    def fail_second(target, text):
        calls["n"] += 1
        if calls["n"] == 2:  # after the checkpoint was renamed, before the digest file lists only the new digest
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(target, text)

    monkeypatch.setattr(ckpt, "_write_text_atomic", fail_second)
    with pytest.raises(CheckpointError, match="disk is full"):
        save_checkpoint(path, trainer_like_payload(seed=1))
    monkeypatch.undo()
    assert_same(trainer_like_payload(seed=1), load_checkpoint(path))
    assert not list(tmp_path.glob("*.tmp"))


def test_a_kill_between_checkpoint_rename_and_digest_update_still_loads(tmp_path, monkeypatch):
    """The digest file lists the old and the new digest during the switch, so either checkpoint file is accepted."""
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, trainer_like_payload(seed=0))
    real_replace = os.replace

    def die_after_checkpoint_rename(src, dst):
        real_replace(src, dst)
        if Path(dst) == path:
            raise KeyboardInterrupt  # stands in for a kill: nothing after this line runs

    monkeypatch.setattr(ckpt.os, "replace", die_after_checkpoint_rename)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, trainer_like_payload(seed=1))
    monkeypatch.undo()
    assert len(digest_path(path).read_text().splitlines()) == 2
    assert_same(trainer_like_payload(seed=1), load_checkpoint(path))


# ---------------------------------------------------------------------------------------------------- the guard
def _model_with_grads(value: float | None = None) -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 1))
    model(torch.randn(2, 3)).sum().backward()
    if value is not None:
        model[1].weight.grad[0, 1] = value
    return model


def test_finite_step_passes_the_guard():
    assert check_finite(5, [torch.tensor(0.3), 0.1], _model_with_grads()) is True


@pytest.mark.parametrize("where", ["loss", "grad"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_nonfinite_loss_or_gradient_stops_the_step_by_name(where, bad):
    losses = [torch.tensor(0.3), torch.tensor(bad)] if where == "loss" else [torch.tensor(0.3)]
    model = _model_with_grads(bad if where == "grad" else None)
    with pytest.raises(NonFiniteError, match=r"^step 7: .*last good step is kept.*on_nonfinite=\"skip\"") as info:
        check_finite(7, losses, model)
    if where == "grad":
        assert "1 parameter(s): 1.weight" in str(info.value)
    else:
        assert "micro-batch(es) [1]" in str(info.value)


def test_nonfinite_problem_describes_without_deciding():
    assert ckpt.nonfinite_problem(3, [0.5], _model_with_grads()) is None
    assert ckpt.nonfinite_problem(3, [float("inf")], _model_with_grads()) == "step 3: loss [inf] in micro-batch(es) [0]"


def test_skip_policy_reports_a_nonfinite_step_without_raising():
    assert check_finite(2, [float("nan")], _model_with_grads(), on_nonfinite="skip") is False
    with pytest.raises(ValueError, match="on_nonfinite"):
        check_finite(2, [0.0], _model_with_grads(), on_nonfinite="ignore")


def test_a_real_full_disk_keeps_the_previous_checkpoint(tmp_path):
    """The same as the patched-writer test on a 64 KiB tmpfs; needs root and mount, skipped elsewhere."""
    import shutil
    import subprocess

    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root to mount a tmpfs")
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("mount -t tmpfs is not permitted here")
    try:
        path = disk / "checkpoint.pt"
        save_checkpoint(path, {"model": {"w": torch.zeros(2000)}})  # 8 KB
        with pytest.raises(CheckpointError, match="the disk is full; the last complete checkpoint"):
            save_checkpoint(path, {"model": {"w": torch.ones(12000)}})  # 48 KB more does not fit beside it
        assert sorted(p.name for p in disk.iterdir()) == ["checkpoint.pt", "checkpoint.pt.sha256"]
        assert torch.equal(load_checkpoint(path)["model"]["w"], torch.zeros(2000))
    finally:
        subprocess.run(["umount", str(disk)], check=False)
