"""WebShop environments of craft-bench: WebShop's data files (`craft/WebShop-v0`) or a generated catalogue
(`craft/WebShopGen-v0`), WebShop's text mode (search, results, item pages, buy) and its purchase score.

What follows WebShop's code (princeton-nlp/WebShop, `web_agent_site/`) and where this differs is in
docs/envs/webshop.md. In short: products and human goals are loaded as `engine.load_products` and
`goal.get_human_goals` do, goals are shuffled with seed 233 and split test = [0:500], eval = [500:1500],
train = the rest; search is BM25 (bm25s, Lucene's parameters and analyzer as far as bm25s allows) over the text
WebShop indexes; pages render as WebShop's `text` observation mode; the score is `webshop_reward.purchase_score`.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import re
import threading
from abc import abstractmethod
from collections import OrderedDict
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import numpy as np

from craft_bench.envs.base import ActionFormat, EngineStep, TaskStart, TextAgentEnv, normalize_action
from craft_bench.envs.cache import build_once, cache_dir
from craft_bench.envs.webshop_reward import (
    FUZZY_MATCH_THRESHOLD,
    NO_PRICE_BOUND,
    Score,
    fuzzy_score,
    normalize_color,
    price_bound_choices,
    purchase_score,
)

# ------------------------------------------------------------------------------------------------ constants
#: WebShop's file names: (products, instruction attributes) per setting, and the human instructions.
FILE_NAMES = {
    "all": ("items_shuffle.json", "items_ins_v2.json"),
    "small": ("items_shuffle_1000.json", "items_ins_v2_1000.json"),
}
HUMAN_INSTRUCTIONS_FILE = "items_human_ins.json"
DATA_ENV_VAR = "CRAFT_WEBSHOP_DATA"
#: `random.seed(233); random.shuffle(goals)` in WebShop's SimServer, then the baseline's split ranges.
GOAL_SHUFFLE_SEED = 233
SPLIT_RANGES = {"test": (0, 500), "eval": (500, 1500), "train": (1500, None)}
SEARCH_RETURN_N = 50
PRODUCT_WINDOW = 10
SEP = " [SEP] "
BACK_TO_SEARCH, NEXT_PAGE, PREV_PAGE, BUY_NOW = "back to search", "next >", "< prev", "buy now"
SUB_PAGES = ("description", "features", "reviews")
MISSING_DATA_HINT = (
    "WebShop's data is not available: {reason}. Download WebShop's files (items_shuffle.json and items_ins_v2.json, "
    "or items_shuffle_1000.json and items_ins_v2_1000.json for the small setting, plus items_human_ins.json; see "
    "WebShop's setup.sh) into one directory and pass data_dir=... or set ${var}; or use craft/WebShopGen-v0, which "
    "generates a catalogue and instructions in WebShop's format offline with no download."
)
#: Lucene's default English stop words (EnglishAnalyzer.ENGLISH_STOP_WORDS_SET), which pyserini's index drops.
LUCENE_STOP_WORDS = (
    "a", "an", "and", "are", "as", "at", "be", "but", "by", "for", "if", "in", "into", "is", "it", "no", "not", "of",
    "on", "or", "such", "that", "the", "their", "then", "there", "these", "they", "this", "to", "was", "will", "with",
)
#: pyserini's BM25 defaults (LuceneSearcher: k1=0.9, b=0.4).
BM25_K1, BM25_B = 0.9, 0.4
_TOKEN = re.compile(r"(?u)\b\w+\b")
_PRICE_CLAUSE = re.compile(r",? and price lower than [\d.]+ dollars$")
_ACTION = re.compile(r"^(search|click)\s*\[(.*)\]$", re.DOTALL)
SEARCH_MEMO_SIZE = 4096
#: Bumped whenever loading, the indexed text or its analysis changes (part of the on-disk cache keys).
CACHE_VERSION = "1"


# ------------------------------------------------------------------------------------------------ search
class ProductSearch:
    """BM25 over WebShop's product documents: title, description, first bullet point and option text, lower case
    (as `search_engine/convert_product_file_format.py` builds Lucene's documents).

    Analysis is Lucene's as far as bm25s allows: word tokens, Lucene's English stop words, the Porter stemmer;
    BM25 with Lucene's idf and pyserini's k1=0.9, b=0.4. The top 50 documents with a positive score are returned,
    ties broken by catalogue position (Lucene breaks them by document id, which is insertion order too).
    """

    def __init__(self, documents: list[str] | None = None, saved: Path | None = None):
        import bm25s
        import Stemmer

        self._stem = Stemmer.Stemmer("porter").stemWords
        self._stop = frozenset(LUCENE_STOP_WORDS)
        if saved is not None:
            # Memory-mapped: worker processes of one machine share the index through the page cache.
            self.retriever = bm25s.BM25.load(str(saved), mmap=True, show_progress=False)
        else:
            self.retriever = bm25s.BM25(k1=BM25_K1, b=BM25_B, method="lucene")
            self.retriever.index([self.tokenize(doc) for doc in documents or []], show_progress=False)
        # bm25s keeps the empty string in its vocabulary (the stem of a lone "s", as in "women's") without a column in
        # the score matrix, and rejects a query that holds it: only terms with a column can match.
        indexed_terms = len(self.retriever.scores["indptr"]) - 1
        self._vocab = {term: i for term, i in self.retriever.vocab_dict.items() if i < indexed_terms}
        self._memo: OrderedDict[str, list[int]] = OrderedDict()
        self._lock = threading.Lock()

    def save(self, directory: Path) -> None:
        self.retriever.save(str(directory), show_progress=False)

    def tokenize(self, text: str) -> list[str]:
        words = [w for w in _TOKEN.findall(text.lower()) if w not in self._stop]
        return self._stem(words)

    def search(self, query: str, k: int = SEARCH_RETURN_N) -> list[int]:
        """Catalogue positions of the best `k` products for `query` (memoised: agents repeat queries)."""
        with self._lock:
            if query in self._memo:
                self._memo.move_to_end(query)
                return list(self._memo[query])
        tokens = [t for t in self.tokenize(query) if t in self._vocab]
        hits: list[int] = []
        if tokens:
            scores = self.retriever.get_scores(tokens)
            positive = int(np.count_nonzero(scores > 0))
            take = min(k, positive)
            if take:
                # The k-th best score; every document scoring at least that is a candidate, so ties at the cut
                # are decided by position, not by argpartition's arbitrary order.
                threshold = np.partition(scores, len(scores) - take)[len(scores) - take]
                candidates = np.flatnonzero(scores >= threshold)
                order = np.lexsort((candidates, -scores[candidates]))
                hits = [int(i) for i in candidates[order][:take]]
        with self._lock:
            self._memo[query] = hits
            if len(self._memo) > SEARCH_MEMO_SIZE:
                self._memo.popitem(last=False)
        return list(hits)


def product_document(product: dict[str, Any]) -> str:
    """The text WebShop indexes for a product."""
    option_text = ", and ".join(f"{name}: {', '.join(values)}" for name, values in product["options"].items())
    bullets = product["BulletPoints"]
    return " ".join([product["Title"], product["Description"], bullets[0] if bullets else "", option_text]).lower()


# ------------------------------------------------------------------------------------------------ data
@dataclass
class Catalogue:
    """A loaded WebShop data set: products (WebShop's loaded-product keys), their prices and the shuffled goals."""

    products: list[dict[str, Any]]
    position: dict[str, int]
    prices: list[float]
    goals: list[dict[str, Any]]
    source_dir: Path
    setting: str
    #: `files_key` of the data files: names the on-disk caches built from them.
    key: str
    _search: ProductSearch | None = None

    @property
    def search(self) -> ProductSearch:
        """The search index, built on first use (task lists and goals do not need it), once per machine: it is
        saved under $CRAFT_BENCH_HOME/envs/webshop_index and memory-mapped from there."""
        if self._search is None:
            path = build_once(cache_dir("envs", "webshop_index") / f"{self.key}-bm25-{BM25_K1}-{BM25_B}",
                              lambda tmp: ProductSearch([product_document(p) for p in self.products]).save(tmp))
            self._search = ProductSearch(saved=path)
        return self._search


def resolve_data_dir(data_dir: str | os.PathLike[str] | None) -> Path:
    raw = data_dir if data_dir is not None else os.environ.get(DATA_ENV_VAR)
    if not raw:
        raise FileNotFoundError(MISSING_DATA_HINT.format(reason=f"no data_dir given and ${DATA_ENV_VAR} is not set",
                                                         var=DATA_ENV_VAR))
    path = Path(raw).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(MISSING_DATA_HINT.format(reason=f"{path} is not a directory", var=DATA_ENV_VAR))
    return path


def resolve_setting(data_dir: Path, setting: str) -> str:
    """`all` or `small`: the one asked for, or with `auto` the full files when present, else the small ones."""
    if setting not in ("auto", *FILE_NAMES):
        raise ValueError(f"setting must be 'auto', 'all' or 'small', got {setting!r}")
    candidates = list(FILE_NAMES) if setting == "auto" else [setting]
    for name in candidates:
        if all((data_dir / f).is_file() for f in (*FILE_NAMES[name], HUMAN_INSTRUCTIONS_FILE)):
            return name
    wanted = " or ".join(
        "{" + ", ".join((*FILE_NAMES[name], HUMAN_INSTRUCTIONS_FILE)) + "}" for name in candidates
    )
    raise FileNotFoundError(MISSING_DATA_HINT.format(reason=f"{data_dir} lacks {wanted}", var=DATA_ENV_VAR))


def _parse_pricing(pricing: Any) -> tuple[list[float], str]:
    """WebShop's pricing: the dollar amounts of a string like "$12.99" or "$10.99 - $15.99" (at most two),
    and the tag shown on pages. No pricing means $100.0."""
    if not pricing:
        return [100.0], "$100.0"
    values = [float(Decimal(re.sub(r"[^\d.]", "", part))) for part in str(pricing).split("$")[1:]]
    if not values:
        return [100.0], "$100.0"
    if len(values) == 1:
        return values, f"${values[0]}"
    return values[:2], f"${values[0]} to ${values[1]}"


def process_products(raw_products: list[dict[str, Any]], attributes: dict[str, Any]) -> list[dict[str, Any]]:
    """WebShop's `load_products` on raw product records: invalid and duplicate asins dropped, page fields added
    (Title, Description, BulletPoints, Price, options with lower-cased names and values), `Attributes` from the
    instruction-attribute file (`['DUMMY_ATTR']` when absent), query lower-cased."""
    seen: set[str] = set()
    products = []
    for raw in raw_products:
        asin = str(raw["asin"])
        if asin == "nan" or len(asin) > 10 or asin in seen:
            continue
        seen.add(asin)
        pricing, price_tag = _parse_pricing(raw.get("pricing"))
        options: dict[str, list[str]] = {}
        for name, contents in (raw.get("customization_options") or {}).items():
            if contents is None:
                continue
            options[name.lower()] = [c["value"].strip().replace("/", " | ").lower() for c in contents]
        small = raw.get("small_description")
        record = attributes.get(asin) or {}
        products.append({
            "asin": asin,
            "category": raw.get("category", ""),
            "query": str(raw.get("query", "")).lower().strip(),
            "product_category": raw.get("product_category", ""),
            "Title": raw["name"],
            "Description": raw.get("full_description") or "",
            "BulletPoints": small if isinstance(small, list) else [small or ""],
            "Price": price_tag,
            "pricing": pricing,
            "options": options,
            "Attributes": record["attributes"] if "attributes" in record else ["DUMMY_ATTR"],
            "Reviews": [],
            "Rating": "N.A.",
        })
    return products


def product_prices(products: list[dict[str, Any]], seed: int) -> list[float]:
    """One price per product as WebShop's `generate_product_prices`: the single price, or for a price range a
    uniform draw between its ends. WebShop draws from the unseeded global `random`; here from a Generator seeded
    with `seed`, so a catalogue's prices are the same in every process."""
    rng = np.random.default_rng(np.random.SeedSequence(seed))
    prices = []
    for product in products:
        pricing = product["pricing"]
        prices.append(float(pricing[0]) if len(pricing) == 1 else float(rng.uniform(pricing[0], pricing[1])))
    return prices


def human_goals(products: list[dict[str, Any]], human: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """WebShop's `get_human_goals` without the price bound (drawn per episode): one goal per human instruction
    of a loaded product, in product order; instructions without attributes are skipped."""
    goals = []
    for product in products:
        for instruction in human.get(product["asin"], []):
            if not instruction.get("instruction_attributes"):
                continue
            goals.append({
                "asin": product["asin"],
                "category": product["category"],
                "query": product["query"],
                "name": product["Title"],
                "product_category": product["product_category"],
                "instruction": instruction["instruction"].strip("."),
                "attributes": list(instruction["instruction_attributes"]),
                "goal_options": list(instruction.get("instruction_options") or []),
            })
    return goals


def shuffle_goals(goals: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The goal order of WebShop's SimServer (`random.seed(233); random.shuffle(goals)`), reproduced with a
    private `random.Random(233)`, so the splits hold the same goals as WebShop's and no global state is touched."""
    shuffled = list(goals)
    random.Random(GOAL_SHUFFLE_SEED).shuffle(shuffled)
    return shuffled


def split_range(split: str, n_goals: int, source: str) -> range:
    """The goal indices of `split`; a data set too small for WebShop's split is an error that says so."""
    if split not in SPLIT_RANGES:
        raise ValueError(f"unknown WebShop split {split!r}; valid: {list(SPLIT_RANGES)}")
    start, stop = SPLIT_RANGES[split]
    needed = start + 1 if stop is None else stop
    if n_goals < needed:
        raise ValueError(
            f"{source} has {n_goals} goals, too few for WebShop's split (test = goals[0:500], eval = goals[500:1500], "
            f"train = goals[1500:]): split {split!r} needs at least {needed}"
        )
    return range(start, n_goals if stop is None else stop)


_CATALOGUES: dict[tuple[Any, ...], Catalogue] = {}
_CATALOGUE_LOCK = threading.Lock()


def files_key(data_dir: Path, setting: str) -> str:
    """A key for on-disk caches derived from the data files: their resolved paths, sizes and mtimes."""
    files = [data_dir / f for f in (*FILE_NAMES[setting], HUMAN_INSTRUCTIONS_FILE)]
    stats = [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    return hashlib.sha256(json.dumps({"cache": CACHE_VERSION, "setting": setting, "files": stats}).encode()
                          ).hexdigest()[:24]


def _parse_files(data_dir: Path, setting: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    products_file, attributes_file = FILE_NAMES[setting]
    products = process_products(json.loads((data_dir / products_file).read_text()),
                                json.loads((data_dir / attributes_file).read_text()))
    goals = human_goals(products, json.loads((data_dir / HUMAN_INSTRUCTIONS_FILE).read_text()))
    return products, shuffle_goals(goals)


def load_catalogue(data_dir: Path, setting: str = "auto", price_seed: int = 0) -> Catalogue:
    """The data set in `data_dir` (WebShop's file names), loaded once per process (envs of one data set share the
    read-only products, goals and search index) and parsed once per machine: the processed products and goals are
    pickled under $CRAFT_BENCH_HOME/envs/webshop_catalogue (WebShop's full JSON takes minutes to parse)."""
    setting = resolve_setting(data_dir, setting)
    key = files_key(data_dir, setting)
    with _CATALOGUE_LOCK:
        if (key, price_seed) not in _CATALOGUES:
            parsed = build_once(cache_dir("envs", "webshop_catalogue") / f"{key}.pkl",
                                lambda tmp: tmp.write_bytes(pickle.dumps(_parse_files(data_dir, setting),
                                                                         protocol=pickle.HIGHEST_PROTOCOL)))
            products, goals = pickle.loads(parsed.read_bytes())
            _CATALOGUES[key, price_seed] = Catalogue(
                products=products,
                position={p["asin"]: i for i, p in enumerate(products)},
                prices=product_prices(products, price_seed),
                goals=goals,
                source_dir=data_dir,
                setting=setting,
                key=key,
            )
        return _CATALOGUES[key, price_seed]


def data_sha256(data_dir: Path, setting: str) -> str:
    """sha256 over the data files' names and contents, computed once per machine (the full catalogue is
    gigabytes) and kept beside the parsed catalogue, keyed by the files' paths, sizes and mtimes."""
    setting = resolve_setting(data_dir, setting)

    def digest(target: Path) -> None:
        hasher = hashlib.sha256()
        for name in (*FILE_NAMES[setting], HUMAN_INSTRUCTIONS_FILE):
            hasher.update(name.encode())
            with (data_dir / name).open("rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    hasher.update(block)
        target.write_text(hasher.hexdigest())

    path = build_once(cache_dir("envs", "webshop_catalogue") / f"{files_key(data_dir, setting)}.sha256", digest)
    return path.read_text().strip()


def instruction_query(instruction: str) -> str:
    """The search query the instruction itself suggests: its text without the price clause, lower case, without
    square brackets (they end an action). It is built from what the agent sees, so it is no privileged hint."""
    text = normalize_action(instruction)
    text = _PRICE_CLAUSE.sub("", text).replace("[", " ").replace("]", " ")
    return re.sub(r"\s+", " ", text).strip()


def option_action_value(value: str) -> str:
    """How an option value is typed in `click[...]` (normalised like every action)."""
    return normalize_action(value)


# ------------------------------------------------------------------------------------------------ environment
@dataclass
class _Page:
    """Where the agent is: the page kind and the session state WebShop keeps in its user session."""

    kind: str = "search"  # search | results | item | sub | done
    keywords: str = ""
    page: int = 1
    results: tuple[int, ...] = ()
    product: int | None = None
    options: dict[str, str] | None = None
    sub_page: str = ""


class WebShopBase(TextAgentEnv):
    """The environment code both WebShop ids share; subclasses say where the data directory is."""

    env_version = "v0"
    action_format = ActionFormat(
        kind="free",
        syntax="search[QUERY] | click[VALUE]",
        instruction=(
            "Write search[your query] while the page has a search bar, or click[value] with one of the page's "
            "clickable values (a product id, an option, a button such as buy now or < prev)."
        ),
        examples=("search[red cotton t-shirt for men]", "click[b07xyz1234]", "click[large]", "click[buy now]"),
    )
    setting: str = "all"
    price_seed: int = 0

    def __init__(self, split: str, max_steps: int, render_mode: str | None):
        if split not in SPLIT_RANGES:
            raise ValueError(f"unknown WebShop split {split!r}; valid: {list(SPLIT_RANGES)}")
        super().__init__(split=split, max_steps=max_steps, render_mode=render_mode)
        self._catalogue: Catalogue | None = None
        self._ids: list[str] | None = None
        self._goal: dict[str, Any] = {}
        self._instruction = ""
        self._page = _Page()
        self._clickables: dict[str, tuple[str, Any]] = {}
        self._score: Score | None = None
        self._plan_memo: dict[Any, list[str]] = {}
        self._win_memo: dict[int, bool] = {}

    @property
    @abstractmethod
    def data_dir(self) -> Path:
        """The directory holding the data files under WebShop's names."""

    @property
    @abstractmethod
    def data_sha256(self) -> str:
        """What identifies the data (a content hash, or the generator's config hash)."""

    @abstractmethod
    def _source_name(self) -> str:
        """The data set in words, for error messages."""

    # ------------------------------------------------------------------ data
    @property
    def catalogue(self) -> Catalogue:
        if self._catalogue is None:
            self._catalogue = load_catalogue(self.data_dir, self.setting, self.price_seed)
        return self._catalogue

    def _task_ids(self) -> list[str]:
        if self._ids is None:
            indices = split_range(self.split, len(self.catalogue.goals), self._source_name())
            self._ids = [f"goal-{i:05d}" for i in indices]
        return self._ids

    # ------------------------------------------------------------------ engine hooks
    def _start_task(self, task_id: str) -> TaskStart:
        catalogue = self.catalogue
        goal = dict(catalogue.goals[int(task_id.split("-")[1])])
        price = catalogue.prices[catalogue.position[goal["asin"]]]
        choices = price_bound_choices(price)
        if len(choices) >= 2:
            # WebShop: `_, price_upper = sorted(random.sample(price_range, 2))`, here from the env's generator.
            picked = self.np_random.choice(len(choices), size=2, replace=False)
            goal["price_upper"] = max(choices[int(i)] for i in picked)
            self._instruction = f"{goal['instruction']}, and price lower than {goal['price_upper']:.2f} dollars"
        else:
            goal["price_upper"] = NO_PRICE_BOUND
            self._instruction = goal["instruction"]
        self._goal = goal
        self._page = _Page()
        self._score = None
        self._plan_memo = {}
        self._win_memo = {}
        self._clickables = {}
        return TaskStart(
            feedback=self._render(),
            goal=self._instruction,
            task_type=str(goal["category"]) or "webshop",
            extra_info={"split": self.split},
        )

    def _admissible_actions(self) -> list[str]:
        self._clickables = self._page_clickables()
        actions = [f"search[{instruction_query(self._instruction)}]"] if self._page.kind == "search" else []
        return actions + [f"click[{value}]" for value in self._clickables]

    def _normalize(self, action: str) -> str:
        text = normalize_action(action)
        match = _ACTION.match(text)
        return text if match is None else f"{match.group(1)}[{match.group(2).strip()}]"

    def _is_valid_action(self, command: str) -> bool:
        match = _ACTION.match(command)
        if match is None or not match.group(2):
            return False
        verb, arg = match.groups()
        if verb == "search":
            return self._page.kind == "search"
        return arg in self._clickables

    def _engine_step(self, action: str) -> EngineStep:
        verb, arg = _ACTION.match(action).groups()  # type: ignore[union-attr]
        page = self._page
        if verb == "search":
            self._show_results(arg, 1)
        else:
            kind, payload = self._clickables[arg]
            if kind == "back":
                self._page = _Page()
            elif kind == "next":
                self._show_results(page.keywords, page.page + 1)
            elif kind == "prev" and page.kind == "results":
                self._show_results(page.keywords, page.page - 1)
            elif kind == "prev" and page.kind == "item":
                self._show_results(page.keywords, page.page)
            elif kind == "prev":  # from a sub page back to its item page, options kept
                page.kind, page.sub_page = "item", ""
            elif kind == "product":
                page.kind, page.product = "item", self.catalogue.position[payload]
            elif kind == "option":
                name, value = payload
                assert page.options is not None
                page.options[name] = value
            elif kind == "sub":
                page.kind, page.sub_page = "sub", payload
            elif kind == "buy":
                return self._buy()
        return EngineStep(feedback=self._render(), won=False, lost=False, progress=0.0)

    def _expert_plan(self) -> list[str]:
        page = self._page
        key = (page.kind, page.keywords, page.page, page.product, tuple(sorted((page.options or {}).items())),
               page.sub_page)
        if key not in self._plan_memo:
            self._plan_memo[key] = self._plan_from_here()
        return list(self._plan_memo[key])

    def _privileged_extras(self) -> dict[str, Any]:
        goal = self._goal
        target = self.catalogue.products[self.catalogue.position[goal["asin"]]]
        bound = "none" if goal["price_upper"] >= NO_PRICE_BOUND else f"{goal['price_upper']:.2f} dollars"
        return {
            "target_asin": goal["asin"],
            "goal_attributes": list(goal["attributes"]),
            "goal_options": list(goal["goal_options"]),
            "price_upper": float(goal["price_upper"]),
            "target": f"{goal['asin'].lower()} ({target['Title']})",
            "requirements": (
                f"attributes {', '.join(goal['attributes'])}; options {', '.join(goal['goal_options']) or 'none'}; "
                f"price bound {bound}"
            ),
        }

    def _extra_info(self) -> dict[str, Any]:
        score = self._score
        return {
            "task_score": 0.0 if score is None else float(score.score),
            "score_parts": None if score is None else score.as_dict(),
            "data_sha256": self.data_sha256,
            "webshop_setting": self.setting,
        }

    # ------------------------------------------------------------------ pages
    def _show_results(self, keywords: str, page_number: int) -> None:
        # WebShop's search_results resets the chosen product and options.
        self._page = _Page("results", keywords, page_number, tuple(self.catalogue.search.search(keywords)), None, {})

    def _buy(self) -> EngineStep:
        page = self._page
        assert page.product is not None
        product = self.catalogue.products[page.product]
        self._score = purchase_score(product, self.catalogue.prices[page.product], (page.options or {}).values(),
                                     self._goal)
        page.kind = "done"
        won = self._score.score == 1.0
        return EngineStep(feedback=self._render(), won=won, lost=not won, progress=float(self._score.score))

    def _page_clickables(self) -> dict[str, tuple[str, Any]]:
        """Action value -> (kind, payload), in WebShop's order: buttons, product links, then options (a value
        shared by two option groups is one clickable, the later group's, as WebShop's dict of clickables)."""
        page = self._page
        clicks: dict[str, tuple[str, Any]] = {}
        if page.kind == "results":
            clicks[BACK_TO_SEARCH] = ("back", "")
            if page.page > 1:
                clicks[PREV_PAGE] = ("prev", "")
            clicks[NEXT_PAGE] = ("next", "")
            for position in self._results_on_page():
                asin = self.catalogue.products[position]["asin"]
                clicks[asin.lower()] = ("product", asin)
        elif page.kind in ("item", "sub"):
            clicks[BACK_TO_SEARCH] = ("back", "")
            clicks[PREV_PAGE] = ("prev", "")
            if page.kind == "item":
                for sub in SUB_PAGES:
                    clicks[sub] = ("sub", sub)
                clicks[BUY_NOW] = ("buy", "")
                for name, values in self.catalogue.products[page.product]["options"].items():  # type: ignore[index]
                    for value in values:
                        clicks[option_action_value(value)] = ("option", (name, value))
        return clicks

    def _results_on_page(self) -> list[int]:
        page = self._page
        return list(page.results[(page.page - 1) * PRODUCT_WINDOW: page.page * PRODUCT_WINDOW])

    def _render(self) -> str:
        """The page in WebShop's `text` observation mode: its visible strings in page order, joined by [SEP]."""
        page = self._page
        head = ["Instruction:", self._instruction]
        if page.kind == "search":
            parts = ["WebShop", *head, "Search"]
        elif page.kind == "results":
            parts = [*head, "Back to Search", f"Page {page.page} (Total results: {len(page.results)})"]
            parts += ["< Prev", "Next >"] if page.page > 1 else ["Next >"]
            for position in self._results_on_page():
                product = self.catalogue.products[position]
                parts += [product["asin"], product["Title"], product["Price"]]
        elif page.kind == "item":
            product = self.catalogue.products[page.product]  # type: ignore[index]
            parts = [*head, "Back to Search", "< Prev"]
            for name, values in product["options"].items():
                parts += [name, *values]
            parts += [product["Title"], f"Price: {product['Price']}", f"Rating: {product['Rating']}",
                      "Description", "Features", "Reviews", "Buy Now"]
        elif page.kind == "sub":
            product = self.catalogue.products[page.product]  # type: ignore[index]
            parts = [*head, "Back to Search", "< Prev"]
            if page.sub_page == "description":
                parts.append(product["Description"])
            elif page.sub_page == "features":
                parts += list(product["BulletPoints"])
            else:
                for review in product["Reviews"]:
                    parts += [f'"{review.get("title", "")}"', str(review.get("score", "")), review.get("body", "")]
        else:
            assert self._score is not None
            parts = ["Thank you for shopping with us!", "Your score (min 0.0, max 1.0)", f"{self._score.score}"]
        return SEP.join(part.strip() for part in parts if part and part.strip())

    # ------------------------------------------------------------------ expert
    def _plan_from_here(self) -> list[str]:
        """A winning sequence from the current page: on a product that can score 1.0 (or the target), its goal
        options then buy now; on results, to the first result that can score 1.0 (the target at the latest, via
        next/prev); else back (< prev, back to search) and search the instruction's own query, or the target's
        title when that query finds nothing that wins. Empty when neither does (never for generated data, whose
        instructions are checked to find their product)."""
        page = self._page
        if page.kind == "done":
            return []
        if page.kind == "sub":
            return [f"click[{PREV_PAGE}]", *self._plan_on_item(page.product, dict(page.options or {}), page)]
        if page.kind == "item":
            return self._plan_on_item(page.product, dict(page.options or {}), page)
        if page.kind == "results":
            plan = self._plan_on_results(page.keywords, page.page, page.results)
            return plan if plan else [f"click[{BACK_TO_SEARCH}]", *self._plan_from_search()]
        return self._plan_from_search()

    def _plan_from_search(self) -> list[str]:
        for query in (instruction_query(self._instruction), normalize_action(self._goal["name"])):
            query = re.sub(r"\s+", " ", query.replace("[", " ").replace("]", " ")).strip()
            plan = self._plan_on_results(query, 1, tuple(self.catalogue.search.search(query)))
            if plan:
                return [f"search[{query}]", *plan]
        return []

    def _plan_on_results(self, keywords: str, page_number: int, results: tuple[int, ...]) -> list[str]:
        """From a results page: to the first result that can score 1.0 (the target at the latest), click it,
        choose its options, buy. Empty if no result can."""
        target = self.catalogue.position[self._goal["asin"]]
        pick = next((p for p in results if p == target or self._can_win(p)), None)
        if pick is None:
            return []
        pick_page = results.index(pick) // PRODUCT_WINDOW + 1
        moves = ([f"click[{NEXT_PAGE}]"] * (pick_page - page_number) if pick_page >= page_number
                 else [f"click[{PREV_PAGE}]"] * (page_number - pick_page))
        item_page = _Page("item", keywords, pick_page, results, pick, {})
        return [*moves, f"click[{self.catalogue.products[pick]['asin'].lower()}]",
                *self._plan_on_item(pick, {}, item_page)]

    def _can_win(self, position: int) -> bool:
        """Whether the product at `position` scores 1.0 for this goal with the right options (memoised per task)."""
        if position not in self._win_memo:
            self._win_memo[position] = self._option_clicks(position, {})[1]
        return self._win_memo[position]

    def _plan_on_item(self, position: int | None, options: dict[str, str], page: _Page) -> list[str]:
        assert position is not None
        clicks, wins = self._option_clicks(position, options)
        if wins or position == self.catalogue.position[self._goal["asin"]]:
            # The target is bought even when it cannot score 1.0 (possible in official data): the best it can do.
            return [*clicks, f"click[{BUY_NOW}]"]
        # This product cannot win: back to its results page, and on from there.
        results_plan = self._plan_on_results(page.keywords, page.page, page.results)
        if results_plan:
            return [f"click[{PREV_PAGE}]", *results_plan]
        return [f"click[{BACK_TO_SEARCH}]", *self._plan_from_search()]

    def _option_clicks(self, position: int, chosen: dict[str, str]) -> tuple[list[str], bool]:
        """The option clicks the product at `position` needs, given the options already `chosen`, and whether it
        then scores 1.0. A goal option already hit by a chosen value stays (its group is not clicked again, so
        plans never oscillate between two goal options that fall in one group); each other goal option gets the
        product's best-matching value (fuzzy score > 85 after colour normalisation) in a still free group."""
        product = self.catalogue.products[position]
        chosen = dict(chosen)

        def hits(value: str, goal_option: str) -> int:
            return fuzzy_score(normalize_color(value), normalize_color(goal_option))

        kept = {name for name, value in chosen.items()
                if any(hits(value, g) > FUZZY_MATCH_THRESHOLD for g in self._goal["goal_options"])}
        clicks = []
        for goal_option in self._goal["goal_options"]:
            if any(hits(value, goal_option) > FUZZY_MATCH_THRESHOLD for value in chosen.values()):
                continue
            best: tuple[int, str, str] | None = None
            for name, values in product["options"].items():
                if name in kept:
                    continue
                for value in values:
                    score = hits(value, goal_option)
                    if score > FUZZY_MATCH_THRESHOLD and (best is None or score > best[0]):
                        best = (score, name, value)
            if best is not None:
                _, name, value = best
                chosen[name] = value
                kept.add(name)
                clicks.append(f"click[{option_action_value(value)}]")
        final = purchase_score(product, self.catalogue.prices[position], chosen.values(), self._goal)
        return clicks, final.score == 1.0


class WebShopEnv(WebShopBase):
    """`craft/WebShop-v0`: WebShop's data files (`data_dir` or `$CRAFT_WEBSHOP_DATA`), text mode, its score.

    `setting` picks the product files: `all` (items_shuffle.json, items_ins_v2.json), `small` (the 1000-product
    files) or `auto` (full when present). Splits `test`, `eval`, `train` are WebShop's goal ranges. Task ids are
    `goal-NNNNN`, the goal's index in WebShop's shuffled goal list (its session index). `info["won"]` iff the
    purchase scores 1.0; `info["task_score"]` is the purchase score (0.0 until something is bought). Range-priced
    products get one price per catalogue, drawn with `price_seed`.
    """

    def __init__(self, data_dir: str | os.PathLike[str] | None = None, split: str = "train", setting: str = "auto",
                 max_steps: int = 15, render_mode: str | None = None, price_seed: int = 0):
        super().__init__(split, max_steps, render_mode)
        self._data_dir = resolve_data_dir(data_dir)
        self.setting = resolve_setting(self._data_dir, setting)
        self.price_seed = int(price_seed)
        self._sha256: str | None = None

    @property
    def data_dir(self) -> Path:
        return self._data_dir

    @property
    def data_source(self) -> str:
        return "official"

    @property
    def data_sha256(self) -> str:
        if self._sha256 is None:
            self._sha256 = data_sha256(self._data_dir, self.setting)
        return self._sha256

    def _source_name(self) -> str:
        return f"WebShop data in {self._data_dir} ({self.setting} setting)"
