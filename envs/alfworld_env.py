"""ALFWorld environments of craft-bench: official data (`craft/ALFWorld-v0`) and offline games (`craft/ALFWorldGen-v0`).
Both play `game.tw-pddl` files with ALFWorld's TextWorld-PDDL engine and name demangling; plans come from Fast Downward."""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import json
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from craft_bench.envs import alfworld_gen, sas_cache
from craft_bench.envs.alfworld_skills import strategy
from craft_bench.envs.base import EngineStep, TaskStart, TextAgentEnv, normalize_action
from craft_bench.envs.cache import clear_command

#: Verbs whose PDDL effects only mark something as `checked`, which no goal mentions: the plan stays valid.
PLAN_PRESERVING_VERBS = ("look", "inventory", "examine ", "help")
#: ALFWorld 0.4 renamed `put X in/on Y` to `move X to Y`; old-syntax agents still type the former.
_PUT_SYNTAX = re.compile(r"^put (?P<obj>.+?) (?:in|on|into|onto|in/on) (?P<recep>.+)$")
_BANNER = "-= Welcome to TextWorld, ALFRED! =-"
_GOAL_IN_GRAMMAR = re.compile(r"Your task is to: (?P<goal>.*?)\.\"")
MISSING_DATA_HINT = (
    "ALFWorld's official data is not available: {reason}. Fetch it with `alfworld-download` (pip install alfworld) "
    "and point $ALFWORLD_DATA at it (or pass data_path=...), or use craft/ALFWorldGen-v0, which generates "
    "ALFWorld-domain games offline with no download."
)
OFFICIAL_SPLITS = ("train", "valid_seen", "valid_unseen")
CORRUPT_OFFICIAL_HINT = (
    "the ALFWorld data is damaged; download it again with `alfworld-download -f` (into $ALFWORLD_DATA)"
)
#: Plans remembered per process, keyed by (game, goal, state): agents often come back to a state they left, and GRPO
#: siblings, which a group runner keeps in one worker process, start from one state and often pass the same ones.
PLAN_MEMO_SIZE = 65536
_PLAN_MEMO: OrderedDict[tuple[str, str, frozenset[Any]], list[str]] = OrderedDict()
_PLAN_MEMO_LOCK = threading.Lock()  # an in-process env may reset on a background thread (TrainConfig.reset_ahead)


def clear_plan_memo() -> None:
    """Forget every remembered expert plan of this process (to time or count planner calls from a cold start)."""
    with _PLAN_MEMO_LOCK:
        _PLAN_MEMO.clear()


def _remember(memo: OrderedDict[Any, Any], key: Any, compute: Any, size: int, lock: threading.Lock | None = None) -> Any:
    """memo[key], made by `compute()` on a miss; beyond `size` entries the least recently used goes. `lock` guards the
    dict only: two threads that miss one key together both compute it, and both results are the same."""
    with lock or contextlib.nullcontext():
        if key in memo:
            memo.move_to_end(key)
            return memo[key]
    value = compute()
    with lock or contextlib.nullcontext():
        memo[key] = value
        if len(memo) > size:
            memo.popitem(last=False)
    return value


_STOCK: dict[str, Any] = {}
_INSTALL_LOCK = threading.Lock()
#: Games kept by the translation and grammar memos: a reset translates its problem twice (load and reset build a
#: PddlState each) and parses its grammar once, and GRPO siblings and later epochs reset the same games again.
TRANSLATION_MEMO_SIZE = 64


def install_engine_memos() -> None:
    """Memoise the pure parsing and translation TextWorld's PDDL engine repeats on every step and reset (idempotent).

    TextWorld re-parses each grammar template (`textgen._parse_and_convert`) and each rule condition
    (`Rule.parse_conjunctive_query`) with tatsu on every derivation, about 75% of an ALFWorld step, translates
    the same PDDL problem to SAS (`fast_downward.pddl2sas`) twice per reset (kept on disk as well, for later
    processes and runs: envs/sas_cache.py), and parses the game's whole grammar
    (`GameLogic`, via `pddl.logic._parse_and_convert`) on every load, about 60% of a reset once the translation is
    cached. All four are pure functions of their arguments, so caching them changes no output (tests/test_alfworld.py
    pins this); parsed templates are deep-copied on the way out because derivation writes into them, while a game's
    parsed grammar is only read (its actions' templates and rules), so siblings loading one game share it as
    TextWorld's own `reset` shares it between episodes of a game. Steps get 4-5x faster, resets about 2x, and a
    sibling's reset of a game already loaded in its process 2.6x again (docs/benchmarks.md).

    A fifth replacement is not a memo: `textgen.copy_context`, which every derivation step calls, deep-copies the
    context's `variables` (placeholder name -> EntityInfo) and `mapping` (Placeholder -> Variable) dicts. Derivation
    only adds keys to those dicts (`query`) and reads their values (the grammar's `{...}` expressions are attribute
    reads such as `{o.name}`; `Variable`s are immutable), so new dicts holding the same values give the same text;
    the stock version's deep copies were most of what was left of a step (docs/benchmarks.md).

    A sixth, `textgen.deepcopy`, with which TextWorld copies a rule's symbols before deriving them, goes through
    `copy_symbols`, a deep copy specialised to parsed symbols, as do the template memo's copies.

    A seventh, `pddl.logic.PddlState`, lets a reset take over the state its load has just built
    (`_handing_off_state_class`): TextWorld's `load` builds a `PddlState` to read the game's entities, and the `reset`
    that follows builds the same state again.
    """
    with _INSTALL_LOCK:  # two envs built at once on two threads must not both wrap TextWorld's functions
        if not _STOCK:
            _install_engine_memos()


def _install_engine_memos() -> None:
    import fast_downward
    import textworld.envs.pddl.logic as pddl_logic
    import textworld.envs.pddl.textgen as textgen
    from textworld.logic import Rule

    stock_template = _STOCK["template"] = textgen._parse_and_convert
    stock_query = _STOCK["query"] = Rule.__dict__["parse_conjunctive_query"]
    stock_translate = _STOCK["translate"] = fast_downward.pddl2sas
    stock_game_grammar = _STOCK["game_grammar"] = pddl_logic._parse_and_convert
    _STOCK["copy_context"] = textgen.copy_context
    _STOCK["pddl_state"] = pddl_logic.PddlState
    _STOCK["deepcopy"] = textgen.deepcopy
    templates: dict[Any, Any] = {}
    queries: dict[str, Any] = {}
    translations: OrderedDict[Any, Any] = OrderedDict()
    game_grammars: OrderedDict[Any, Any] = OrderedDict()

    def remembered(memo: OrderedDict[Any, Any], function: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """function(*args, **kwargs), kept in `memo` by its arguments (TRANSLATION_MEMO_SIZE entries at most)."""
        key = (args, tuple(sorted(kwargs.items())))
        return _remember(memo, key, lambda: function(*args, **kwargs), TRANSLATION_MEMO_SIZE)

    def parse_template(*args: Any, **kwargs: Any) -> Any:
        key = (args, tuple(sorted(kwargs.items())))
        if key not in templates:
            templates[key] = stock_template(*args, **kwargs)
        return copy_symbols(templates[key])

    def parse_query(cls: Any, expression: str) -> Any:
        if expression not in queries:
            queries[expression] = stock_query.__func__(cls, expression)
        return queries[expression]

    translate_through_disk = functools.partial(sas_cache.translate, stock_translate)

    def translate(domain: str, problem: str, verbose: bool = False, optimize: bool = False) -> Any:
        # In memory first, then on disk (envs/sas_cache.py), then Fast Downward itself.
        return remembered(translations, translate_through_disk, (domain, problem, verbose, optimize), {})

    def parse_game_grammar(*args: Any, **kwargs: Any) -> Any:
        split = split_task_rule(args[0]) if len(args) == 1 and kwargs == {"rule_name": "pddlStart"} else None
        if split is None:
            return remembered(game_grammars, stock_game_grammar, args, kwargs)
        # Games differ only in their goal sentence: parse the grammar once with a stand-in goal, then swap in
        # this game's "task" rule, parsed as TextWorld parses every rule (split_task_rule says when this holds).
        canonical, task_literal = split
        actions, grammar = remembered(game_grammars, stock_game_grammar, (canonical,), kwargs)
        return actions, with_task_rule(grammar, task_literal)

    textgen._parse_and_convert = parse_template
    Rule.parse_conjunctive_query = classmethod(parse_query)
    fast_downward.pddl2sas = translate
    pddl_logic._parse_and_convert = parse_game_grammar
    textgen.copy_context = copy_context_dicts
    pddl_logic.PddlState = _handing_off_state_class(pddl_logic.PddlState)
    textgen.deepcopy = copy_symbols


#: The goal rule ALFWorld's grammar holds (`add_task_to_grammar` writes the goal into it): a JSON rule with an rhs
#: only. Its literal is a JSON string, escapes included.
_TASK_RULE = re.compile(r'"task"\s*:\s*\[\s*\{\s*"rhs"\s*:\s*(?P<literal>"(?:[^"\\\n]|\\.)*")\s*\}\s*\]')
STAND_IN_TASK_LITERAL = '"Your task is to: UNKNOWN GOAL."'


def split_task_rule(grammar_text: str) -> tuple[str, str] | None:
    """(the game grammar with a stand-in goal, this game's goal rule literal), or None when the text does not have
    exactly one `"task"` rule of the form ALFWorld writes, in which case the whole text is parsed as it stands.

    Parsing a grammar is parsing each of its rules on its own (`ContextSensitiveGrammar.parse`), and a rule named
    once in the whole document is the rule of that name, so the stand-in's parse with this rule swapped in is the
    parse of this text; tests/test_alfworld.py checks it on games of every task type."""
    matches = list(_TASK_RULE.finditer(grammar_text))
    if len(matches) != 1 or grammar_text.count('"task"') != 1:
        return None
    literal = matches[0].group("literal")
    try:
        json.loads(literal)
    except ValueError:
        return None
    start, end = matches[0].span("literal")
    return grammar_text[:start] + STAND_IN_TASK_LITERAL + grammar_text[end:], literal


def with_task_rule(grammar: Any, task_literal: str) -> Any:
    """A copy of a parsed game grammar whose "task" rule is the given rule literal, parsed by TextWorld."""
    from textworld.envs.pddl.textgen import ContextSensitiveGrammar

    task = ContextSensitiveGrammar.parse('{"task": [{"rhs": ' + task_literal + "}]}")
    swapped = ContextSensitiveGrammar()
    swapped._rules.update(grammar._rules)  # the other rules' lists are shared, read-only, as siblings share them
    swapped._rules["task"] = task._rules["task"]
    return swapped


def copy_symbols(value: Any) -> Any:
    """`copy.deepcopy` of TextWorld's parsed text-grammar symbols (lists of `textgen.Symbol`s), without its
    per-object dispatch and memo: new lists and symbols, strings and None shared (immutable), empty context dicts
    new. Anything else (a non-empty context, an attribute of another type) goes to `copy.deepcopy`.

    The one difference from `deepcopy` is that symbols which shared one empty context dict (the parser leaves every
    symbol on `Symbol.__init__`'s default `{}`) get one new dict each instead of one new dict between them. TextWorld
    only ever rebinds a symbol's context and never writes into one, so nothing can tell (tests/test_alfworld.py plays
    every task type both ways). Derivations copy symbols tens of times a step: with `deepcopy` the raw engine stepped
    299 times a second against 533 with this copy (docs/benchmarks.md).
    """
    if type(value) is list:
        return [copy_symbols(item) for item in value]
    if not isinstance(value, _symbol_class()):
        return copy.deepcopy(value)
    fields = {}
    for name, field in value.__dict__.items():
        if field is None or type(field) is str:
            fields[name] = field
        elif type(field) is dict and not field:
            fields[name] = {}
        else:
            fields[name] = copy_symbols(field)
    duplicate = object.__new__(type(value))
    duplicate.__dict__.update(fields)
    return duplicate


@functools.lru_cache(maxsize=1)
def _symbol_class() -> type:
    from textworld.envs.pddl.textgen import Symbol

    return Symbol


def copy_context_dicts(context: dict[str, Any]) -> dict[str, Any]:
    """TextWorld's `textgen.copy_context` without its deep copies: new `variables` and `mapping` dicts holding the
    same values, the state, facts and entity infos shared (as the stock version shares them)."""
    return {
        "state": context["state"],
        "facts": context["facts"],
        "variables": dict(context["variables"]),
        "mapping": dict(context["mapping"]),
        "entity_infos": context["entity_infos"],
    }


def uninstall_engine_memos() -> None:
    """Restore TextWorld's and Fast Downward's own functions (to measure the engine exactly as shipped)."""
    import fast_downward
    import textworld.envs.pddl.logic as pddl_logic
    import textworld.envs.pddl.textgen as textgen
    from textworld.logic import Rule

    with _INSTALL_LOCK:
        if _STOCK:
            textgen._parse_and_convert = _STOCK.pop("template")
            Rule.parse_conjunctive_query = _STOCK.pop("query")
            fast_downward.pddl2sas = _STOCK.pop("translate")
            pddl_logic._parse_and_convert = _STOCK.pop("game_grammar")
            textgen.copy_context = _STOCK.pop("copy_context")
            pddl_logic.PddlState = _STOCK.pop("pddl_state")
            textgen.deepcopy = _STOCK.pop("deepcopy")
        sas_cache.parsed_task.cache_clear()  # fresh memos share no parse with earlier ones


#: The state a load has just built, offered to the reset that follows it on this thread (_AlfredEngine.load).
_FRESH_STATE = threading.local()


def _handing_off_state_class(stock: type) -> type:
    """A stand-in for TextWorld's `PddlState` class: building a state equal to the one on offer in `_FRESH_STATE`
    returns that one as it is; building any other returns a new stock `PddlState`.

    A state is a function of (Fast Downward library, problem, game logic): TextWorld's `load` builds one to read the
    game's entities, then `reset` builds the same one again, loading the same SAS text into the same library copy
    and adding the same facts. Nothing acts on the game in between, so the first one is still the initial state
    (tests/test_alfworld.py plays games both ways). Taking it over skips about a quarter of a sibling's reset
    (docs/benchmarks.md). The offer is thread-local, so a reset on a background thread (TrainConfig.reset_ahead)
    never takes another thread's state, and used once. States stay instances of the stock class (copied and
    pickled as before): Python runs no `__init__` on what `__new__` returns when it is not an instance of this
    subclass.
    """

    class HandingOffPddlState(stock):  # type: ignore[misc, valid-type]
        def __new__(cls, downward_lib: Any, pddl_problem: str, logic: Any) -> Any:
            fresh = getattr(_FRESH_STATE, "state", None)
            if (fresh is not None and fresh.downward_lib is downward_lib and fresh._logic is logic
                    and fresh.pddl_problem == pddl_problem):
                _FRESH_STATE.state = None
                return fresh
            return stock(downward_lib, pddl_problem, logic)

    return HandingOffPddlState


class _AlfredEngine:
    """ALFWorld's engine for one game at a time: TextWorld's PddlEnv wrapped by AlfredDemangler and AlfredInfos.

    The environment is built once and reloaded per game, so the Fast Downward library is loaded once per env.
    `policy_commands` is not requested: the env plans itself, only when the cached plan is stale.
    """

    def __init__(self) -> None:
        import textworld
        from alfworld.agents.environment.alfred_tw_env import AlfredDemangler, AlfredInfos
        from textworld.envs.pddl import PddlEnv

        install_engine_memos()
        infos = textworld.EnvInfos(won=True, admissible_commands=True, extras=["gamefile"])
        self.env = AlfredInfos(AlfredDemangler()(PddlEnv(infos)))
        self.state: Any = None

    def load(self, game: str | dict[str, Any]) -> str:
        self.env.load(game)
        try:
            _FRESH_STATE.state = self.env.unwrapped._pddl_state  # the initial state: reset may take it over
            self.state = self.env.reset()
        finally:
            _FRESH_STATE.state = None
        return str(self.state["feedback"])

    def step(self, command: str) -> str:
        self.state, _, _ = self.env.step(command)
        return str(self.state["feedback"])

    @property
    def won(self) -> bool:
        return bool(self.state["won"])

    @property
    def admissible(self) -> list[str]:
        return list(self.state["admissible_commands"])

    def state_key(self) -> frozenset[Any]:
        """The current state's facts minus `checked` ones, which no goal or precondition reads."""
        return frozenset(f for f in self.env.unwrapped._pddl_state.facts if f.name != "checked")

    def plan(self) -> list[str]:
        """A fresh Fast Downward plan from the current state, as demangled commands ([] if none exists)."""
        pddl_env = self.env.unwrapped
        return list(pddl_env._pddl_state.replan(pddl_env._entity_infos))


def strip_intro(feedback: str) -> str:
    """The first observation without TextWorld's banner and the task line (the goal travels in `info`)."""
    parts = [p.strip() for p in feedback.split("\n\n")]
    kept = [p for p in parts if p and p != _BANNER and not p.startswith("Your task is to:")]
    return "\n\n".join(kept)


def normalize_put(command: str) -> str:
    """`put X in Y` / `put X on Y` -> `move X to Y` (ALFWorld 0.4 syntax); other commands unchanged."""
    match = _PUT_SYNTAX.match(command)
    return f"move {match['obj']} to {match['recep']}" if match else command


class _ALFWorldBase(TextAgentEnv):
    """Engine hooks shared by both ALFWorld ids; subclasses say where games come from.

    `progress` is 1 - (remaining expert plan length / the plan length at reset), clipped to [0, 1], and 1.0 on a
    win: the share of the optimal plan's distance to the goal already covered. It can fall when the agent undoes
    work (e.g. puts the target object back). `privileged` holds `expert_plan` (Fast Downward's plan from the
    current state, cached while the agent follows it, remembered per state, replanned only when the agent leaves
    it), `next_action` and `strategy` (a per-task-type text from `alfworld_skills`).
    """

    def __init__(self, split: str, max_steps: int, render_mode: str | None, replan_every_step: bool) -> None:
        super().__init__(split=split, max_steps=max_steps, render_mode=render_mode)
        self.replan_every_step = replan_every_step
        self._engine: _AlfredEngine | None = None
        self._commands: dict[str, str] = {}  # normalised admissible command -> the engine's spelling
        self._plan: list[str] | None = None  # cached expert plan from the current state; None when stale
        self._game_key: tuple[str, str] = ("", "")  # (game file, goal): what a plan is a plan for, with the state
        self._ids: list[str] = []  # the split's sorted task ids, set by the subclass from its data source
        self._initial_plan_length = 1
        self.planner_calls = 0  # Fast Downward calls made by this env, and the seconds they took
        self.planner_seconds = 0.0

    # -------------------------------------------------------------- where games come from
    def _game_for(self, task_id: str) -> tuple[str, dict[str, Any]]:
        """(path of the task's `game.tw-pddl`, its `traj_data.json` contents)."""
        raise NotImplementedError

    def _goal_for(self, gamefile: str, traj: dict[str, Any]) -> tuple[str | dict[str, Any], str]:
        """(what the engine loads: the game file or its contents with the goal put in, the goal sentence)."""
        raise NotImplementedError

    # -------------------------------------------------------------- hooks
    def _task_ids(self) -> list[str]:
        return self._ids

    def _normalize(self, action: str) -> str:
        return normalize_put(normalize_action(action, self.action_aliases))

    def _start_task(self, task_id: str) -> TaskStart:
        if self._engine is None:
            self._engine = _AlfredEngine()
        gamefile, traj = self._game_for(task_id)
        game, goal = self._goal_for(gamefile, traj)
        feedback = strip_intro(self._engine.load(game))
        self._game_key = (str(gamefile), goal)
        self._plan = None
        self._initial_plan_length = max(len(self._expert_plan()), 1)
        return TaskStart(feedback=feedback, goal=goal, task_type=traj["task_type"], extra_info={"gamefile": gamefile})

    def _engine_step(self, action: str) -> EngineStep:
        assert self._engine is not None
        plan = self._plan
        feedback = self._engine.step(self._commands[action])
        if self._engine.won:
            self._plan = []
        elif self.replan_every_step or plan is None:
            self._plan = None
        elif plan and action == plan[0]:
            self._plan = plan[1:]
        elif not action.startswith(PLAN_PRESERVING_VERBS):
            self._plan = None
        won = self._engine.won
        remaining = len(self._expert_plan())
        progress = 1.0 if won else max(0.0, 1.0 - remaining / self._initial_plan_length)
        return EngineStep(feedback=feedback, won=won, lost=False, progress=progress)

    def _admissible_actions(self) -> list[str]:
        assert self._engine is not None
        self._commands = {normalize_action(c): c for c in self._engine.admissible}
        return list(self._commands)

    def _expert_plan(self) -> list[str]:
        """The cached plan; when stale (the agent left it), the plan remembered for this state, else a planner call.

        With `replan_every_step` the planner runs on every step, as ALFWorld's `policy_commands` does.
        """
        assert self._engine is not None and self._task_id is not None
        if self._plan is None:
            if self.replan_every_step:
                self._plan = self.fresh_plan()
            else:
                key = (*self._game_key, self._engine.state_key())
                self._plan = _remember(_PLAN_MEMO, key, self.fresh_plan, PLAN_MEMO_SIZE, _PLAN_MEMO_LOCK)
        return list(self._plan)

    def fresh_plan(self) -> list[str]:
        """A new planner call from the current state, bypassing every cache."""
        assert self._engine is not None
        start = time.perf_counter()
        plan = [normalize_action(c) for c in self._engine.plan()]
        self.planner_calls += 1
        self.planner_seconds += time.perf_counter() - start
        return plan

    def _privileged_extras(self) -> dict[str, Any]:
        plan = self._plan or []
        assert self._start is not None
        return {"next_action": plan[0] if plan else "", "strategy": strategy(self._start.task_type)}

    def _extra_info(self) -> dict[str, Any]:
        return {"alfworld_version": alfworld_gen.alfworld_version()}


def load_json(path: Path, raw: bytes | None = None, hint: str = "") -> Any:
    """A game or trajectory JSON file's contents, or a ValueError naming the file, the problem and `hint`."""
    try:
        return json.loads(path.read_bytes() if raw is None else raw)
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({type(error).__name__}: {error}); {hint}") from error


# ================================================================================================== official data
def _official_root(data_path: str | os.PathLike | None) -> Path:
    raw = data_path if data_path is not None else os.environ.get("ALFWORLD_DATA")
    if not raw:
        raise FileNotFoundError(MISSING_DATA_HINT.format(reason="$ALFWORLD_DATA is not set"))
    root = Path(raw).expanduser() / "json_2.1.1"
    if not root.is_dir():
        raise FileNotFoundError(MISSING_DATA_HINT.format(reason=f"{root} does not exist"))
    return root


def scan_official_split(root: Path, split: str, task_types: tuple[str, ...]) -> tuple[dict[str, Path], str]:
    """The playable games of an official split, as ALFWorld's `AlfredTWEnv.collect_game_files` filters them.

    Returns {task id: trial directory} and the sha256 of the split's files. Skips movable-receptacle and sliced
    tasks, other task types, games without `game.tw-pddl`, and games not marked solvable.
    """
    split_dir = root / split
    if not split_dir.is_dir():
        raise FileNotFoundError(MISSING_DATA_HINT.format(reason=f"split directory {split_dir} does not exist"))
    games: dict[str, Path] = {}
    digest = hashlib.sha256()
    for traj_path in sorted(split_dir.rglob("traj_data.json")):
        trial = traj_path.parent
        rel = trial.relative_to(root).as_posix()
        if "movable" in rel or "Sliced" in rel:
            continue
        game_path = trial / "game.tw-pddl"
        if not game_path.is_file():
            continue
        traj_bytes = traj_path.read_bytes()
        if load_json(traj_path, traj_bytes, CORRUPT_OFFICIAL_HINT).get("task_type") not in task_types:
            continue
        game_bytes = game_path.read_bytes()
        if not load_json(game_path, game_bytes, CORRUPT_OFFICIAL_HINT).get("solvable", False):
            continue
        games[rel] = trial
        for part in (rel.encode(), traj_bytes, game_bytes):
            digest.update(hashlib.sha256(part).digest())
    return games, digest.hexdigest()


class ALFWorldEnv(_ALFWorldBase):
    """`craft/ALFWorld-v0`: ALFWorld's official games under `$ALFWORLD_DATA/json_2.1.1/<split>/`.

    Task ids are trial paths relative to `json_2.1.1` (e.g. `valid_seen/pick_and_place_simple-.../trial_...`).
    """

    def __init__(self, split: str = "valid_unseen", max_steps: int = 50, render_mode: str | None = None,
                 data_path: str | os.PathLike | None = None, task_types: str | Sequence[str] | None = None,
                 replan_every_step: bool = False) -> None:
        if split not in OFFICIAL_SPLITS:
            raise ValueError(f"unknown split {split!r} for craft/ALFWorld-v0; valid: {list(OFFICIAL_SPLITS)}")
        self.task_types = _check_task_types(task_types)
        self.data_root = _official_root(data_path)
        super().__init__(split, max_steps, render_mode, replan_every_step)
        self._games, self.data_sha256 = scan_official_split(self.data_root, split, self.task_types)
        if not self._games:
            raise RuntimeError(
                f"split {split!r} under {self.data_root} yields zero playable games (task types "
                f"{list(self.task_types)}; movable, sliced and unsolvable games are skipped); check $ALFWORLD_DATA"
            )
        self._ids = sorted(self._games)

    @property
    def data_source(self) -> str:
        return "official"

    def _game_for(self, task_id: str) -> tuple[str, dict[str, Any]]:
        trial = self._games[task_id]
        traj = load_json(trial / "traj_data.json", hint=CORRUPT_OFFICIAL_HINT)
        return str(trial / "game.tw-pddl"), traj

    def _goal_for(self, gamefile: str, traj: dict[str, Any]) -> tuple[str | dict[str, Any], str]:
        data = load_json(Path(gamefile), hint=CORRUPT_OFFICIAL_HINT)
        match = _GOAL_IN_GRAMMAR.search(data["grammar"])
        if match and match["goal"] != "UNKNOWN GOAL":
            return gamefile, match["goal"]
        # Games left with ALFWorld's placeholder get the first goal template, deterministically.
        goal = _templated_goal(traj)
        data["grammar"] = data["grammar"].replace("UNKNOWN GOAL", goal)
        return data, goal

    def _extra_info(self) -> dict[str, Any]:
        return {**super()._extra_info(), "data_sha256": self.data_sha256}


def _templated_goal(traj: dict[str, Any]) -> str:
    params = traj["pddl_params"]
    template = alfworld_gen._goal_library()[traj["task_type"]]["templates"][0]
    return template.format(obj=params["object_target"].lower(), recep=params["parent_target"].lower(),
                           toggle=params["toggle_target"].lower(), mrecep=params["mrecep_target"].lower())


def _check_task_types(task_types: str | Sequence[str] | None) -> tuple[str, ...]:
    """The chosen task types in ALFWorld's order; one name is accepted for a one-type tuple."""
    valid = list(alfworld_gen.TASK_TYPES)
    if task_types is None:
        return alfworld_gen.TASK_TYPES
    if isinstance(task_types, str):
        task_types = (task_types,)  # not its characters
    if not isinstance(task_types, Sequence) or not all(isinstance(t, str) for t in task_types):
        raise ValueError(f"task_types must be a task type name or a sequence of them (valid: {valid}), got "
                         f"{type(task_types).__name__}: {task_types!r:.200}")
    unknown = set(task_types) - set(valid)
    if unknown or not task_types:
        raise ValueError(f"task_types: unknown task types {sorted(unknown)}; valid: {valid}")
    return tuple(t for t in alfworld_gen.TASK_TYPES if t in task_types)


# ================================================================================================== generated games
DEFAULT_TASKS_PER_TYPE = {"train": 1000, "valid": 40, "test": 40}


class ALFWorldGenEnv(_ALFWorldBase):
    """`craft/ALFWorldGen-v0`: ALFWorld-domain games generated offline (see `alfworld_gen`), made lazily per task.

    Splits `train`/`valid`/`test` draw from disjoint seed ranges; `test` uses floor plans never seen in training.
    Task ids look like `gen/train/pick_and_place_simple-000123`.
    """

    def __init__(self, split: str = "train", max_steps: int = 50, render_mode: str | None = None,
                 tasks_per_type: int | None = None, task_types: str | Sequence[str] | None = None,
                 replan_every_step: bool = False) -> None:
        if split not in alfworld_gen.SPLITS:
            raise ValueError(f"unknown split {split!r} for craft/ALFWorldGen-v0; valid: {list(alfworld_gen.SPLITS)}")
        if tasks_per_type is not None and (isinstance(tasks_per_type, bool) or not isinstance(tasks_per_type, int)):
            raise ValueError(f"tasks_per_type must be an int, got {type(tasks_per_type).__name__}: {tasks_per_type!r}")
        self.tasks_per_type = DEFAULT_TASKS_PER_TYPE[split] if tasks_per_type is None else tasks_per_type
        if not 1 <= self.tasks_per_type <= alfworld_gen.MAX_TASKS_PER_TYPE:
            raise ValueError(f"tasks_per_type must be in [1, {alfworld_gen.MAX_TASKS_PER_TYPE}], got {tasks_per_type}")
        self.task_types = _check_task_types(task_types)
        super().__init__(split, max_steps, render_mode, replan_every_step)
        self._ids = sorted(
            alfworld_gen.game_task_id(split, t, i) for t in self.task_types for i in range(self.tasks_per_type)
        )
        self.data_sha256 = alfworld_gen.split_fingerprint(split, self.task_types, self.tasks_per_type)

    @property
    def data_source(self) -> str:
        return "generated"

    def _game_for(self, task_id: str) -> tuple[str, dict[str, Any]]:
        directory = alfworld_gen.cached_game(task_id)  # checked against its manifest, regenerated if corrupt
        traj = load_json(directory / "traj_data.json", hint=f"clear the entry with `{clear_command(directory)}`")
        return str(directory / "game.tw-pddl"), traj

    def _goal_for(self, gamefile: str, traj: dict[str, Any]) -> tuple[str | dict[str, Any], str]:
        return gamefile, traj["turk_annotations"]["anns"][0]["task_desc"]

    def _extra_info(self) -> dict[str, Any]:
        return {**super()._extra_info(), "data_sha256": self.data_sha256,
                "generator_version": alfworld_gen.GENERATOR_VERSION}
