"""A micro environment and a micro model for the learning tests: a colour lock whose untrained student is at chance
and whose privileged teacher is strong; both build in seconds on one CPU thread.

The game (`craft_test/MicroLock-v0`): a lock takes `length` colours, one per turn, from the K = 4 colours listed
in a task-dependent order; the combination is `target` (gold) every time. A right colour clicks, a wrong one jams
the lock (the episode is lost), `length` right colours in a row open it (won, reward 1). With `length=1` it is a
4-armed bandit: success is exactly the probability of the reply "gold". With `length=3` a win needs three right
picks (1/64 at chance), so the reward is sparse, while the privileged block ("Expert plan from here: gold; gold")
says what is right at every turn: the setting where a teacher must beat reward-only learning.

The micro model (`build_micro_model`): a 2-layer Llama (hidden 64) and a byte-level BPE tokenizer trained on the
game's own text, fine-tuned for 100 Adam steps in the project's plain prompt format on the game's own turns: each
student prompt repeated with every colour as reply (so the student starts at chance, 1/4 per colour, and never
makes an invalid action), and teacher prompts answered by the expert (so the teacher says gold with p ≈ 0.94).
The student never sees gold preferred: only training can teach it that.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch

from craft_bench.agents.prompts import PromptConfig, format_prompt, format_response, student_text, teacher_text
from craft_bench.envs.base import EngineStep, TaskStart, TextAgentEnv

MICRO_ENV_ID = "craft_test/MicroLock-v0"
COLOURS = ("red", "green", "blue", "gold")
GOAL = "open the lock"
#: History turns in the prompts the model is fine-tuned on; the learning tests train with the same H.
HISTORY_TURNS = 2


class MicroLockEnv(TextAgentEnv):
    """Task "<split>-<i>": the colours listed in permutation i; the lock opens after `length` picks of `target`.

    Each split has `num_tasks` tasks; train and valid differ only in the permutations they list.
    """

    def __init__(self, split: str = "train", max_steps: int = 3, length: int = 1, num_tasks: int = 24,
                 target: str = "gold", render_mode: str | None = None):
        super().__init__(split=split, max_steps=max_steps, render_mode=render_mode)
        if target not in COLOURS:
            raise ValueError(f"target must be one of {COLOURS}, got {target!r}")
        if isinstance(length, bool) or not isinstance(length, int) or length < 1:
            raise ValueError(f"length must be an int >= 1, got {length!r}")
        if length > max_steps:
            raise ValueError(f"length={length} needs max_steps >= {length}, got {max_steps}")
        first = {"train": 0, "valid": 1000}.get(split)
        if first is None:
            raise ValueError(f"unknown split {split!r}; valid: 'train', 'valid'")
        self.target = target
        self.length = length
        self._ids = [f"{split}-{first + i:04d}" for i in range(num_tasks)]
        self._order: list[str] = list(COLOURS)
        self._right = 0

    @property
    def data_source(self) -> str:
        return "generated"

    def _task_ids(self) -> list[str]:
        return self._ids

    def _start_task(self, task_id: str) -> TaskStart:
        self._order = colour_order(int(task_id.rsplit("-", 1)[1]))
        self._right = 0
        return TaskStart(f"A lock with {self.length} colour wheels.", GOAL, "micro_lock")

    def _engine_step(self, action: str) -> EngineStep:
        if action != self.target:
            return EngineStep("The lock jams.", won=False, lost=True, progress=self._progress)
        self._right += 1
        won = self._right == self.length
        return EngineStep("The lock opens." if won else "The wheel clicks.", won=won, lost=False,
                          progress=self._right / self.length)

    def _admissible_actions(self) -> list[str]:
        return list(self._order)

    def _expert_plan(self) -> list[str]:
        return [self.target] * (self.length - self._right)


def colour_order(index: int) -> list[str]:
    """The colours in the order task `index` lists them (a fixed permutation per index)."""
    order = list(COLOURS)
    np.random.default_rng(index).shuffle(order)
    return order


if MICRO_ENV_ID not in gym.registry:
    # A 'module:Class' string, as the group runner requires (tests/ is on sys.path under pytest, as for fake_envs).
    gym.register(id=MICRO_ENV_ID, entry_point="micro_env:MicroLockEnv")


# ---------------------------------------------------------------------------------------------- the micro model
@functools.lru_cache(maxsize=None)
def turn_texts(task_index: int, length: int, turn: int) -> tuple[str, str]:
    """(student text, teacher text) of turn `turn` of task `task_index` of a lock of `length`, played by the
    expert up to that turn: the env's own observations and privileged block, laid out as the policy does."""
    env = MicroLockEnv(length=length, max_steps=length, num_tasks=task_index + 1)
    obs, info = env.reset(options={"task_index": task_index})
    history: list[tuple[str, str]] = []
    for _ in range(turn):
        history.append((obs, env.target))
        obs, _, _, _, info = env.step(env.target)
    student = student_text(info["goal"], history, obs, info["admissible_actions"], PromptConfig(HISTORY_TURNS))
    return student, teacher_text(info["privileged"]["text"], student)


def sft_batches(steps: int, batch_size: int, seed: int, max_length: int = 3) -> list[list[tuple[str, str]]]:
    """`steps` batches of (prompt, reply) pairs over random tasks, lock lengths 1..max_length and turns. Half of
    each batch are teacher prompts answered by the expert's action; the other half are student prompts, each
    repeated with every colour as reply, so the student's fitted distribution is uniform by construction."""
    if batch_size % (2 * len(COLOURS)):
        raise ValueError(f"batch_size must be a multiple of {2 * len(COLOURS)}, got {batch_size}")
    rng = np.random.default_rng(seed)

    def draw() -> tuple[str, str]:
        length = int(rng.integers(1, max_length + 1))
        return turn_texts(int(rng.integers(24)), length, int(rng.integers(length)))

    batches = []
    for _ in range(steps):
        batch = []
        for _ in range(batch_size // 2):
            batch.append((format_prompt(None, draw()[1]), format_response(None, "gold")))
        for _ in range(batch_size // (2 * len(COLOURS))):
            prompt = format_prompt(None, draw()[0])
            batch.extend((prompt, format_response(None, colour)) for colour in COLOURS)
        batches.append(batch)
    return batches


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [format_prompt(None, text) + format_response(None, colour)
              for i in range(8) for length in (1, 2, 3) for turn in range(length)
              for text in turn_texts(i, length, turn) for colour in COLOURS]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<pad>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>")


def _model(vocab_size: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, pad_token_id=0, eos_token_id=1)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)


def build_micro_model(path: str | Path, seed: int = 0, sft_steps: int = 100, batch_size: int = 16,
                      lr: float = 1e-2) -> dict[str, Any]:
    """Train the micro model's tokenizer and weights (seeded; run with one torch thread for speed) and save both to
    `path`, loadable as `TrainConfig(model=str(path))`. The learning rate decays linearly to 0, so the last batches
    do not tilt the student's distribution. Returns the last batch's SFT loss and the step count."""
    tokenizer = _tokenizer()
    model = _model(len(tokenizer), seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / sft_steps)
    model.train()
    loss_value = float("nan")
    for batch in sft_batches(sft_steps, batch_size, seed):
        ids, labels = [], []
        for prompt, reply in batch:
            p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            r = tokenizer(reply, add_special_tokens=False)["input_ids"]
            ids.append(p + r)
            labels.append([-100] * len(p) + r)
        width = max(len(x) for x in ids)
        input_ids = torch.tensor([x + [0] * (width - len(x)) for x in ids])
        attention = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids])
        label_ids = torch.tensor([x + [-100] * (width - len(x)) for x in labels])
        loss = model(input_ids=input_ids, attention_mask=attention, labels=label_ids).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        loss_value = float(loss.detach())
    model.eval()
    Path(path).mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return {"sft_loss": loss_value, "sft_steps": sft_steps}


def target_probability(model, tokenizer, length: int = 1, teacher: bool = False, tasks: range = range(1000, 1008),
                       target: str = "gold") -> float:
    """The exact probability of the reply " gold\\n" at the first turn, averaged over `tasks` (student prompts, or
    teacher prompts with `teacher`), by a plain forward pass independent of the trainer's scoring code."""
    reply = tokenizer(format_response(None, target), add_special_tokens=False)["input_ids"]
    probabilities = []
    with torch.no_grad():
        for index in tasks:
            env = MicroLockEnv(split="valid", length=length, max_steps=length)
            obs, info = env.reset(options={"task_id": f"valid-{index:04d}"})
            text = student_text(info["goal"], [], obs, info["admissible_actions"], PromptConfig(HISTORY_TURNS))
            if teacher:
                text = teacher_text(info["privileged"]["text"], text)
            prompt = tokenizer(format_prompt(None, text), add_special_tokens=False)["input_ids"]
            ids = torch.tensor([prompt + reply])
            logp = model(input_ids=ids).logits[0, len(prompt) - 1:-1].float().log_softmax(-1)
            probabilities.append(float(logp.gather(1, torch.tensor(reply)[:, None]).sum().exp()))
    return sum(probabilities) / len(probabilities)
