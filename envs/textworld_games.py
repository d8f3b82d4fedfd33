"""TextWorld games for craft/TextWorld-v0: task ids, per-split seed ranges, and offline generation and compilation
with TextWorld's own challenge generators, built lazily per task into a cache that many processes can share."""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import re
import warnings
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from craft_bench.envs.cache import build_verified, cache_dir

#: Bump when the mapping from (family, level, seed) to a game changes, so that stale cached games are never reused.
GAMES_REVISION = "g2"

#: Disjoint seed ranges: a split's game `i` is generated from seed `offset + i`, so no two splits share a seed.
#: `sft` holds the games a model is fine-tuned on before RL (`TinyBudget.collect_split`), so that RL's `train` games
#: are new to it; cooking draws its foods for `sft` from TextWorld's training foods, as for `train`.
SPLIT_SEED_OFFSET: dict[str, int] = {"train": 0, "valid": 1_000_000, "test": 2_000_000, "sft": 3_000_000}
SEEDS_PER_SPLIT = 1_000_000

#: Our difficulty ladder for TextWorld's cooking challenge (which has settings, not levels), easiest first; each
#: level adds something (rooms and containers, cutting, cooking, more ingredients to find, more rooms).
#: TextWorld's `drop` setting (limited inventory) is left out: TextWorld computes no winning policy for those games,
#: so they could not give the teacher its expert plan.
COOKING_LEVELS: dict[int, dict[str, Any]] = {
    1: dict(recipe=1, take=1, go=1, open=False, cut=False, cook=False, drop=False),
    2: dict(recipe=1, take=1, go=6, open=True, cut=False, cook=False, drop=False),
    3: dict(recipe=2, take=1, go=6, open=True, cut=True, cook=False, drop=False),
    4: dict(recipe=2, take=2, go=6, open=True, cut=True, cook=True, drop=False),
    5: dict(recipe=3, take=3, go=9, open=True, cut=True, cook=True, drop=False),
    6: dict(recipe=3, take=3, go=12, open=True, cut=True, cook=True, drop=False),
}
#: TextWorld 1.7 compiles to Z-machine only, which caps a game at 100 rooms.
MAX_ROOMS = 100


@dataclass(frozen=True)
class Family:
    """One TextWorld challenge and the levels it accepts."""

    challenge: str
    max_level: int


#: The families craft/TextWorld-v0 offers. Coin collector and treasure hunter use TextWorld's own levels
#: (see `textworld.challenges`; coin collector only those that fit in `MAX_ROOMS`); cooking uses `COOKING_LEVELS`.
FAMILIES: dict[str, Family] = {
    "coin_collector": Family("tw-coin_collector", 233),
    "treasure_hunter": Family("tw-treasure_hunter", 30),
    "cooking": Family("tw-cooking", max(COOKING_LEVELS)),
}

_TASK_ID = re.compile(r"^(?P<family>[a-z_]+)-L(?P<level>\d+)-(?P<seed>\d{7})$")


@dataclass(frozen=True)
class GameSpec:
    """Everything that determines one game: family, difficulty level and generator seed (which fixes the split)."""

    family: str
    level: int
    seed: int

    @property
    def split(self) -> str:
        return split_of_seed(self.seed)

    @property
    def task_id(self) -> str:
        return f"{self.family}-L{self.level}-{self.seed:07d}"

    @property
    def task_type(self) -> str:
        return f"{self.family}-L{self.level}"


def split_of_seed(seed: int) -> str:
    """The split whose seed range holds `seed`."""
    for split, offset in SPLIT_SEED_OFFSET.items():
        if offset <= seed < offset + SEEDS_PER_SPLIT:
            return split
    raise ValueError(f"seed {seed} is in no split's range {SPLIT_SEED_OFFSET} (each {SEEDS_PER_SPLIT} wide)")


def check_family_level(family: str, level: int) -> None:
    """Raise a clear error for an unknown family or a level outside the family's range."""
    if family not in FAMILIES:
        raise ValueError(f"unknown TextWorld family {family!r}; valid: {sorted(FAMILIES)}")
    if isinstance(level, bool) or not isinstance(level, int) or not 1 <= level <= FAMILIES[family].max_level:
        raise ValueError(f"level for {family!r} must be an int in [1, {FAMILIES[family].max_level}], got {level!r}")
    if family == "coin_collector" and coin_collector_rooms(level) > MAX_ROOMS:
        raise ValueError(
            f"coin_collector level {level} needs {coin_collector_rooms(level)} rooms; TextWorld "
            f"{textworld_version()} compiles at most {MAX_ROOMS} (levels 1-100, 101-150, 201-233 fit)"
        )


def coin_collector_rooms(level: int) -> int:
    """Rooms in a coin collector game: quest length ((level-1) % 100 + 1) times (1 + (level-1) // 100 distractors)."""
    return ((level - 1) % 100 + 1) * ((level - 1) // 100 + 1)


def textworld_version() -> str:
    """The installed TextWorld's version, read from package metadata (no import of TextWorld itself)."""
    return importlib.metadata.version("textworld")


def parse_task_id(task_id: str) -> GameSpec:
    """The game behind a task id such as 'coin_collector-L3-1000017' (family, level, 7-digit seed)."""
    match = _TASK_ID.match(task_id)
    if match is None:
        raise ValueError(f"malformed TextWorld task id {task_id!r}; expected FAMILY-L<level>-<7-digit seed>")
    spec = GameSpec(match["family"], int(match["level"]), int(match["seed"]))
    check_family_level(spec.family, spec.level)
    split_of_seed(spec.seed)
    return spec


def game_pool(split: str, families: Sequence[str], levels: Sequence[int], n_games: int) -> list[GameSpec]:
    """The split's games: `n_games` seeds for every (family, level) pair, sorted by task id. Costs no compilation."""
    if split not in SPLIT_SEED_OFFSET:
        raise ValueError(f"unknown split {split!r}; valid: {sorted(SPLIT_SEED_OFFSET)}")
    if isinstance(n_games, bool) or not isinstance(n_games, int) or not 1 <= n_games <= SEEDS_PER_SPLIT:
        raise ValueError(f"n_games must be an int in [1, {SEEDS_PER_SPLIT}], got {n_games!r}")
    offset = SPLIT_SEED_OFFSET[split]
    specs = []
    for family in families:
        for level in levels:
            check_family_level(family, level)
            specs.extend(GameSpec(family, level, offset + index) for index in range(n_games))
    return sorted(set(specs), key=lambda spec: spec.task_id)


def game_file(spec: GameSpec) -> Path:
    """The compiled game (`.z8`, its `.json` beside it) for `spec`, generated and compiled on first use.

    The entry lives under `$CRAFT_BENCH_HOME/textworld/<textworld version>-<revision>/` and is written through
    `build_verified`, so concurrent processes asking for the same game compile it once and never see a partial
    file, and a corrupt entry (checked against its manifest of hashes) is rebuilt.
    """
    check_family_level(spec.family, spec.level)
    root = cache_dir("textworld", f"textworld-{textworld_version()}-{GAMES_REVISION}")
    entry = build_verified(root / spec.task_id, lambda staged: _build_game(spec, staged))
    return entry / "game.z8"


def _challenge_settings(spec: GameSpec) -> dict[str, Any]:
    if spec.family == "cooking":
        # TextWorld's cooking generator has its own train/valid/test food split; use the one matching ours (`sft` is
        # training data too).
        food_split = "train" if spec.split == "sft" else spec.split
        return dict(COOKING_LEVELS[spec.level], recipe_seed=spec.seed, split=food_split)
    return {"level": spec.level}


def _build_game(spec: GameSpec, folder: Path) -> None:
    import textworld.generator
    from textworld import GameOptions
    from textworld.challenges import CHALLENGES

    options = GameOptions()
    options.seeds = spec.seed
    options.path = str(folder / "game.z8")
    options.file_ext = ".z8"
    options.force_recompile = True
    make = CHALLENGES[FAMILIES[spec.family].challenge][1]
    with warnings.catch_warnings():
        # Some generators replay their walkthrough in Jericho, which warns that it cannot track TextWorld's score;
        # the text grammar warns when it reuses a phrase. Neither is actionable by the user.
        warnings.filterwarnings("ignore", message=".*is not fully supported.*")
        warnings.filterwarnings("ignore", category=textworld.GenerationWarning)
        game = make(_challenge_settings(spec), options)
        folder.mkdir(parents=True, exist_ok=True)
        textworld.generator.compile_game(game, options)



def prebuild(specs: Sequence[GameSpec], workers: int = 1) -> list[Path]:
    """Build every game of `specs` ahead of time over `workers` processes (games already cached cost nothing).

    Envs build lazily anyway; this only moves the compile time (about 0.5-3 s per game) out of the first episodes.
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if workers == 1:
        return [game_file(spec) for spec in specs]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(game_file, specs))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m craft_bench.envs.textworld_games",
        description="Build a split's TextWorld games into $CRAFT_BENCH_HOME ahead of time.",
    )
    parser.add_argument("--split", default="train", choices=sorted(SPLIT_SEED_OFFSET))
    parser.add_argument("--family", nargs="+", default=["coin_collector"], choices=sorted(FAMILIES))
    parser.add_argument("--level", nargs="+", type=int, default=[1])
    parser.add_argument("--n-games", type=int, default=8, help="games per (family, level) pair")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args(argv)
    specs = game_pool(args.split, args.family, args.level, args.n_games)
    paths = prebuild(specs, args.workers)
    print(f"{len(paths)} games ready under {paths[0].parent.parent}")


if __name__ == "__main__":
    main()
