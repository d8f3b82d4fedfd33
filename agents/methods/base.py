"""The method API shared by every trainer (CRAFT_SPEC.md §5): what a method needs, its options, its per-step
context and statistics, and the loss skeleton `agg(pg + α·KL + extra terms) - h·agg(H)`.

A method is four things:
- `needs` (a `Needs` record): which forward passes and tensors the trainer must produce (teacher weights or none,
  reference, logits, token ids);
- `Options` (a dataclass of documented options, validated by their own metadata; the base reads only the common
  ones: PPO clip, α, h, advantage normalisation);
- `prepare(full_batch, step)`: everything that needs the whole step (token count, gate, Pillar 1's credit, the λ and
  α in force), detached, into a typed `StepContext`, whose `stats` (a `StepStats`) is what stateful parts (Pillar 2)
  learn from at `end_step`;
- the loss terms, pure functions of (token batch, context): `token_advantages`, `reference_kl`, `extra_terms`.

Micro-batching: `loss(micro_batch, ctx.select(rows))` returns that micro-batch's share of the step, so the shares
sum to the full-batch loss. Several updates per rollout: `ctx.select(rows).with_tokens(n)` gives a mini-batch its
own token-mean denominator. `loss(batch)` alone is the single-batch case.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import torch
from torch import Tensor

from craft_bench.agents import losses as L


def option(default: Any, help: str, choices: tuple | None = None, minimum: float | None = None) -> Any:
    """A documented method option: its default, one line of help, optionally the allowed values or a minimum."""
    return field(default=default, metadata={"help": help, "choices": choices, "minimum": minimum})


@dataclass
class CommonOptions:
    """Options every method has (PPO clip, reference KL, entropy bonus, advantage normalisation)."""

    eps_lo: float = option(0.2, "PPO clip: lower bound 1-eps_lo on the ratio", minimum=0.0)
    eps_hi: float = option(0.2, "PPO clip: upper bound 1+eps_hi on the ratio", minimum=0.0)
    dual_clip: float = option(3.0, "dual clip c: for A < 0 the token loss is capped at -c·A")
    alpha: float = option(0.0, "reference-KL coefficient α (k3); 0 disables it and no reference scores are needed", minimum=0.0)
    h: float = option(0.0, "entropy-bonus coefficient; 0 disables it and no logits are needed", minimum=0.0)
    adv_std: str = option("group", "GRPO advantage: divide by the group std ('group') or not ('none', Dr.GRPO)", ("group", "none"))
    agg: str = option("token", "loss aggregation: global token mean ('token', spec §2) or every episode weighted equally "
                      "('episode', as verl's seq-mean-token-mean does per sequence)", ("token", "episode"))
    logits_chunk: int = option(1024, "positions per chunk when a term needs the full vocabulary (entropy, CRINGE)")

    def validate(self) -> None:
        """Raise ValueError naming the first option out of its domain (type, choices, minimum), then the
        method-specific checks of subclasses."""
        for f in fields(self):
            value = getattr(self, f.name)
            expected = type(f.default)
            if expected is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
                setattr(self, f.name, value)
            if type(value) is not expected:
                raise ValueError(f"option {f.name} must be a {expected.__name__}, got {value!r}")
            choices = f.metadata.get("choices")
            if choices is not None and value not in choices:
                raise ValueError(f"option {f.name}={value!r} is not one of {list(choices)}")
            minimum = f.metadata.get("minimum")
            if minimum is not None and not value >= minimum:
                raise ValueError(f"option {f.name} must be >= {minimum:g}, got {value}")
        if self.dual_clip <= 1:
            raise ValueError(f"option dual_clip must be > 1, got {self.dual_clip}")
        if self.logits_chunk < 1:
            raise ValueError(f"option logits_chunk must be >= 1, got {self.logits_chunk}")


TEACHERS = ("old", "ref", "ema")
"""Which weights score the teacher prompt: θ_old (the sampling policy), the reference (initial weights), an EMA of θ."""


@dataclass
class TeacherOptions(CommonOptions):
    """The common options plus the choice of teacher weights (every method with a teacher pass)."""

    teacher: str = option("old", "teacher weights: θ_old ('old'), the reference ('ref'), or an EMA of θ ('ema')", TEACHERS)


@dataclass(frozen=True)
class Needs:
    """What the trainer must compute for a method, per rollout."""

    teacher: str | None = None
    """Weights that score the privileged prompt x+ ("old", "ref" or "ema"); None: no teacher pass at all."""
    reference: bool = False
    """Score the rollout under the reference policy (TokenBatch.ref_logp)."""
    logits: bool = False
    """Pass the student's logits (R, T, V) to the loss (TokenBatch.logits)."""
    tokens: bool = False
    """Pass the sampled token ids (TokenBatch.tokens)."""


@dataclass(frozen=True)
class StepStats:
    """What one step teaches a method's stateful parts (Pillar 2), produced by `prepare` from the whole step."""

    gate_activity: float | None = None
    """Fraction of the step's valid tokens with gate g > 0.5; None for methods without a gate."""

    #: The metric each field is logged under: only `from_metrics` (the external `end_step(metrics)` call) reads it.
    METRIC_NAMES: ClassVar[dict[str, str]] = {"gate_activity": "sdar/gate_activity"}

    @classmethod
    def from_metrics(cls, metrics: Mapping[str, float]) -> StepStats:
        """The statistics inside a metrics dict returned by `loss()` (fields whose metric is absent are None)."""
        return cls(**{name: metrics.get(key) for name, key in cls.METRIC_NAMES.items()})


@dataclass(kw_only=True)
class StepContext:
    """What one step computes once from the full batch; `select(rows)` gives a micro-batch's view of it."""

    n_tokens: float
    """The token-mean denominator: valid tokens of the whole step, or of the mini-batch for one of several updates."""
    alpha: float
    """α in force this step (Pillar 2's value, or the configured one)."""
    step: int
    """Index (from 0) of the training step this context belongs to: the trainer passes its step; without one, the
    number of `end_step` calls this method has seen. Seeds CRINGE's draws and drives RLSD's λ warm-down."""
    row_keys: Tensor
    """(R, 3) int64: (group_id, episode_id, turn_idx) of each row, to check micro-batches line up."""
    row_weight: Tensor | None = None
    """(R,) float: each row's token weight under `agg="episode"` (mean episode length / its episode's length);
    None under the spec's token mean, whose result it leaves bit-identical."""
    stats: StepStats = field(default_factory=StepStats)
    """The step's statistics for `end_step`."""
    metrics: dict[str, float] = field(default_factory=dict)
    """Step-wide metrics for the log (gate statistics, credit statistics, controller values). Never read back."""

    ROW_FIELDS: ClassVar[tuple[str, ...]] = ()
    """Per-row tensor fields of a subclass that `select` must index along with the rows."""

    def select(self, index: Tensor | slice) -> StepContext:
        """The context restricted to some rows, matching `TokenBatch.select(index)`."""
        cpu_index = index.cpu() if isinstance(index, Tensor) else index  # row_keys live on the CPU
        changes: dict[str, Any] = {"row_keys": self.row_keys[cpu_index]}
        for name in ("row_weight", *self.ROW_FIELDS):
            value = getattr(self, name)
            changes[name] = None if value is None else value[index]
        return dataclasses.replace(self, **changes)

    def with_tokens(self, n_tokens: float) -> StepContext:
        """The same context with another token-mean denominator (one mini-batch's valid tokens)."""
        return dataclasses.replace(self, n_tokens=float(n_tokens))


Reduce = Callable[[Sequence[float]], list[float]]
"""Element-wise sum of a list of numbers over data-parallel ranks."""


def local_sum(values: Sequence[float]) -> list[float]:
    """The `Reduce` of a single process: the numbers themselves."""
    return [float(v) for v in values]


def episode_row_weights(batch: L.TokenBatch, reduce: Reduce = local_sum) -> Tensor:
    """(R,) weight of each row's tokens so that every episode of the step carries the same total weight and the
    weights of all valid tokens still sum to their count: mean tokens per episode / this episode's tokens.

    Why: under the global token mean an episode weighs as much as it has tokens, and in multi-turn tasks failed
    episodes run to the turn cap while wins end early, so a group's negative advantages outweigh its positive ones
    on every action the siblings share. An episode is (group_id, episode_id); its rows lie on one data-parallel rank
    (ranks hold whole groups), and only the step's totals go through `reduce`.
    """
    keys = torch.stack([batch.group_id.long(), batch.episode_id.long()], dim=1).cpu()
    episodes, episode_of_row = torch.unique(keys, dim=0, return_inverse=True)
    row_tokens = batch.mask.sum(dim=1).cpu().to(torch.float64)
    episode_tokens = torch.zeros(len(episodes), dtype=torch.float64)
    episode_tokens.index_add_(0, episode_of_row, row_tokens)
    present = episode_tokens > 0  # an episode without a valid token carries no weight and counts for nothing
    n_tokens, n_episodes = reduce([float(row_tokens.sum()), float(present.sum())])
    per_episode = torch.where(present, (n_tokens / max(n_episodes, 1.0)) / episode_tokens.clamp(min=1.0), 0.0)
    return per_episode[episode_of_row].to(torch.float32).to(batch.mask.device)


def row_keys(batch: L.TokenBatch) -> Tensor:
    """(R, 3) int64 (group_id, episode_id, turn_idx), on the CPU."""
    return torch.stack([batch.group_id.long(), batch.episode_id.long(), batch.turn_idx.long()], dim=1).cpu()


def combine_metrics(parts: list[dict[str, float]]) -> dict[str, float]:
    """Merge the metrics of one update's micro-batches: `loss/*` entries are shares and are summed; the rest are
    step-wide (identical in every part) and taken from the first."""
    if not parts:
        raise ValueError("combine_metrics needs at least one micro-batch's metrics")
    merged = dict(parts[0])
    for part in parts[1:]:
        for key, value in part.items():
            if key.startswith("loss/"):
                merged[key] = merged.get(key, 0.0) + value
    return merged


class Method:
    """Base class: the GRPO loss with optional reference KL and entropy bonus. See the module docstring."""

    name: ClassVar[str] = ""
    Options: ClassVar[type[CommonOptions]] = CommonOptions

    def __init__(self, options: CommonOptions) -> None:
        options.validate()
        self.options = options
        self._steps_seen = 0

    # -- what the trainer must compute ---------------------------------------------------------------------------

    @property
    def needs(self) -> Needs:
        """The forward passes and tensors this method's loss reads (reference only when α > 0, logits when h > 0)."""
        return Needs(teacher=None, reference=self.options.alpha > 0, logits=self.options.h > 0, tokens=False)

    @property
    def needs_teacher(self) -> bool:
        return self.needs.teacher is not None

    @property
    def needs_ref(self) -> bool:
        return self.needs.reference

    @property
    def needs_logits(self) -> bool:
        return self.needs.logits

    @property
    def needs_tokens(self) -> bool:
        return self.needs.tokens

    @property
    def adv_std(self) -> str:
        """How episode advantages are normalised within a group ('group' or 'none')."""
        return self.options.adv_std

    def advantages(self, returns: Tensor, group_id: Tensor) -> Tensor:
        """(E,) GRPO advantages of the episodes' returns, normalised as this method's `adv_std` says."""
        return L.grpo_advantages(returns, group_id, self.options.adv_std)

    @property
    def config(self) -> dict[str, Any]:
        """The resolved options as a JSON-serialisable dict; `make_method(name, **config)` rebuilds the method."""
        return dataclasses.asdict(self.options)

    # -- state (Pillar 2) ------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            raise ValueError(f"method {self.name} is stateless but got state keys {sorted(state)}")

    def end_step(self, stats: StepStats | Mapping[str, float]) -> None:
        """Advance per-step state after a step: the trainer passes the context's `StepStats`; external callers may
        pass the metrics dict returned by `loss()` (CRAFT_SPEC §5). A no-op for stateless methods."""
        if not isinstance(stats, StepStats):
            stats = StepStats.from_metrics(stats)
        self._advance(stats)
        self._steps_seen += 1

    def _advance(self, stats: StepStats) -> None:
        """Hook: fold one step's statistics into the method's state."""

    # -- the step context ------------------------------------------------------------------------------------------

    def prepare(self, batch: L.TokenBatch, step: int | None = None, reduce: Reduce | None = None) -> StepContext:
        """Everything that needs the whole step, detached. `batch.logp` is not used and may be None. `step` is the
        training step's index (default: the number of `end_step` calls so far).

        `reduce` sums a list of numbers over data-parallel ranks (agents/distributed.py); every step-wide count
        (the token-mean denominator, the gate's counts) goes through it, so that a rank holding a block of the
        step's groups gets the statistics of the whole step. Default: this process holds the whole step.
        """
        self._check(batch, with_logp=False)
        step = self._steps_seen if step is None else int(step)
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        reduce = reduce or local_sum
        (n_tokens,) = reduce([float(batch.mask.sum())])
        row_weight = episode_row_weights(batch, reduce) if self.options.agg == "episode" else None
        return self._context(batch, reduce, n_tokens=n_tokens, alpha=self.options.alpha, step=step,
                             row_keys=row_keys(batch), row_weight=row_weight)

    def _context(self, batch: L.TokenBatch, reduce: Reduce, **common: Any) -> StepContext:
        """Hook: build this method's context from the full batch and the common fields; step-wide counts go
        through `reduce`."""
        return StepContext(**common)

    # -- the loss terms: pure functions of (batch, ctx) --------------------------------------------------------------

    def token_advantages(self, batch: L.TokenBatch, ctx: StepContext) -> Tensor:
        """(R,) or (R, T) advantages used by the policy loss."""
        return batch.advantages

    def reference_kl(self, batch: L.TokenBatch, ctx: StepContext) -> Tensor:
        """(R, T) per-token reference KL: k3."""
        return L.kl_k3(batch.logp, batch.ref_logp)

    def extra_terms(self, batch: L.TokenBatch, ctx: StepContext) -> dict[str, Tensor]:
        """Per-token (R, T) terms added to pg + α·KL, keyed by their metric name (`loss/<key>`)."""
        return {}

    def loss(self, batch: L.TokenBatch, ctx: StepContext | None = None) -> tuple[Tensor, dict[str, float]]:
        """The loss of `batch` (0-dim, differentiable in logp and logits) and its metrics.

        With a `ctx` from `prepare(full_batch).select(rows)`, the result is this micro-batch's share of the step.
        """
        if ctx is None:
            ctx = self.prepare(batch)
        self._check(batch, with_logp=True)
        if batch.logp is None or not batch.logp.is_floating_point():
            raise ValueError("TokenBatch.logp must be a float tensor (with grad) in loss()")
        if not torch.equal(ctx.row_keys, row_keys(batch)):
            raise ValueError("the StepContext rows do not match the batch rows: pass ctx.select(rows) with batch.select(rows)")
        mask, n = batch.mask, ctx.n_tokens
        opts = self.options
        pg = L.clipped_policy_loss(
            batch.logp, batch.old_logp, self.token_advantages(batch, ctx), opts.eps_lo, opts.eps_hi, opts.dual_clip
        )
        per_token = pg
        terms = {"pg": pg}
        if opts.alpha > 0:
            kl = self.reference_kl(batch, ctx)
            per_token = per_token + ctx.alpha * kl
            terms["kl"] = kl
        for key, term in self.extra_terms(batch, ctx).items():
            per_token = per_token + term
            terms[key] = term
        def aggregate(values: Tensor) -> Tensor:  # agg(): the token mean, each row weighted under agg="episode"
            if ctx.row_weight is not None:
                values = values * ctx.row_weight.to(values.dtype)[:, None]
            return L.token_mean(values, mask, n)

        total = aggregate(per_token)
        if opts.h > 0:
            entropy = L.entropy_from_logits(batch.logits, opts.logits_chunk)
            total = total - opts.h * aggregate(entropy)
            terms["entropy"] = entropy
        metrics = dict(ctx.metrics)
        with torch.no_grad():
            metrics["loss/total"] = float(total)
            for key, term in terms.items():
                metrics[f"loss/{key}"] = float(L.token_mean(term.detach(), mask, n))
        return total, metrics

    def _check(self, batch: L.TokenBatch, with_logp: bool) -> None:
        if not isinstance(batch, L.TokenBatch):
            raise TypeError(f"expected a TokenBatch, got {type(batch).__name__}")
        shape = tuple(batch.mask.shape)
        if batch.mask.dtype != torch.bool or len(shape) != 2:
            raise ValueError(f"mask must be a 2-D bool tensor, got {batch.mask.dtype} of shape {shape}")
        needs = self.needs
        needed = {"old_logp": True, "logp": with_logp, "teacher_logp": needs.teacher is not None, "ref_logp": needs.reference}
        for name, required in needed.items():
            value = getattr(batch, name)
            if required and value is None:
                raise ValueError(f"method {self.name} needs TokenBatch.{name}, which is None")
            if value is not None and tuple(value.shape) != shape:
                raise ValueError(f"TokenBatch.{name} has shape {tuple(value.shape)}, expected {shape} like mask")
        for name in ("advantages", "group_id", "episode_id", "turn_idx"):
            value = getattr(batch, name)
            if tuple(value.shape) != shape[:1]:
                raise ValueError(f"TokenBatch.{name} has shape {tuple(value.shape)}, expected ({shape[0]},)")
        if needs.logits and with_logp:
            if batch.logits is None:
                raise ValueError(f"method {self.name} needs TokenBatch.logits (R, T, V), which is None")
            if tuple(batch.logits.shape[:2]) != shape:
                raise ValueError(f"TokenBatch.logits has shape {tuple(batch.logits.shape)}, expected {shape} + (V,)")
        if needs.tokens and with_logp:
            if batch.tokens is None:
                raise ValueError(f"method {self.name} needs TokenBatch.tokens (sampled ids), which is None")
            if tuple(batch.tokens.shape) != shape:
                raise ValueError(f"TokenBatch.tokens has shape {tuple(batch.tokens.shape)}, expected {shape} like mask")


class TeacherMethod(Method):
    """A method whose loss reads the teacher's log-probs: the trainer scores x+ with the weights its `teacher`
    option names."""

    Options: ClassVar[type[CommonOptions]] = TeacherOptions

    @property
    def needs(self) -> Needs:
        return dataclasses.replace(super().needs, teacher=self.options.teacher)
