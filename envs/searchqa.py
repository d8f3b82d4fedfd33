"""Search-QA environments of craft-bench: Search-R1's data over a local corpus (`craft/SearchQA-v0`) and multi-hop QA
generated offline over fictional entities (`craft/SearchQAGen-v0`); `search[QUERY]` retrieves, `answer[TEXT]` ends.

Data: `{split}.jsonl` (FlashRAG rows) or Search-R1's `{split}.parquet`, plus `corpus.jsonl`. Reward: Search-R1's
exact match after its answer normalisation, any golden answer counting. Per-dataset success: `per_dataset_success`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import string
import unicodedata
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from craft_bench.envs import searchqa_gen
from craft_bench.envs.base import ActionFormat, EngineStep, TaskStart, TextAgentEnv
from craft_bench.envs.retrieval import DEFAULT_TOPK, Corpus, Retriever, file_sha256, format_passages, make_retriever

DATA_ENV_VAR = "CRAFT_SEARCHQA_DATA"
MISSING_DATA_HINT = (
    "Search-QA data is not available: {reason}. Point $CRAFT_SEARCHQA_DATA (or data_dir=...) at a directory with "
    "{{split}}.jsonl (FlashRAG rows) or {{split}}.parquet (Search-R1's processed rows) and corpus.jsonl "
    "(Search-R1's wiki-18 format), or use craft/SearchQAGen-v0, which generates multi-hop QA offline with no download."
)
SEARCH_ACTION_FORMAT = ActionFormat(
    kind="free",
    syntax="search[QUERY] | answer[TEXT]",
    instruction="Write search[your query] to get the top passages for a query, or answer[your answer] to give the "
                "final answer (a short phrase, no explanation); answering ends the episode.",
    examples=("search[who wrote the iliad]", "answer[Homer]"),
)
NO_HITS_FEEDBACK = "No passages matched the query."
CORRECT_FEEDBACK = "Your answer is correct."
WRONG_FEEDBACK = "Your answer is incorrect."
#: Search-R1's evaluation data sources that need one retrieval vs several; their strategies differ.
MULTI_HOP_DATASETS = frozenset({"hotpotqa", "2wikimultihopqa", "musique", "bamboogle"})
STRATEGIES = {
    **searchqa_gen.STRATEGIES,
    "single_hop": "Search for the question's main entity or a short rephrasing of the question, read the passages, "
                  "and answer with the shortest span that answers it.",
    "multi_hop": "Break the question into hops: search for the first entity, read which entity it leads to, search "
                 "that one, and answer only when the passages state the final fact.",
}

# ================================================================================================= reward (pure)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)
#: Typographic characters agents and corpora use for ASCII ones; folded before Search-R1's normalisation.
_TYPOGRAPHIC = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"', "\u2013": "-",
                              "\u2014": "-", "\u2212": "-", "\u00a0": " ", "\u00df": "ss", "\u00e6": "ae",
                              "\u00c6": "AE", "\u0153": "oe", "\u0152": "OE", "\u00f8": "o", "\u00d8": "O",
                              "\u0142": "l", "\u0141": "L", "\u0111": "d", "\u0110": "D", "\u00fe": "th"})


def fold_ascii(text: str) -> str:
    """Text with accents and typographic characters folded to ASCII (`Zürich` -> `Zurich`, `’` -> `'`).

    Observations are ASCII by the environment contract, so passages and golden answers are folded the same way:
    an agent can type every answer it reads. Other non-ASCII characters pass through (and become `?` in
    observations).
    """
    text = unicodedata.normalize("NFKD", text.translate(_TYPOGRAPHIC))
    return "".join(ch for ch in text if not unicodedata.combining(ch))


def normalize_answer(text: str) -> str:
    """Search-R1's answer normalisation (lower case, ASCII punctuation removed, articles a/an/the dropped,
    whitespace collapsed), applied after `fold_ascii`; identical to Search-R1's on ASCII text."""
    text = "".join(ch for ch in fold_ascii(text).lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, golden_answers: str | Iterable[str]) -> bool:
    """Whether the normalised prediction equals any normalised golden answer (Search-R1's `em_check`)."""
    if isinstance(golden_answers, str):
        golden_answers = [golden_answers]
    predicted = normalize_answer(prediction)
    return any(predicted == normalize_answer(gold) for gold in golden_answers)


def per_dataset_success(records: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Success per dataset and their macro average, as Search-R1 and SDAR report Search-QA.

    `records` are finished episodes with `dataset` (from `info["dataset"]`) and `won` (bool or 0/1). Returns
    `{"per_dataset": {dataset: rate}, "counts": {dataset: n}, "macro_average": mean of the rates}` with datasets
    sorted; the macro average weighs each dataset equally, whatever its size.
    """
    wins: dict[str, float] = {}
    counts: dict[str, int] = {}
    for record in records:
        if "dataset" not in record or "won" not in record:
            raise KeyError(f"each record needs 'dataset' and 'won', got keys {sorted(record)}")
        dataset = str(record["dataset"])
        wins[dataset] = wins.get(dataset, 0.0) + float(bool(record["won"]))
        counts[dataset] = counts.get(dataset, 0) + 1
    if not counts:
        raise ValueError("per_dataset_success needs at least one record")
    rates = {d: wins[d] / counts[d] for d in sorted(counts)}
    return {"per_dataset": rates, "counts": {d: counts[d] for d in sorted(counts)},
            "macro_average": sum(rates.values()) / len(rates)}


# ==================================================================================================== actions
_ACTION = re.compile(r"^(?P<verb>[A-Za-z]+)\s*\[(?P<arg>.*)\]$", re.DOTALL)
_TAGGED = re.compile(r"^<(?P<verb>search|answer)>(?P<arg>.*)</(?P=verb)>$", re.DOTALL | re.IGNORECASE)
VERBS = ("search", "answer")


def canonical_action(action: str) -> str:
    """The canonical form of a typed action: `verb[argument]` with the verb lower-cased and the argument's
    whitespace collapsed, its case and characters kept (queries and answers are free text).

    Accepted spellings: `Search[ q ]`, `search [q]`, a trailing period, and Search-R1's tags `<search> q </search>`
    and `<answer> a </answer>`. Anything else comes back whitespace-collapsed and fails `parse_action`.
    """
    text = " ".join(unicodedata.normalize("NFKC", action).split()).rstrip(".").strip()
    match = _TAGGED.match(text) or _ACTION.match(text)
    if not match:
        return text
    return f"{match['verb'].lower()}[{' '.join(match['arg'].split())}]"


def parse_action(command: str) -> tuple[str, str] | None:
    """(verb, argument) of a canonical action, or None when it is malformed, unknown or empty."""
    match = _ACTION.match(command)
    if not match or match["verb"] not in VERBS or not match["arg"].strip():
        return None
    return match["verb"], match["arg"]


# ======================================================================================================= data
@dataclass(frozen=True)
class QAItem:
    """One question: its id, text, golden answers, Search-R1 data source, and generator metadata if any."""

    task_id: str
    question: str
    answers: tuple[str, ...]
    dataset: str
    metadata: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)


def question_from_prompt(prompt: Any, where: str) -> str:
    """The question inside a Search-R1 prompt (a chat list or a string): the text after its last `Question:`."""
    if isinstance(prompt, str):
        text = prompt
    else:
        messages = [m for m in (prompt or []) if isinstance(m, Mapping) and m.get("role") == "user"]
        if not messages:
            raise ValueError(f"{where}: the prompt has no user message to read the question from")
        text = str(messages[-1].get("content", ""))
    head, marker, question = text.rpartition("Question:")
    if not marker or not question.strip():
        raise ValueError(f"{where}: no 'Question: ...' in the prompt, and the row has no 'question' field")
    return question.strip()


def _answers(value: Any, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    answers = tuple(str(a) for a in (value if value is not None else []))
    if not answers:
        raise ValueError(f"{where}: no golden answers")
    return answers


def load_jsonl_split(path: Path) -> list[QAItem]:
    """FlashRAG rows: `question`, `golden_answers`, `data_source` (Search-R1's name for the dataset; FlashRAG's own
    files lack it, so it defaults to the directory's name, as in FlashRAG's `nq/test.jsonl`), optional `id` and
    `metadata`. Task ids are `{data_source}/{id}` (id defaults to the row's number within its data source)."""
    items = []
    per_source: dict[str, int] = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        row = json.loads(line)
        if "question" not in row or "golden_answers" not in row:
            raise ValueError(f"{where}: a FlashRAG row needs 'question' and 'golden_answers', got {sorted(row)}")
        dataset = str(row.get("data_source") or path.resolve().parent.name)
        index = per_source[dataset] = per_source.get(dataset, -1) + 1
        row_id = str(row.get("id", index))
        items.append(QAItem(f"{dataset}/{row_id}", str(row["question"]).strip(), _answers(row["golden_answers"], where),
                            dataset, dict(row.get("metadata") or {})))
    return items


def load_parquet_split(path: Path) -> list[QAItem]:
    """Search-R1's processed rows: `data_source`, `prompt`, `ability`, `reward_model.ground_truth.target`,
    `extra_info.{split,index}`; the question comes from a `question` column if present, else from the prompt.
    Task ids are `{data_source}/{extra_info.split}_{extra_info.index}`."""
    import pyarrow.parquet as pq

    items = []
    per_source: dict[str, int] = {}
    for number, row in enumerate(pq.read_table(path).to_pylist()):
        where = f"{path} row {number}"
        dataset = str(row.get("data_source") or "unknown")
        index = per_source[dataset] = per_source.get(dataset, -1) + 1
        extra = row.get("extra_info") or {}
        row_id = f"{extra.get('split', 'row')}_{extra.get('index', index)}" if extra else str(index)
        question = row.get("question") or question_from_prompt(row.get("prompt"), where)
        if row.get("golden_answers") is not None:
            answers = row["golden_answers"]
        else:
            answers = ((row.get("reward_model") or {}).get("ground_truth") or {}).get("target")
        items.append(QAItem(f"{dataset}/{row_id}", str(question).strip(), _answers(answers, where), dataset))
    return items


def find_split_file(data_dir: Path, split: str, data_format: str | None) -> Path:
    """`{split}.jsonl` or `{split}.parquet` under `data_dir`; with both present the caller must choose, so results
    never depend on which file happened to be there."""
    if data_format not in (None, "jsonl", "parquet"):
        raise ValueError(f"data_format must be 'jsonl', 'parquet' or None (whichever exists), got {data_format!r}")
    candidates = [data_dir / f"{split}.{ext}" for ext in ("jsonl", "parquet") if data_format in (None, ext)]
    present = [p for p in candidates if p.is_file()]
    if not present:
        raise FileNotFoundError(MISSING_DATA_HINT.format(
            reason=f"no {' or '.join(p.name for p in candidates)} in {data_dir}"))
    if len(present) > 1:
        raise ValueError(f"both {present[0].name} and {present[1].name} exist in {data_dir}; pass "
                         "data_format='jsonl' or 'parquet'")
    return present[0]


def load_split(path: Path) -> list[QAItem]:
    """The questions of one split file; a split with no questions or with repeated task ids is an error."""
    items = load_jsonl_split(path) if path.suffix == ".jsonl" else load_parquet_split(path)
    if not items:
        raise ValueError(f"{path} holds zero questions")
    ids = [item.task_id for item in items]
    if len(set(ids)) != len(ids):
        repeated = sorted({i for i in ids if ids.count(i) > 1})[:3]
        raise ValueError(f"{path} repeats task ids {repeated}; give each row a distinct id")
    return items


# ================================================================================================ environments
#: Parsed split files by (path, sha256), shared read-only by the envs of one process (a group runner's in-process
#: pool makes B x G of them; parsing thousands of rows each time would dominate their construction).
_LOADED_SPLITS: dict[tuple[str, str], dict[str, QAItem]] = {}


class _SearchQABase(TextAgentEnv):
    """The engine shared by both ids: questions, a corpus and a retriever; search and answer."""

    action_format = SEARCH_ACTION_FORMAT

    def __init__(self, split: str, max_steps: int, render_mode: str | None, data_dir: Path, split_file: Path,
                 corpus_path: str | os.PathLike | None, retriever: str | Retriever, topk: int,
                 dense_index: str | os.PathLike | None) -> None:
        super().__init__(split, max_steps, render_mode)
        if int(topk) < 1:
            raise ValueError(f"topk must be >= 1, got {topk}")
        self.topk = int(topk)
        self.data_dir = data_dir
        split_sha = file_sha256(split_file)
        key = (str(split_file.resolve()), split_sha)
        if key not in _LOADED_SPLITS:
            _LOADED_SPLITS[key] = {item.task_id: item for item in load_split(split_file)}
        self._items = _LOADED_SPLITS[key]
        self._ids = sorted(self._items)
        corpus_file = Path(corpus_path).expanduser() if corpus_path is not None else data_dir / "corpus.jsonl"
        # Only the local retrievers read the corpus: a server has its own, a Retriever instance brings its own.
        needs_corpus = isinstance(retriever, str) and not retriever.startswith(("http://", "https://"))
        if needs_corpus and not corpus_file.is_file():
            raise FileNotFoundError(MISSING_DATA_HINT.format(reason=f"corpus file {corpus_file} does not exist"))
        self.corpus = Corpus(corpus_file) if corpus_file.is_file() else None
        self.retriever = make_retriever(retriever, self.corpus, dense_index)
        identity = {"split_file": split_sha,
                    "corpus": self.corpus.sha256 if self.corpus is not None else self.retriever.name}
        self.data_sha256 = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
        self._item: QAItem | None = None
        self._shown: set[str] = set()

    # ------------------------------------------------------------------ engine hooks
    def _task_ids(self) -> list[str]:
        return self._ids

    def _start_task(self, task_id: str) -> TaskStart:
        self._item = self._items[task_id]
        self._shown = set()
        question = fold_ascii(self._item.question)
        return TaskStart(f"Question: {question}", question, self._task_type(self._item),
                         {"dataset": self._item.dataset})

    def _engine_step(self, action: str) -> EngineStep:
        assert self._item is not None
        verb, argument = parse_action(action)  # type: ignore[misc]  # validated by _is_valid_action
        if verb == "answer":
            won = exact_match(argument, self._item.answers)
            return EngineStep(CORRECT_FEEDBACK if won else WRONG_FEEDBACK, won=won, lost=not won, progress=float(won))
        hits = self.retriever.search([argument], self.topk)[0]
        self._shown.update(hit["document"]["id"] for hit in hits)
        feedback = fold_ascii(format_passages(hits)) if hits else NO_HITS_FEEDBACK
        return EngineStep(feedback, won=False, lost=False, progress=self._hop_progress())

    def _admissible_actions(self) -> list[str]:
        # Free-form: no state offers a concrete list (ActionFormat "free" allows it empty).
        return []

    def _normalize(self, action: str) -> str:
        return canonical_action(action)

    def _is_valid_action(self, command: str) -> bool:
        return parse_action(command) is not None

    def _expert_plan(self) -> list[str]:
        assert self._item is not None
        searches = [f"search[{hop['query']}]" for hop in self._item.metadata.get("hops", [])
                    if hop["passage_id"] not in self._shown]
        return searches + [f"answer[{fold_ascii(self._item.answers[0])}]"]

    def _privileged_extras(self) -> dict[str, Any]:
        assert self._item is not None
        return {"answers": [fold_ascii(a) for a in self._item.answers],
                "strategy": STRATEGIES[self._strategy_key(self._item)]}

    def _extra_info(self) -> dict[str, Any]:
        return {"data_sha256": self.data_sha256, "retriever": self.retriever.name, "topk": self.topk}

    # ------------------------------------------------------------------ helpers
    def _task_type(self, item: QAItem) -> str:
        return item.dataset

    def _strategy_key(self, item: QAItem) -> str:
        return "multi_hop" if item.dataset in MULTI_HOP_DATASETS else "single_hop"

    def _hop_progress(self) -> float:
        assert self._item is not None
        hops = self._item.metadata.get("hops", [])
        found = sum(hop["passage_id"] in self._shown for hop in hops)
        return found / (len(hops) + 1)


class SearchQAEnv(_SearchQABase):
    """`craft/SearchQA-v0`: Search-R1's QA data (`{split}.jsonl` or `{split}.parquet`) over `corpus.jsonl`.

    `gym.make("craft/SearchQA-v0", data_dir=PATH, split="test")`, or `$CRAFT_SEARCHQA_DATA` without `data_dir`.
    `retriever`: `bm25` (default, bm25s), `dense:<local model dir>` (E5 + FAISS, `dense` extra; `dense_index` may
    name a prebuilt FAISS index such as Search-R1's `e5_Flat.index`) or the URL of Search-R1's retrieval server
    (`http://127.0.0.1:8000/retrieve`; then `corpus.jsonl` is optional). `task_type` and `info["dataset"]` are the
    question's Search-R1 `data_source` (nq, hotpotqa, ...).
    """

    def __init__(self, split: str = "test", max_steps: int = 4, render_mode: str | None = None,
                 data_dir: str | os.PathLike | None = None, corpus_path: str | os.PathLike | None = None,
                 data_format: str | None = None, retriever: str | Retriever = "bm25",
                 topk: int = DEFAULT_TOPK, dense_index: str | os.PathLike | None = None) -> None:
        raw = data_dir if data_dir is not None else os.environ.get(DATA_ENV_VAR)
        if not raw:
            raise FileNotFoundError(MISSING_DATA_HINT.format(reason=f"data_dir is not given and ${DATA_ENV_VAR} "
                                                                    "is not set"))
        root = Path(raw).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(MISSING_DATA_HINT.format(reason=f"{root} is not a directory"))
        self._source = str(root)
        super().__init__(split, max_steps, render_mode, root, find_split_file(root, split, data_format),
                         corpus_path, retriever, topk, dense_index)

    @property
    def data_source(self) -> str:
        return self._source


class SearchQAGenEnv(_SearchQABase):
    """`craft/SearchQAGen-v0`: 1-hop, 2-hop bridge and comparison questions over fictional entities, generated
    offline (`searchqa_gen`) and cached under `$CRAFT_BENCH_HOME/searchqa-gen/`.

    Splits `train`/`valid`/`test` ask about disjoint entities over one shared corpus. Privileged context adds the
    supporting passages; the expert plan searches each hop's entity by name, then answers.
    """

    def __init__(self, split: str = "train", max_steps: int = 4, render_mode: str | None = None,
                 questions_per_family: int | None = None, data_seed: int = 0, world_scale: float = 1.0,
                 retriever: str | Retriever = "bm25", topk: int = DEFAULT_TOPK,
                 dense_index: str | os.PathLike | None = None) -> None:
        if split not in searchqa_gen.SPLITS:
            raise ValueError(f"unknown split {split!r} for craft/SearchQAGen-v0; valid: {list(searchqa_gen.SPLITS)}")
        counts = dict(searchqa_gen.DEFAULT_QUESTIONS_PER_FAMILY)
        if questions_per_family is not None:
            counts[split] = int(questions_per_family)
        self.config = searchqa_gen.GenConfig(seed=int(data_seed), questions_per_family=counts,
                                             world_scale=float(world_scale))
        root = searchqa_gen.cached_dataset(self.config)
        super().__init__(split, max_steps, render_mode, root, root / f"{split}.jsonl", None, retriever, topk,
                         dense_index)

    @property
    def data_source(self) -> str:
        return "generated"

    def _task_type(self, item: QAItem) -> str:
        return str(item.metadata["family"])

    def _strategy_key(self, item: QAItem) -> str:
        return str(item.metadata["family"])

    def _privileged_extras(self) -> dict[str, Any]:
        assert self._item is not None
        passages = [dict(p) for p in self._item.metadata["supporting_passages"]]
        return {**super()._privileged_extras(), "supporting_passages": passages,
                "evidence": fold_ascii(format_passages([{"document": p, "score": 0.0} for p in passages]))}

    def _extra_info(self) -> dict[str, Any]:
        return {**super()._extra_info(), "generator_version": searchqa_gen.GENERATOR_VERSION}
