"""The settings of a tiny-model build (`TinyBudget`) and its named presets: test (seconds), smoke, default.
Every field goes into the cache key, together with `RECIPE_VERSION`."""

from __future__ import annotations

from dataclasses import dataclass

from craft_bench.agents.tiny.model import TinyShape
from craft_bench.agents.tiny.tokenizer import id_pieces_pattern

#: Bump when the build recipe changes in a way that changes the model, so cached builds are not reused.
#: 3: expert episodes are played on the group runner (seeds per group), free-form action formats.
RECIPE_VERSION = "3"


#: Budget fields added after models were built and shipped, with the value that reproduces the older recipe: at that
#: value a field stays out of the cache key, so every older build keeps its key (and a shipped model its pin).
LATER_FIELDS: dict[str, object] = {
    "prompt_loss_weight": 0.0, "id_prefix": "", "id_body_length": 0, "relabel_ids": False, "copy_pretrain_steps": 0,
    "student_labels": "plan", "collect_split": "train",
}
#: Where the student-format examples' labels come from (`TinyBudget.student_labels`).
STUDENT_LABELS = ("plan", "search")


@dataclass(frozen=True)
class TinyBudget:
    """Every setting of a tiny-model build; all of them go into the cache key."""

    n_train_tasks: int = 480
    """Task draws to collect expert episodes on: a seeded shuffle of the split, cycled when the split has fewer
    tasks (a task drawn twice gets other seeds and other perturbations)."""
    clean_per_task: int = 0
    """Unperturbed expert episodes per task draw."""
    perturbed_per_task: int = 1
    """Perturbed expert episodes per task draw."""
    perturb_prob: float = 0.3
    """In a perturbed episode, the probability of executing a perturbation instead of the expert's action."""
    invalid_share: float = 0.3
    """The share of perturbations meant to be invalid (stale or malformed actions, see `data.perturbation`)."""
    max_episode_steps: int = 40
    """Cap on the length of a collected episode."""
    history_turns: int = 2
    """H of the prompts (`PromptConfig.history_turns`)."""
    teacher_fraction: float = 0.5
    """Fraction of the states rendered in the teacher format (privileged block + student prompt)."""
    vocab_size: int = 2048
    hidden_size: int = 256
    intermediate_size: int = 512
    num_layers: int = 4
    num_heads: int = 4
    max_positions: int = 2048
    """Longest prompt + reply the model is built for; longer training examples are dropped (and counted)."""
    epochs: float = 3.0
    batch_size: int = 16
    lr: float = 1e-3
    warmup_frac: float = 0.05
    weight_decay: float = 0.01
    prompt_loss_weight: float = 0.0
    """Weight of a language-modelling loss on the prompt tokens, added to the reply loss. Prompts repeat the names
    they hold (a question's entity in the retrieved passages, a product in its page), so predicting them trains the
    copying that replies need. The forward pass over the prompt is paid anyway; the LM head over the prompt positions
    is the added cost (docs/tiny_models.md measures it)."""
    id_prefix: str = ""
    """With `id_body_length`: identifiers that replies copy, written `id_prefix` + `id_body_length` lowercase letters
    or digits (WebShop's product ids: "b0" and 8). The tokenizer cuts their bodies into pairs
    (`tokenizer.id_pieces_pattern`); "" leaves every word to BPE."""
    id_body_length: int = 0
    relabel_ids: bool = False
    """Give every training example fresh random ids of that format (`sft.relabel_ids`), so that the model copies ids
    from its prompt instead of memorising the catalogue's."""
    copy_pretrain_steps: int = 0
    """Updates of copy pre-training (`copying.pretrain_copying`) before fine-tuning; 0 skips it. It forms the
    attention heads that copy an unseen name from the prompt (docs/tiny_models.md measures when they form)."""
    student_labels: str = "plan"
    """Who labels the states rendered in the student format, and plays the episodes: `plan`, the planner (the
    teacher's label too), or `search`, the environment's searching expert (`data.SEARCHING_EXPERTS`), which uses only
    what the student prompt shows and looks for hidden objects instead of going straight to them; teacher-format
    states keep the planner's label. Only environments with a searching expert accept `search`."""
    collect_split: str = "train"
    """The split the expert episodes are played on. A split of its own (TextWorld's `sft`) keeps the games the model
    is fine-tuned on out of `train`, where RL draws its tasks: a 2-layer model memorises the few games it saw, and its
    RL groups then all win and carry no advantage (docs/tiny_models.md). Evaluation splits (`valid*`, `test*`) are
    refused."""

    def __post_init__(self) -> None:
        for name in ("n_train_tasks", "max_episode_steps", "vocab_size", "hidden_size", "intermediate_size",
                     "num_layers", "num_heads", "max_positions", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"TinyBudget.{name} must be >= 1, got {getattr(self, name)}")
        if self.student_labels not in STUDENT_LABELS:
            raise ValueError(f"TinyBudget.student_labels must be one of {', '.join(STUDENT_LABELS)}, got "
                             f"{self.student_labels!r}")
        if not isinstance(self.collect_split, str) or not self.collect_split:
            raise ValueError(f"TinyBudget.collect_split must be a split name, got {self.collect_split!r}")
        if self.collect_split.startswith(("valid", "test")):
            raise ValueError(f"TinyBudget.collect_split {self.collect_split!r} is an evaluation split: a model "
                             "fine-tuned on it would be evaluated on its own training games")
        if self.copy_pretrain_steps < 0:
            raise ValueError(f"TinyBudget.copy_pretrain_steps must be >= 0, got {self.copy_pretrain_steps}")
        if self.clean_per_task < 0 or self.perturbed_per_task < 0:
            raise ValueError("TinyBudget.clean_per_task and perturbed_per_task must be >= 0")
        if self.clean_per_task + self.perturbed_per_task < 1:
            raise ValueError("TinyBudget needs at least one episode per task (clean_per_task + perturbed_per_task)")
        if bool(self.id_prefix) != bool(self.id_body_length):
            raise ValueError("TinyBudget.id_prefix and id_body_length are set together (both or neither), got "
                             f"{self.id_prefix!r} and {self.id_body_length}")
        if self.relabel_ids and not self.id_prefix:
            raise ValueError("TinyBudget.relabel_ids needs the id format (id_prefix and id_body_length)")
        if self.id_prefix:
            id_pieces_pattern(self.id_prefix, self.id_body_length)  # raises on a malformed id format
        if not 0.0 <= self.prompt_loss_weight < float("inf"):
            raise ValueError(f"TinyBudget.prompt_loss_weight must be finite and >= 0, got {self.prompt_loss_weight}")
        for name in ("perturb_prob", "invalid_share", "teacher_fraction", "warmup_frac"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"TinyBudget.{name} must be in [0, 1], got {getattr(self, name)}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.epochs <= 0 or self.lr <= 0:
            raise ValueError(f"TinyBudget.epochs and lr must be > 0, got {self.epochs} and {self.lr}")

    @property
    def id_pattern(self) -> str:
        """The tokenizer's id-splitting regex ("" when ids are left to BPE)."""
        return id_pieces_pattern(self.id_prefix, self.id_body_length) if self.id_prefix else ""

    @property
    def shape(self) -> TinyShape:
        """The model architecture this budget builds."""
        return TinyShape(self.hidden_size, self.intermediate_size, self.num_layers, self.num_heads, self.max_positions)


#: Named presets. "test" builds in seconds (for unit tests only: it learns nothing useful); "smoke" builds in about
#: a minute of CPU time and learns the format and some copying (for trying a new environment end to end); "default"
#: is what `--model tiny` builds the first time it runs, 10+ minutes on two CPU cores.
BUDGETS: dict[str, TinyBudget] = {
    "test": TinyBudget(
        n_train_tasks=6, clean_per_task=1, perturbed_per_task=1, max_episode_steps=12, vocab_size=300, hidden_size=32,
        intermediate_size=64, num_layers=1, num_heads=2, max_positions=1024, epochs=1.0, batch_size=8,
    ),
    "smoke": TinyBudget(
        n_train_tasks=96, max_episode_steps=30, vocab_size=1024, hidden_size=128, intermediate_size=256,
        num_layers=2, num_heads=4, max_positions=1024, epochs=2.0, batch_size=16, lr=2e-3,
    ),
    "default": TinyBudget(),
    # craft/ALFWorldGen-v0 (docs/tiny_models.md): the default budget with the student-format states labelled, and
    # the episodes played, by the searching expert (envs/alfworld_search.py), which looks for an object it has not
    # seen instead of going straight to where the planner knows it is; the teacher format keeps the planner's labels.
    "search": TinyBudget(student_labels="search"),
    # craft/TextWorld-v0 with family="cooking", level=1, n_games=64 (docs/tiny_models.md): an episode is 3-4 expert
    # steps in one kitchen; 6 perturbed draws per game. Cooking's goal never names the ingredient (the cookbook does,
    # and the expert does not read it), so only the teacher block tells which one to take; teacher_fraction 0.8 shows
    # the model the block on most states. The episodes are played on the `sft` games, so RL's `train` games are new
    # to the model (it memorises the games it is fine-tuned on). Measured: teacher 33/64, student 18/64 on `valid`.
    "textworld": TinyBudget(
        n_train_tasks=384, max_episode_steps=20, teacher_fraction=0.8, vocab_size=1024, hidden_size=128,
        intermediate_size=256, num_layers=2, num_heads=4, max_positions=1024, epochs=16.0, batch_size=16, lr=2e-3,
        collect_split="sft",
    ),
    # craft/SearchQAGen-v0 (docs/tiny_models.md): an episode is 2-3 expert steps (search each hop, then answer); the
    # teacher block holds the gold passages and the answer, which the student must find by searching and copying.
    "searchqa": TinyBudget(
        n_train_tasks=1024, max_episode_steps=8, history_turns=1, teacher_fraction=0.5, vocab_size=1024,
        hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4, max_positions=1024, epochs=10.0,
        batch_size=16, lr=2e-3, prompt_loss_weight=1.0,
    ),
    # craft/WebShopGen-v0 (docs/tiny_models.md): an episode is about 4 expert steps (search, open a product, pick its
    # options, buy); the teacher block names the target product, its options and the price bound. Result pages are
    # long, hence 2048 positions. Replies copy a product's 10-character id from the page: ids are cut into pairs of
    # characters, renamed per example so that none can be memorised, and copy pre-training forms the heads that copy
    # them. Measured (96 `test` goals, greedy): teacher 42/96, student 8/96.
    "webshop": TinyBudget(
        n_train_tasks=512, max_episode_steps=15, history_turns=1, teacher_fraction=0.5, vocab_size=1024,
        hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4, max_positions=2048, epochs=8.0,
        batch_size=16, lr=2e-3, prompt_loss_weight=1.0, id_prefix="b0", id_body_length=8, relabel_ids=True,
        copy_pretrain_steps=2500,
    ),
}


ENV_DEFAULT_BUDGETS: dict[str, str] = {
    "craft/SearchQAGen-v0": "searchqa",
    "craft/SearchQA-v0": "searchqa",
    "craft/WebShopGen-v0": "webshop",
    "craft/WebShop-v0": "webshop",
}
"""What `budget="default"` builds for an environment other than ALFWorld: the budget made for its kind of episode,
on the official data as on the generated (docs/tiny_models.md measures both on the generated data: on SearchQAGen the
teacher beats the student; WebShopGen's model does not win yet). Environments not listed build `default` itself."""


def env_budget_name(budget: str | TinyBudget, env_id: str) -> str | TinyBudget:
    """`budget` with "default" replaced by `env_id`'s own default budget (`ENV_DEFAULT_BUDGETS`), else unchanged."""
    if isinstance(budget, str) and budget == "default":
        return ENV_DEFAULT_BUDGETS.get(env_id, budget)
    return budget


def resolve_budget(budget: str | TinyBudget) -> TinyBudget:
    """A preset name or a `TinyBudget`, as a `TinyBudget`."""
    if isinstance(budget, TinyBudget):
        return budget
    if budget not in BUDGETS:
        raise ValueError(f"unknown tiny-model budget {budget!r}; presets: {sorted(BUDGETS)} (or pass a TinyBudget)")
    return BUDGETS[budget]
