"""The trainer's rollout-engine and worker-pool wiring: with engine="vllm", rollouts are sampled by the vLLM engine,
its weights are synced after every step and after a resume, and scoring stays on the trainer's model; env_workers
picks the runner's pool. A recording stand-in replaces VLLMEngine (the engine itself is tested in
test_vllm_engine.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import fake_envs  # noqa: E402,F401  (registers craft_test/*)

import craft_bench.agents.vllm_engine as vllm_engine  # noqa: E402
from craft_bench.agents.engine import HFEngine  # noqa: E402
from craft_bench.agents.trainer import TrainConfig, Trainer  # noqa: E402

MODEL = Path(__file__).parent / "data" / "h1_tiny_test_model"


class RecordingEngine:
    """Samples with an HF engine on a private copy of the weights, which only `sync_weights` refreshes, so a
    missing sync shows as stale samples; records every call."""

    instances: list[RecordingEngine] = []

    def __init__(self, source, config):
        from transformers import AutoModelForCausalLM

        self.source, self.config, self.events = Path(source), config, []
        self.model = AutoModelForCausalLM.from_pretrained(source)
        self.engine = HFEngine(self.model, pad_token_id=0)
        RecordingEngine.instances.append(self)

    def generate(self, prompt_ids, sampling, seeds):
        self.events.append("generate")
        return self.engine.generate(prompt_ids, sampling, seeds)

    def sync_weights(self, model):
        self.events.append("sync")
        self.model.load_state_dict(model.state_dict())

    def sleep(self):
        self.events.append("sleep")

    def close(self):
        self.events.append("close")


def config(**changes) -> TrainConfig:
    values = dict(
        method="sdar", env_id=fake_envs.COUNTER_ENV_ID, model=str(MODEL), steps=2, tasks_per_step=2, group_size=2,
        max_turns=3, max_new_tokens=6, lr=1e-3, num_workers=0, eval_split="train",
    )
    return TrainConfig(**{**values, **changes})


def test_vllm_engine_samples_and_is_synced_after_every_step_and_on_resume(tmp_path, monkeypatch):
    monkeypatch.setattr(vllm_engine, "VLLMEngine", RecordingEngine)
    RecordingEngine.instances.clear()
    trainer = Trainer(config(engine="vllm", vllm_options={"max_model_len": 512}), tmp_path / "run", progress=False)
    try:
        engine = RecordingEngine.instances[0]
        assert trainer.policy.engine is engine and engine.source == MODEL
        assert engine.config.max_model_len == 512
        trainer.train()
        # Each step: the rollout's turns generate, the engine sleeps, and after the update it is synced once.
        compact = [event for i, event in enumerate(engine.events) if i == 0 or event != engine.events[i - 1]]
        assert compact == ["generate", "sleep", "sync"] * 2
        # The engine's weights are the trainer's after the last update.
        for name, value in trainer.model.state_dict().items():
            assert torch.equal(engine.model.state_dict()[name], value), name
    finally:
        trainer.close()
    assert engine.events[-1] == "close"

    RecordingEngine.instances.clear()
    resumed = Trainer(config(engine="vllm", steps=3, vllm_options={"max_model_len": 512}), tmp_path / "run", progress=False)
    try:
        assert resumed.load_checkpoint()
        engine = RecordingEngine.instances[0]
        assert engine.events == ["sync"]  # a resumed run samples from the checkpoint's weights, not the initial ones
    finally:
        resumed.close()


def test_bad_engine_and_worker_pool_names_are_refused_by_name():
    with pytest.raises(ValueError, match="engine must be 'hf' or 'vllm'"):
        config(engine="trt")
    with pytest.raises(ValueError, match="env_workers must be"):
        config(env_workers="slurm")


def test_env_workers_chooses_the_runners_pool(tmp_path):
    trainer = Trainer(config(env_workers="inprocess", num_workers=None), tmp_path / "run", progress=False)
    try:
        assert type(trainer.train_runner.pool).__name__ == "InProcessPool"
    finally:
        trainer.close()
