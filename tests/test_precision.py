"""`train_dtype="auto"` and the emulated-bfloat16 warning: bfloat16 only where the device multiplies it natively,
recorded resolved, and a clear warning before a run trains in a bfloat16 that its CPU can only emulate."""

from __future__ import annotations

import warnings

import pytest
import torch

from fake_envs import COUNTER_ENV_ID

from craft_bench.agents import precision
from craft_bench.agents.precision import emulated_bfloat16_warning, native_bfloat16, resolve_train_dtype
from craft_bench.agents.trainer import Trainer, TrainConfig


@pytest.fixture(params=[True, False], ids=["native", "emulated"])
def native(request, monkeypatch) -> bool:
    """Runs the test as on a CPU with bfloat16 matrix instructions, then as on one without."""
    monkeypatch.setattr(precision, "native_bfloat16", lambda device="cpu": request.param)
    return request.param


def test_auto_is_bfloat16_only_where_it_is_native_and_explicit_values_stay(native):
    assert resolve_train_dtype("auto") == ("bfloat16" if native else "float32")
    assert TrainConfig(train_dtype="auto").train_dtype == ("bfloat16" if native else "float32")
    for explicit in ("float32", "bfloat16"):
        assert resolve_train_dtype(explicit) == explicit
        assert TrainConfig(train_dtype=explicit).train_dtype == explicit
    with pytest.raises(ValueError, match="train_dtype must be one of .* or 'auto', got 'float16'"):
        TrainConfig(train_dtype="float16")


def test_native_bfloat16_reads_torchs_own_cpu_checks():
    expected = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    assert native_bfloat16("cpu") is expected
    assert native_bfloat16(torch.device("cpu")) is expected
    assert native_bfloat16("meta") is False  # a device that computes nothing runs nothing natively


def test_the_warning_names_emulated_bfloat16_and_the_way_out(native):
    message = emulated_bfloat16_warning("bfloat16")
    if native:
        assert message is None
    else:
        assert "no bfloat16 matrix instructions" in message and "train_dtype='auto'" in message
    assert emulated_bfloat16_warning("float32") is None


def test_a_bfloat16_run_on_an_emulating_cpu_warns_once_at_start(model_dir, tmp_path, native):
    config = TrainConfig(model=str(model_dir), env_id=COUNTER_ENV_ID, steps=0, train_dtype="bfloat16",
                         num_workers=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = Trainer(config, tmp_path / "run", progress=False)
        trainer.close()
    slow = [w for w in caught if "no bfloat16 matrix instructions" in str(w.message)]
    assert len(slow) == (0 if native else 1)
