"""Rollout engines: sample responses token-in/token-out with the sampler's log-probs; and `response_logprobs`, the
one function that scores fixed responses (θ_old, the reference, the teacher, and the differentiable θ).

Sampling, precisely (what the log-probs mean and what is reproducible):

1. Each sample draws from `softmax(logits / T)` restricted to its top-p nucleus and renormalised; `Generation.logprobs`
   are the log-probs of the sampled tokens under exactly that distribution. At `T = 1, top_p = 1` they equal what
   `response_logprobs` returns for the same ids (up to float rounding between the cached and the full forward
   pass); at `top_p < 1` they are those of the renormalised nucleus, so they exceed the model's own log-probs.
   At `T = 0` (greedy) the sampled distribution is a point mass, so the log-probs reported are the model's own
   (`T = 1`) log-probs of the chosen tokens instead, which is what a trainer can use.
2. Every sample owns a `torch.Generator` seeded with its own seed and consumes exactly one uniform number per
   generated token (inverse-CDF sampling), so its tokens depend only on its seed, its prompt and the logits.
   Exact: the same prompts, batch size and seeds give identical ids and log-probs. Across batch compositions a
   sample changes only through float rounding of the batched forward pass (padding, matmul shapes), which can
   flip a token where two cumulative probabilities are within rounding of its uniform draw.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch


@dataclass(frozen=True)
class SamplingParams:
    """How responses are sampled."""

    temperature: float = 1.0
    """Softmax temperature; 0 means greedy."""
    top_p: float = 1.0
    """Nucleus: sample among the most likely tokens whose cumulative probability reaches top_p (1 = whole vocab)."""
    max_new_tokens: int = 32
    """A response stops here if no stop token came first (then `Generation.finished` is False)."""
    stop_token_ids: tuple[int, ...] = ()
    """A response ends with the first of these it samples (kept in the response): EOS, end of turn, newline."""

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


@dataclass(frozen=True)
class Generation:
    """One sampled response: its exact token ids (the stop token included) and the sampler's log-probs."""

    token_ids: list[int]
    logprobs: list[float]
    finished: bool
    """True when the response ended on a stop token, False when it hit max_new_tokens."""


@runtime_checkable
class RolloutEngine(Protocol):
    """What rollouts need from a model server (Hugging Face here; vLLM can slot in): sampling only.

    Scoring is not part of it, by design: θ_old, the reference and the teacher are scored by the trainer's own
    model with `response_logprobs` (as verl computes old and reference log-probs on the actor, not the rollout
    server), so one function with one batching and padding makes every log-prob the trainer subtracts.
    """

    def generate(self, prompt_ids: list[list[int]], sampling: SamplingParams, seeds: list[int]) -> list[Generation]:
        """One response per prompt, the i-th sampled with its own generator seeded by seeds[i]."""
        ...


class HFEngine:
    """A Hugging Face causal LM as a rollout engine: left-padded batches, explicit position ids, KV cache.

    `max_batch_size` bounds how many sequences go through one forward pass; prompts are grouped by length first
    (a deterministic order), so padding stays small.
    """

    def __init__(self, model: torch.nn.Module, pad_token_id: int, max_batch_size: int = 32):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.model = model
        self.pad_id = int(pad_token_id)
        self.max_batch_size = max_batch_size

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def generate(self, prompt_ids: list[list[int]], sampling: SamplingParams, seeds: list[int]) -> list[Generation]:
        if len(seeds) != len(prompt_ids):
            raise ValueError(f"need one seed per prompt: {len(prompt_ids)} prompts, {len(seeds)} seeds")
        for index, prompt in enumerate(prompt_ids):
            if len(prompt) == 0:
                raise ValueError(f"prompt {index} is empty: a prompt needs at least one token")
        results: list[Generation | None] = [None] * len(prompt_ids)
        for chunk in _length_sorted_chunks([len(p) for p in prompt_ids], self.max_batch_size):
            generations = self._generate_batch([prompt_ids[i] for i in chunk], sampling, [seeds[i] for i in chunk])
            for index, generation in zip(chunk, generations):
                results[index] = generation
        return results  # type: ignore[return-value]

    def _generate_batch(self, prompts: list[list[int]], sampling: SamplingParams, seeds: list[int]) -> list[Generation]:
        device = self.device
        input_ids, attention_mask = left_pad(prompts, self.pad_id, device)
        position_ids = _positions(attention_mask)
        generators = [torch.Generator(device=device).manual_seed(int(seed)) for seed in seeds]
        stop = torch.tensor(sorted(set(sampling.stop_token_ids)), dtype=torch.long, device=device)
        tokens: list[list[int]] = [[] for _ in prompts]
        logprobs: list[list[float]] = [[] for _ in prompts]
        finished = [False] * len(prompts)
        # The original row of each batch row; None for a finished row kept only because the cache cannot drop it.
        live: list[int | None] = list(range(len(prompts)))
        cache = None
        cache_arg = _cache_argument(self.model)
        # The LM head runs over every prompt position although only the last is sampled from: `logits_to_keep=1`
        # would be 4-6% faster but rounds differently at some batch shapes, and published rows would not reproduce.
        with eval_mode(self.model), torch.inference_mode():
            for _ in range(sampling.max_new_tokens):
                out = self.model(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    position_ids=position_ids,
                    use_cache=True,
                    **{cache_arg: cache},
                )
                cache = getattr(out, cache_arg)
                next_tokens, next_logprobs = sample_next(out.logits[:, -1, :].float(), sampling, generators)
                stopped = torch.isin(next_tokens, stop).tolist()
                outputs = zip(next_tokens.tolist(), next_logprobs.tolist(), stopped)
                for row, (token, logprob, done) in enumerate(outputs):
                    origin = live[row]
                    if origin is not None:
                        tokens[origin].append(token)
                        logprobs[origin].append(logprob)
                        finished[origin] = done
                        live[row] = None if done else origin
                keep = [row for row, origin in enumerate(live) if origin is not None]
                if not keep:
                    break
                if len(keep) < len(live) and hasattr(cache, "batch_select_indices"):
                    # Drop finished rows, so that stragglers decode at the cost of a smaller batch.
                    index = torch.tensor(keep, device=device)
                    cache.batch_select_indices(index)
                    live = [live[row] for row in keep]
                    generators = [generators[row] for row in keep]
                    next_tokens, attention_mask, position_ids = (
                        tensor[index] for tensor in (next_tokens, attention_mask, position_ids)
                    )
                input_ids = next_tokens[:, None]
                attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(live), 1)], dim=1)
                position_ids = position_ids[:, -1:] + 1
        return [Generation(tokens[i], logprobs[i], finished[i]) for i in range(len(prompts))]


def sample_next(
    logits: torch.Tensor, sampling: SamplingParams, generators: Sequence[torch.Generator]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row from (rows, V) float logits; returns (token ids (rows,), their log-probs (rows,)).

    Inverse-CDF sampling with one uniform draw per row from that row's own generator (see the module docstring).
    """
    model_logp = torch.log_softmax(logits, dim=-1)
    if sampling.temperature == 0:
        tokens = model_logp.argmax(dim=-1)
        return tokens, model_logp.gather(-1, tokens[:, None]).squeeze(-1)
    logp = torch.log_softmax(logits / sampling.temperature, dim=-1)
    if sampling.top_p < 1.0:
        sorted_logp, order = logp.sort(dim=-1, descending=True)
        sorted_probs = sorted_logp.exp()
        # Keep a token when the mass strictly before it is below top_p: the most likely token always survives.
        outside = (sorted_probs.cumsum(dim=-1) - sorted_probs) >= sampling.top_p
        sorted_logp = sorted_logp.masked_fill(outside, float("-inf"))
        nucleus = torch.full_like(logp, float("-inf")).scatter(-1, order, sorted_logp)
        logp = torch.log_softmax(nucleus, dim=-1)
    probs = logp.exp()
    cdf = probs.cumsum(dim=-1)
    uniforms = torch.cat([torch.rand(1, generator=g, device=logits.device) for g in generators])
    # First index whose cdf exceeds the draw: a zero-probability token never exceeds its predecessor's cdf, so it
    # is never chosen; the clamp covers a draw that rounding puts past the last possible token.
    tokens = torch.searchsorted(cdf, (uniforms * cdf[:, -1])[:, None], right=True).squeeze(-1)
    positions = torch.arange(logits.shape[-1], device=logits.device)
    last_possible = torch.where(probs > 0, positions, 0).max(dim=-1).values
    tokens = torch.minimum(tokens, last_possible)
    sampled_logp = logp.gather(-1, tokens[:, None]).squeeze(-1)
    return tokens, sampled_logp


def response_logprobs(
    model: torch.nn.Module,
    prompt_ids: Sequence[Sequence[int]],
    response_ids: Sequence[Sequence[int]],
    *,
    pad_token_id: int = 0,
    return_logits: bool = False,
    micro_batch: int | None = None,
    distinct: bool = False,
) -> tuple[torch.Tensor, ...]:
    """log π(y_t | x, y_<t) for every response token, differentiable when called outside inference mode.

    Returns `(logp, mask)`, both (rows, T) with T the longest response (float32 log-probs, 0 where mask is False),
    then `logits` (rows, T, V) if `return_logits`.
    Layout per micro-batch: prompts left-padded and responses right-padded so every response starts at the same
    column; only the response positions go through the LM head when the model supports `logits_to_keep`.
    `micro_batch` bounds the rows per forward pass, which groups rows of similar lengths (`micro_batch_order`); the
    results do not depend on it beyond float rounding. `distinct` scores each distinct (prompt, response) pair once
    and gives its outputs to every row that repeats it (`distinct_rows`): GRPO siblings share their first prompt and
    often their first replies; again the results differ by float rounding only.
    """
    if len(prompt_ids) != len(response_ids):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(response_ids)} responses")
    if len(prompt_ids) == 0:
        raise ValueError("no rows to score")
    if distinct:
        firsts, inverse = distinct_rows(prompt_ids, response_ids)
        if len(firsts) < len(prompt_ids):
            outputs = response_logprobs(
                model, [prompt_ids[i] for i in firsts], [response_ids[i] for i in firsts],
                pad_token_id=pad_token_id, return_logits=return_logits, micro_batch=micro_batch,
            )
            where = torch.tensor(inverse)
            return tuple(tensor[where.to(tensor.device)] for tensor in outputs)
    for index, (prompt, response) in enumerate(zip(prompt_ids, response_ids)):
        if len(prompt) == 0:
            raise ValueError(f"row {index}: the prompt is empty (the first response token needs a context)")
        if len(response) == 0:
            raise ValueError(f"row {index}: the response is empty")
    device = next(model.parameters()).device
    rows = len(prompt_ids)
    width = max(len(r) for r in response_ids)
    step = micro_batch or rows
    # Micro-batches of similar lengths: rows are grouped by (prompt, response) length, so each forward pads only to
    # its own longest prompt and response instead of the longest of rows that happen to be neighbours. Outputs come
    # back in the caller's row order; only float rounding of the batched matmuls depends on the grouping.
    order = micro_batch_order([len(p) for p in prompt_ids], [len(r) for r in response_ids], step)
    parts: list[tuple[torch.Tensor, ...]] = []
    for chunk in order:
        prompts = [list(map(int, prompt_ids[i])) for i in chunk]
        responses = [list(map(int, response_ids[i])) for i in chunk]
        part = _score_chunk(model, prompts, responses, max(len(r) for r in responses), pad_token_id, device, return_logits)
        parts.append(tuple(pad_columns(tensor, width) for tensor in part))
    outputs = [torch.cat(column, dim=0) for column in zip(*parts)]
    flat = [i for chunk in order for i in chunk]
    if flat != list(range(rows)):
        inverse = torch.empty(rows, dtype=torch.long)
        inverse[torch.tensor(flat)] = torch.arange(rows)
        outputs = [tensor[inverse.to(tensor.device)] for tensor in outputs]
    return tuple(outputs)


def distinct_rows(prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]]) -> tuple[list[int], list[int]]:
    """(`firsts`, `inverse`): the index of the first row of each distinct (prompt, response) pair, in row order, and
    for every row the position in `firsts` of the pair it repeats; rows == [rows[firsts[k]] for k in inverse]."""
    position: dict[tuple[tuple[int, ...], tuple[int, ...]], int] = {}
    firsts: list[int] = []
    inverse: list[int] = []
    for index, (prompt, response) in enumerate(zip(prompt_ids, response_ids)):
        key = (tuple(map(int, prompt)), tuple(map(int, response)))
        if key not in position:
            position[key] = len(firsts)
            firsts.append(index)
        inverse.append(position[key])
    return firsts, inverse


def micro_batch_order(prompt_lengths: Sequence[int], response_lengths: Sequence[int], size: int) -> list[list[int]]:
    """Row indices in micro-batches of at most `size` rows, each of rows of similar lengths (sorted by prompt then
    response length, stable, so deterministic); one batch in row order when every row fits in one."""
    rows = len(prompt_lengths)
    if size >= rows:
        return [list(range(rows))]
    order = sorted(range(rows), key=lambda i: (prompt_lengths[i], response_lengths[i]))
    return [order[i : i + size] for i in range(0, rows, size)]


def pad_columns(values: torch.Tensor, width: int) -> torch.Tensor:
    """A (rows, T, ...) tensor right-padded on dim 1 with zeros (False for masks) to (rows, width, ...)."""
    missing = width - values.shape[1]
    if missing == 0:
        return values
    pad = values.new_zeros((values.shape[0], missing, *values.shape[2:]))
    return torch.cat([values, pad], dim=1)


def _score_chunk(
    model: torch.nn.Module,
    prompts: list[list[int]],
    responses: list[list[int]],
    width: int,
    pad_token_id: int,
    device: torch.device,
    return_logits: bool,
) -> tuple[torch.Tensor, ...]:
    prompt_tokens, prompt_mask = left_pad(prompts, pad_token_id, device)
    response_tokens, response_mask = right_pad(responses, pad_token_id, device, width=width)
    input_ids = torch.cat([prompt_tokens, response_tokens], dim=1)
    attention_mask = torch.cat([prompt_mask, response_mask], dim=1)
    kwargs = {}
    if _supports_logits_to_keep(model):
        # Logits at the last prompt column and every response column but the last predict the response tokens.
        kwargs["logits_to_keep"] = width + 1
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=_positions(attention_mask), **kwargs)
    logits = out.logits[:, -(width + 1) : -1, :].float()
    log_norm = torch.logsumexp(logits, dim=-1)
    logp = logits.gather(-1, response_tokens[:, :, None]).squeeze(-1) - log_norm
    mask = response_mask.bool()
    results: list[torch.Tensor] = [logp.masked_fill(~mask, 0.0), mask]
    if return_logits:
        results.append(logits)
    return tuple(results)


def left_pad(
    sequences: Sequence[Sequence[int]], pad_token_id: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask), both (rows, longest) long tensors, padding on the left."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), int(pad_token_id), dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        if len(sequence):
            ids[row, width - len(sequence) :] = torch.as_tensor(list(sequence), dtype=torch.long)
            mask[row, width - len(sequence) :] = 1
    return ids.to(device), mask.to(device)


def right_pad(
    sequences: Sequence[Sequence[int]],
    pad_value: float,
    device: torch.device | str = "cpu",
    width: int | None = None,
    dtype: torch.dtype = torch.long,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, mask), both (rows, width or longest), padding on the right with `pad_value` (mask is long 0/1)."""
    width = max(len(s) for s in sequences) if width is None else width
    values = torch.full((len(sequences), width), pad_value, dtype=dtype)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, sequence in enumerate(sequences):
        if len(sequence) > width:
            raise ValueError(f"row {row} has {len(sequence)} values, more than the width {width}")
        if len(sequence):
            values[row, : len(sequence)] = torch.as_tensor(list(sequence), dtype=dtype)
            mask[row, : len(sequence)] = 1
    return values.to(device), mask.to(device)


def _positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that count only real tokens, so a left-padded prompt sees the positions it would see alone."""
    return (attention_mask.cumsum(dim=-1) - 1).clamp(min=0)


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode for the duration: a trainer shares its model with the engine and must get its own mode back."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _cache_argument(model: torch.nn.Module) -> str:
    """The name under which the model takes and returns its KV cache: `cache` since transformers 5.x (which warns on
    the old name), `past_key_values` before."""
    inner = getattr(model, "module", model)
    return "cache" if "cache" in inspect.signature(inner.forward).parameters else "past_key_values"


def _supports_logits_to_keep(model: torch.nn.Module) -> bool:
    # A data-parallel wrapper (DDP) forwards keyword arguments to the model it wraps: ask that model.
    inner = getattr(model, "module", model)
    return "logits_to_keep" in inspect.signature(inner.forward).parameters


def _length_sorted_chunks(lengths: Sequence[int], size: int) -> list[list[int]]:
    """Indices grouped into chunks of at most `size`, longest first (a stable, deterministic order)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i : i + size] for i in range(0, len(order), size)]
