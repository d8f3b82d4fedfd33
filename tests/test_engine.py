"""Tests of the rollout engine: seeded sampling, sampler log-probs against scoring, padding, differentiable scoring.
The model is a randomly initialised tiny Llama over a byte-level BPE trained here on a few strings (no downloads)."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from transformers.cache_utils import Cache

from craft_bench.agents.engine import (
    HFEngine,
    RolloutEngine,
    SamplingParams,
    distinct_rows,
    response_logprobs,
    sample_next,
)

TRAINING_TEXT = [
    "Task: reach 5\nRecent turns:\nObservation: Total 2. Noise 17\nAction: add 2\n"
    "Current observation: Reach 5. Noise 12\nAdmissible actions: add 1 | add 2 | add 3 | crash\nAction: add 3\n",
    "Privileged guidance (teacher only):\nExpert plan from here: add 3; add 2\n",
    "<action>add 1</action> go to desk 1, take mug 2 from table 1, open drawer 3",
]
#: A minimal chat template: system and user turns, then the assistant cue.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<eos>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_tokenizer(chat: bool = False) -> PreTrainedTokenizerFast:
    """A byte-level BPE (every string round-trips) with <pad>=0 and <eos>=1; a chat template when `chat`."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<pad>", "<eos>", "<|system|>", "<|user|>", "<|assistant|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(TRAINING_TEXT * 4, trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>")
    if chat:
        wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def random_llama(vocab_size: int, seed: int = 0, max_positions: int = 512) -> LlamaForCausalLM:
    """A tiny randomly initialised Llama (2 layers, hidden 64), deterministic for `seed`."""
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        pad_token_id=0,
        eos_token_id=1,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.eval()


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return build_tokenizer()


@pytest.fixture(scope="module")
def engine(tokenizer) -> HFEngine:
    torch.set_num_threads(1)
    return HFEngine(random_llama(len(tokenizer)), pad_token_id=0, max_batch_size=8)


@pytest.fixture(scope="module")
def prompts(tokenizer) -> list[list[int]]:
    texts = ["Task: reach 5\nAction:", "Admissible actions: add 1 | add 2 | add 3 | crash\nAction:", "go"]
    return [tokenizer.encode(text) for text in texts]


SAMPLING = SamplingParams(temperature=1.0, max_new_tokens=12, stop_token_ids=(1,))


def test_hf_engine_satisfies_the_protocol(engine):
    assert isinstance(engine, RolloutEngine)


def test_same_prompts_and_seeds_reproduce_exactly(engine, prompts):
    first = engine.generate(prompts, SAMPLING, [11, 12, 13])
    second = engine.generate(prompts, SAMPLING, [11, 12, 13])
    assert first == second
    other_seeds = engine.generate(prompts, SAMPLING, [21, 22, 23])
    assert [g.token_ids for g in other_seeds] != [g.token_ids for g in first]


def test_a_sample_does_not_depend_on_its_batch_neighbours(engine, prompts):
    batched = engine.generate(prompts, SAMPLING, [5, 6, 7])
    for prompt, seed, expected in zip(prompts, [5, 6, 7], batched):
        alone = engine.generate([prompt], SAMPLING, [seed])[0]
        assert alone.token_ids == expected.token_ids
        assert alone.logprobs == pytest.approx(expected.logprobs, abs=1e-5)


def test_sampler_logprobs_at_temperature_one_equal_the_scoring_function(engine, prompts):
    generations = engine.generate(prompts, SAMPLING, [1, 2, 3])
    with torch.no_grad():
        scored, mask = response_logprobs(engine.model, prompts, [g.token_ids for g in generations])
    for row, generation in enumerate(generations):
        assert int(mask[row].sum()) == len(generation.token_ids)
        assert scored[row, : len(generation.token_ids)].tolist() == pytest.approx(generation.logprobs, abs=1e-5)


def test_nucleus_logprobs_are_renormalised_so_they_exceed_the_models_own(engine, prompts):
    # Why the trainer's sampler-gap health check is NaN at top_p < 1: the two are different distributions.
    nucleus = SamplingParams(temperature=1.0, top_p=0.5, max_new_tokens=6, stop_token_ids=(1,))
    generations = engine.generate(prompts, nucleus, [1, 2, 3])
    with torch.no_grad():
        scored, _ = response_logprobs(engine.model, prompts, [g.token_ids for g in generations])
    for row, generation in enumerate(generations):
        own = scored[row, : len(generation.token_ids)]
        assert torch.all(torch.tensor(generation.logprobs) >= own - 1e-5)
        assert bool((torch.tensor(generation.logprobs) > own + 1e-3).any())


def test_tempered_logprobs_are_those_of_the_tempered_distribution(engine, prompts):
    sampling = SamplingParams(temperature=0.5, max_new_tokens=4, stop_token_ids=(1,))
    generation = engine.generate(prompts[:1], sampling, [3])[0]
    with torch.inference_mode():
        logits = engine.model(torch.tensor([prompts[0] + generation.token_ids])).logits[0].float()
    start = len(prompts[0]) - 1
    expected = [
        torch.log_softmax(logits[start + t] / 0.5, dim=-1)[token].item() for t, token in enumerate(generation.token_ids)
    ]
    assert generation.logprobs == pytest.approx(expected, abs=1e-4)


def test_greedy_picks_the_argmax_and_ignores_seeds(engine, prompts):
    greedy = SamplingParams(temperature=0.0, max_new_tokens=5, stop_token_ids=(1,))
    first = engine.generate(prompts, greedy, [1, 2, 3])
    assert first == engine.generate(prompts, greedy, [7, 8, 9])
    with torch.inference_mode():
        logits = engine.model(torch.tensor([prompts[0]])).logits[0, -1]
    assert first[0].token_ids[0] == int(logits.argmax())


def test_generation_stops_at_a_stop_token_and_keeps_it(engine, prompts):
    stop_on_anything = SamplingParams(temperature=1.0, max_new_tokens=8, stop_token_ids=tuple(range(400)))
    for generation in engine.generate(prompts, stop_on_anything, [1, 2, 3]):
        assert len(generation.token_ids) == 1 and generation.finished
    never = SamplingParams(temperature=1.0, max_new_tokens=3, stop_token_ids=())
    for generation in engine.generate(prompts, never, [1, 2, 3]):
        assert len(generation.token_ids) == 3 and not generation.finished


def test_top_p_samples_only_inside_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(64, 1)
    sampling = SamplingParams(temperature=1.0, top_p=0.7, max_new_tokens=1)
    generators = [torch.Generator().manual_seed(seed) for seed in range(64)]
    tokens, logp = sample_next(logits, sampling, generators)
    assert set(tokens.tolist()) == {0, 1}
    expected = torch.log(torch.tensor([0.5, 0.3]) / 0.8)
    assert torch.allclose(logp, expected[tokens], atol=1e-6)


def test_response_logprobs_match_an_unpadded_forward_pass_and_carry_gradients(engine, prompts):
    responses = [[5, 9, 1], [7], [4, 4, 4, 4, 1]]
    logp, mask, logits = response_logprobs(engine.model, prompts, responses, return_logits=True, micro_batch=2)
    assert logp.shape == mask.shape == (3, 5)
    assert logits.shape == (3, 5, engine.model.config.vocab_size)
    assert mask.tolist() == [[True] * 3 + [False] * 2, [True] + [False] * 4, [True] * 5]
    for row, (prompt, response) in enumerate(zip(prompts, responses)):
        with torch.no_grad():
            full = engine.model(torch.tensor([prompt + response])).logits[0].float().log_softmax(-1)
        direct = full[len(prompt) - 1 : -1].gather(-1, torch.tensor(response)[:, None]).squeeze(-1)
        assert torch.allclose(logp[row, : len(response)].detach(), direct, atol=1e-5)
        assert torch.allclose(logits[row, : len(response)].detach().log_softmax(-1), full[len(prompt) - 1 : -1], atol=1e-5)
    assert torch.all(logp[~mask] == 0)
    (logp * mask).sum().backward()
    assert engine.model.model.embed_tokens.weight.grad is not None
    engine.model.zero_grad(set_to_none=True)


def test_micro_batching_does_not_change_scores(engine, prompts):
    responses = [[5, 9, 1], [7], [4, 4, 4, 4, 1]]
    with torch.no_grad():
        whole, _ = response_logprobs(engine.model, prompts, responses)
        pieces, _ = response_logprobs(engine.model, prompts, responses, micro_batch=1)
    assert torch.allclose(whole, pieces, atol=1e-5)


def test_distinct_scoring_runs_each_repeated_row_once_and_gives_every_row_its_scores(engine, prompts):
    rows_prompts = [prompts[0], prompts[1], prompts[0], prompts[2], prompts[0]]
    responses = [[5, 9, 1], [7], [5, 9, 1], [4, 4, 4, 4, 1], [5, 9]]  # rows 0 and 2 repeat; row 4 differs by reply
    assert distinct_rows(rows_prompts, responses) == ([0, 1, 3, 4], [0, 1, 0, 2, 3])
    forward_rows = []
    hook = engine.model.register_forward_pre_hook(lambda _, args, kwargs: forward_rows.append(len(kwargs["input_ids"])),
                                                  with_kwargs=True)
    try:
        with torch.no_grad():
            plain = response_logprobs(engine.model, rows_prompts, responses, return_logits=True)
            rows_plain, forward_rows[:] = sum(forward_rows), []
            distinct = response_logprobs(engine.model, rows_prompts, responses, return_logits=True, distinct=True)
    finally:
        hook.remove()
    assert (rows_plain, sum(forward_rows)) == (5, 4)
    for got, expected in zip(distinct, plain):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_bad_input_is_named(engine, prompts):
    with pytest.raises(ValueError, match="one seed per prompt"):
        engine.generate(prompts, SAMPLING, [1])
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        engine.generate([[]], SAMPLING, [1])
    with pytest.raises(ValueError, match="the prompt is empty"):
        response_logprobs(engine.model, [[]], [[1, 2]])
    with pytest.raises(ValueError, match="the response is empty"):
        response_logprobs(engine.model, [[1, 2]], [[]])
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        response_logprobs(engine.model, [[1], [2]], [[3]])
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1.0)


def test_engine_calls_leave_the_model_mode_as_they_found_it(engine, prompts):
    engine.model.train()
    engine.generate(prompts, SAMPLING, [1, 2, 3])
    assert engine.model.training
    engine.model.eval()


def test_dropping_finished_rows_matches_keeping_them(engine, prompts, monkeypatch):
    # Stop on a common token so rows finish at different steps and the batch shrinks while others go on.
    sampling = SamplingParams(temperature=1.0, max_new_tokens=12, stop_token_ids=tuple(range(1, 400, 3)))
    compacted = engine.generate(prompts, sampling, [4, 5, 6])
    assert len({len(g.token_ids) for g in compacted}) > 1
    monkeypatch.delattr(Cache, "batch_select_indices")
    kept = engine.generate(prompts, sampling, [4, 5, 6])
    assert [g.token_ids for g in kept] == [g.token_ids for g in compacted]
    assert [g.finished for g in kept] == [g.finished for g in compacted]
    for a, b in zip(kept, compacted):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)


def test_the_first_sampled_token_takes_its_log_prob_from_a_full_forward_pass_bit_for_bit():
    # Published rows were made with this prefill: the LM head over every prompt position. Computing it at the last
    # position only (`logits_to_keep=1`) is the same math but other float rounding at some batch shapes (8 of these
    # 20 on this machine); a sampled log-prob that moves by 1e-8 changes a step's loss, and rows stop reproducing.
    from craft_bench.agents.engine import _positions, left_pad

    model = random_llama(vocab_size=1024, seed=3, max_positions=512).eval()
    engine = HFEngine(model, pad_token_id=0, max_batch_size=64)
    generator = torch.Generator().manual_seed(0)
    one_token = SamplingParams(temperature=1.0, max_new_tokens=1, stop_token_ids=())
    for rows in (1, 2, 4, 8, 16):
        for length in (37, 100, 180, 300):
            prompts = torch.randint(1, 1024, (rows, length), generator=generator).tolist()
            generations = engine.generate(prompts, one_token, list(range(rows)))
            ids, mask = left_pad(prompts, 0, torch.device("cpu"))
            with torch.inference_mode():
                logits = model(input_ids=ids, attention_mask=mask, position_ids=_positions(mask)).logits[:, -1].float()
            logp = torch.log_softmax(logits, dim=-1)
            expected = [logp[row, g.token_ids[0]].item() for row, g in enumerate(generations)]
            assert [g.logprobs[0] for g in generations] == expected, (rows, length)
