"""Offline Search-QA data: a knowledge base of fictional people, cities, countries and organisations, its corpus of
rendered passages, and 1-hop, 2-hop bridge and comparison questions, written in Search-R1's and FlashRAG's layout.

Names are made from syllables, unique across the whole knowledge base, so no answer can come from pretraining and a
name's query finds its entity. Each split has its own entities (disjoint across splits); all splits share one
corpus, as wiki-18 does. Everything comes from `numpy` Generators seeded per split: same seed, same files.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from craft_bench.envs.base import seeded_generator

GENERATOR_VERSION = 1
SPLITS = ("train", "valid", "test")
FAMILIES = ("one_hop", "bridge", "comparison")
#: Questions per family and split by default: thousands to train on, a few hundred to evaluate.
DEFAULT_QUESTIONS_PER_FAMILY = {"train": 1000, "valid": 100, "test": 200}
MAX_QUESTIONS_PER_FAMILY = 100_000

_ONSETS = ("b", "c", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gr", "kr",
           "st", "th", "tr", "vr", "sk", "sh", "ch", "ph", "qu", "y")
_VOWELS = ("a", "e", "i", "o", "u", "ae", "ai", "ei", "ou", "y")
_CODAS = ("", "", "", "n", "r", "l", "s", "th", "x", "nd", "rk", "sk", "m", "v")
_OCCUPATIONS = ("painter", "chemist", "poet", "architect", "cartographer", "composer", "astronomer", "sculptor",
                "historian", "engineer", "botanist", "novelist", "violinist", "physician", "mathematician", "jurist")
_ORG_KINDS = (("Works", "shipbuilding company"), ("Institute", "research institute"), ("Records", "record label"),
              ("Press", "publishing house"), ("Foundry", "bell foundry"), ("Bank", "savings bank"),
              ("Observatory", "observatory"), ("Guild", "weavers' guild"))
#: Words of the passage and question templates; a generated name never equals one, so names stay unambiguous.
_TEMPLATE_WORDS = frozenset(
    "a an the is was in of by and or it its city country capital founded born year population people "
    "who which what when where first earlier larger more company institute records press foundry bank "
    "observatory guild headquartered headquarters founder birthplace lives has".split()
    + [w for _, kind in _ORG_KINDS for w in kind.split()] + list(_OCCUPATIONS)
)
#: Entities per split and kind, per question per family (at least the minimum below).
_WORLD_RATIOS = {"person": 2.0, "city": 0.4, "country": 0.05, "org": 0.5}
_WORLD_MINIMUM = {"person": 40, "city": 10, "country": 4, "org": 10}

STRATEGIES = {
    "one_hop": "Search for the entity the question names, read its passage, and answer with the fact asked for.",
    "bridge": "The question names one entity but asks about a second one it links to: search the named entity, read "
              "which entity its passage mentions, search that entity, then answer from its passage.",
    "comparison": "Search each of the two entities separately, read the fact being compared in each passage, and "
                  "answer with the name of the one that fits.",
}


@dataclass(frozen=True)
class GenConfig:
    """Everything the generated data depends on; its hash names the cache entry."""

    seed: int = 0
    questions_per_family: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_QUESTIONS_PER_FAMILY))
    #: Entities per question per family (`_WORLD_RATIOS`) are multiplied by this: more distractor passages.
    world_scale: float = 1.0

    def __post_init__(self) -> None:
        unknown = set(self.questions_per_family) - set(SPLITS)
        if unknown or set(self.questions_per_family) != set(SPLITS):
            raise ValueError(f"questions_per_family needs exactly the splits {list(SPLITS)}, got "
                             f"{sorted(self.questions_per_family)}")
        for split, count in self.questions_per_family.items():
            if not 1 <= int(count) <= MAX_QUESTIONS_PER_FAMILY:
                raise ValueError(f"questions_per_family[{split!r}] must be in [1, {MAX_QUESTIONS_PER_FAMILY}], "
                                 f"got {count}")
        if not self.world_scale > 0:
            raise ValueError(f"world_scale must be > 0, got {self.world_scale}")

    def digest(self) -> str:
        payload = json.dumps({"generator": GENERATOR_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()


# ============================================================================================== knowledge base
class _Names:
    """Unique capitalised words from syllables, never a template word, never repeated across the whole KB."""

    def __init__(self) -> None:
        self.used: set[str] = set()

    def draw(self, rng: np.random.Generator, count: int, syllables: int = 2) -> list[str]:
        out: list[str] = []
        while len(out) < count:
            need = count - len(out)
            # Draw in bulk (vectorised) and keep the new ones: far faster than one word per call.
            onsets = rng.integers(len(_ONSETS), size=(need * 2, syllables))
            vowels = rng.integers(len(_VOWELS), size=(need * 2, syllables))
            codas = rng.integers(len(_CODAS), size=(need * 2, syllables))
            for o_row, v_row, c_row in zip(onsets, vowels, codas):
                word = "".join(_ONSETS[o] + _VOWELS[v] + _CODAS[c] for o, v, c in zip(o_row, v_row, c_row))
                if word in self.used or word in _TEMPLATE_WORDS:
                    continue
                self.used.add(word)
                out.append(word.capitalize())
                if len(out) == count:
                    break
        return out


@dataclass
class Entity:
    """One knowledge-base entity; `attrs` holds its facts (years as int, links as entity keys)."""

    key: str
    kind: str
    name: str
    attrs: dict[str, Any]
    passage_id: str = ""


def _build_world(rng: np.random.Generator, names: _Names, split: str, size: int,
                 scale: float) -> dict[str, list[Entity]]:
    counts = {kind: max(_WORLD_MINIMUM[kind], int(round(ratio * size * scale)))
              for kind, ratio in _WORLD_RATIOS.items()}
    countries = [Entity(f"{split}/country/{i}", "country", name, {})
                 for i, name in enumerate(names.draw(rng, counts["country"], syllables=3))]
    city_names = names.draw(rng, counts["city"], syllables=2)
    city_country = rng.integers(len(countries), size=counts["city"])
    city_years = rng.integers(800, 1900, size=counts["city"])
    city_population = rng.integers(2_000, 900_000, size=counts["city"])
    cities = [Entity(f"{split}/city/{i}", "city", name,
                     {"country": countries[c].key, "founded": int(y), "population": int(p)})
              for i, (name, c, y, p) in enumerate(zip(city_names, city_country, city_years, city_population))]
    # Every country gets a capital among its cities; a country that drew none takes over a city of its own.
    first_city: dict[int, Entity] = {}
    for city, c in zip(cities, city_country):
        first_city.setdefault(int(c), city)
    spare = iter(city for city, c in zip(cities, city_country) if first_city[int(c)] is not city)
    for index, country in enumerate(countries):
        if index not in first_city:
            first_city[index] = next(spare)
            first_city[index].attrs["country"] = country.key
        country.attrs["capital"] = first_city[index].key
    firsts = names.draw(rng, counts["person"], syllables=2)
    lasts = names.draw(rng, counts["person"], syllables=2)
    birth_city = rng.integers(len(cities), size=counts["person"])
    birth_year = rng.integers(1700, 1960, size=counts["person"])
    occupation = rng.integers(len(_OCCUPATIONS), size=counts["person"])
    people = [Entity(f"{split}/person/{i}", "person", f"{f} {l}",
                     {"born": int(y), "birthplace": cities[c].key, "occupation": _OCCUPATIONS[o]})
              for i, (f, l, c, y, o) in enumerate(zip(firsts, lasts, birth_city, birth_year, occupation))]
    org_names = names.draw(rng, counts["org"], syllables=2)
    org_kind = rng.integers(len(_ORG_KINDS), size=counts["org"])
    org_founder = rng.integers(len(people), size=counts["org"])
    org_city = rng.integers(len(cities), size=counts["org"])
    orgs = []
    for i, (name, k, f, c) in enumerate(zip(org_names, org_kind, org_founder, org_city)):
        founder = people[f]
        # Founded after the founder turned 20, so the facts never contradict each other.
        year = int(founder.attrs["born"]) + 20 + int(rng.integers(0, 40))
        orgs.append(Entity(f"{split}/org/{i}", "org", f"{name} {_ORG_KINDS[k][0]}",
                           {"kind": _ORG_KINDS[k][1], "founder": founder.key, "headquarters": cities[c].key,
                            "founded": year}))
    return {"country": countries, "city": cities, "person": people, "org": orgs}


def _article(noun: str) -> str:
    return "an" if noun[0] in "aeiou" else "a"


def _render(entity: Entity, by_key: dict[str, Entity]) -> str:
    """The passage text of an entity; it names linked entities but never their facts (that makes bridges 2-hop)."""
    a, n = entity.attrs, entity.name
    if entity.kind == "country":
        return f"{n} is a country. Its capital is {by_key[a['capital']].name}."
    if entity.kind == "city":
        return (f"{n} is a city in {by_key[a['country']].name}. {n} was founded in {a['founded']} and has a "
                f"population of {a['population']:,}.")
    if entity.kind == "person":
        return (f"{n} is {_article(a['occupation'])} {a['occupation']}. {n} was born in {a['born']} in the city of "
                f"{by_key[a['birthplace']].name}.")
    return (f"{n} is {_article(a['kind'])} {a['kind']} founded in {a['founded']} by {by_key[a['founder']].name}. "
            f"{n} is headquartered in {by_key[a['headquarters']].name}.")


# ================================================================================================== questions
@dataclass
class Question:
    question: str
    answer: str
    family: str
    hops: list[Entity]


def _one_hop(rng: np.random.Generator, world: dict[str, list[Entity]], by_key: dict[str, Entity]) -> Question:
    kind = ("person", "city", "country", "org")[int(rng.integers(4))]
    e = world[kind][int(rng.integers(len(world[kind])))]
    a = e.attrs
    if kind == "person":
        q, ans = ((f"In what year was {e.name} born?", str(a["born"])) if rng.random() < 0.5
                  else (f"In which city was {e.name} born?", by_key[a["birthplace"]].name))
    elif kind == "city":
        q, ans = ((f"In what year was {e.name} founded?", str(a["founded"])) if rng.random() < 0.5
                  else (f"In which country is the city of {e.name}?", by_key[a["country"]].name))
    elif kind == "country":
        q, ans = f"What is the capital of {e.name}?", by_key[a["capital"]].name
    else:
        q, ans = ((f"Who founded {e.name}?", by_key[a["founder"]].name) if rng.random() < 0.5
                  else (f"In which city is {e.name} headquartered?", by_key[a["headquarters"]].name))
    return Question(q, ans, "one_hop", [e])


def _bridge(rng: np.random.Generator, world: dict[str, list[Entity]], by_key: dict[str, Entity]) -> Question:
    pattern = int(rng.integers(4))
    if pattern < 2:
        e = world["person"][int(rng.integers(len(world["person"])))]
        city = by_key[e.attrs["birthplace"]]
        if pattern == 0:
            return Question(f"In which country was {e.name} born?", by_key[city.attrs["country"]].name,
                            "bridge", [e, city])
        return Question(f"In what year was the birthplace of {e.name} founded?", str(city.attrs["founded"]),
                        "bridge", [e, city])
    e = world["org"][int(rng.integers(len(world["org"])))]
    if pattern == 2:
        founder = by_key[e.attrs["founder"]]
        return Question(f"In what year was the founder of {e.name} born?", str(founder.attrs["born"]),
                        "bridge", [e, founder])
    city = by_key[e.attrs["headquarters"]]
    return Question(f"In which country is {e.name} headquartered?", by_key[city.attrs["country"]].name,
                    "bridge", [e, city])


def _comparison(rng: np.random.Generator, world: dict[str, list[Entity]], by_key: dict[str, Entity]) -> Question:
    kind, fact, template = (
        ("person", "born", "Who was born earlier, {a} or {b}?"),
        ("city", "founded", "Which city was founded earlier, {a} or {b}?"),
        ("city", "population", "Which city has the larger population, {a} or {b}?"),
        ("org", "founded", "Which was founded earlier, {a} or {b}?"),
    )[int(rng.integers(4))]
    pool = world[kind]
    while True:
        i, j = (int(x) for x in rng.choice(len(pool), size=2, replace=False))
        first, second = pool[i], pool[j]
        if first.attrs[fact] != second.attrs[fact]:
            break
    values = (first.attrs[fact], second.attrs[fact])
    winner = first if (values[0] > values[1]) == (fact == "population") else second
    return Question(template.format(a=first.name, b=second.name), winner.name, "comparison", [first, second])


_FAMILY_MAKERS = {"one_hop": _one_hop, "bridge": _bridge, "comparison": _comparison}


# ================================================================================================ the data set
def generate(config: GenConfig) -> tuple[list[dict[str, str]], dict[str, list[dict[str, Any]]]]:
    """The corpus rows and, per split, the question rows (FlashRAG fields + `data_source` + our `metadata`).

    Question rows: `{"id", "question", "golden_answers", "data_source" (the family), "metadata": {"family",
    "hops": [{"query", "passage_id"}], "supporting_passages": [{"id", "contents"}]}}`; the hops are the searches
    that find each fact, in order.
    """
    names = _Names()
    worlds: dict[str, dict[str, list[Entity]]] = {}
    for index, split in enumerate(SPLITS):
        size = int(config.questions_per_family[split])
        worlds[split] = _build_world(seeded_generator(config.seed * 1_000 + index), names, split, size,
                                     config.world_scale)
    by_key = {e.key: e for world in worlds.values() for entities in world.values() for e in entities}
    corpus = []
    contents: dict[str, dict[str, str]] = {}
    for world in worlds.values():
        for entities in world.values():
            for entity in entities:
                entity.passage_id = str(len(corpus))
                contents[entity.key] = {"id": entity.passage_id,
                                        "contents": f'"{entity.name}"\n{_render(entity, by_key)}'}
                corpus.append(contents[entity.key])
    # Shuffle so that passage order says nothing about split or kind (ids stay as assigned).
    order = seeded_generator(config.seed * 1_000 + 999).permutation(len(corpus))
    corpus = [corpus[i] for i in order]

    questions: dict[str, list[dict[str, Any]]] = {}
    for index, split in enumerate(SPLITS):
        rng = seeded_generator(config.seed * 1_000 + 100 + index)
        rows: list[dict[str, Any]] = []
        seen: set[str] = set()
        for family in FAMILIES:
            made = attempts = 0
            target = int(config.questions_per_family[split])
            while made < target:
                attempts += 1
                q = _FAMILY_MAKERS[family](rng, worlds[split], by_key)
                if q.question in seen and attempts < 20 * target:
                    continue  # distinct questions while the world has them; repeats only in tiny worlds
                seen.add(q.question)
                rows.append({
                    "id": f"{split}_{len(rows)}", "question": q.question, "golden_answers": [q.answer],
                    "data_source": family,
                    "metadata": {"family": family,
                                 "hops": [{"query": e.name, "passage_id": e.passage_id} for e in q.hops],
                                 "supporting_passages": [contents[e.key] for e in q.hops]},
                })
                made += 1
        questions[split] = rows
    return corpus, questions


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")


def write_dataset(root: str | os.PathLike, config: GenConfig) -> Path:
    """`root/corpus.jsonl` and `root/{split}.jsonl` for every split (FlashRAG rows with our metadata)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    corpus, questions = generate(config)
    write_jsonl(root / "corpus.jsonl", corpus)
    for split, rows in questions.items():
        write_jsonl(root / f"{split}.jsonl", rows)
    (root / "config.json").write_text(json.dumps({"generator": GENERATOR_VERSION, **asdict(config)}, sort_keys=True))
    return root


def cached_dataset(config: GenConfig) -> Path:
    """The generated data set's directory under `$CRAFT_BENCH_HOME/searchqa-gen/`, written once per config."""
    from craft_bench.envs.cache import build_once, cache_dir

    target = cache_dir("searchqa-gen", f"v{GENERATOR_VERSION}") / config.digest()[:16]
    return build_once(target, lambda staged: write_dataset(staged, config))


# ---------------------------------------------------------------------------------------------- official layout
#: The instruction our Search-R1-style parquet rows carry before `Question: ...` (our wording, Search-R1's shape).
PROMPT_TEMPLATE = (
    "Answer the question. Think first; when you lack knowledge, search with <search> query </search> and the results "
    "come back between <information> and </information>. Search as often as you need, then give the answer inside "
    "<answer> and </answer> without explanation. Question: {question}\n"
)


def search_r1_row(row: dict[str, Any], split: str, index: int) -> dict[str, Any]:
    """A question row in Search-R1's processed parquet form: only the five fields, the question inside the prompt."""
    return {
        "data_source": row["data_source"],
        "prompt": [{"role": "user", "content": PROMPT_TEMPLATE.format(question=row["question"])}],
        "ability": "fact-reasoning",
        "reward_model": {"style": "rule", "ground_truth": {"target": list(row["golden_answers"])}},
        "extra_info": {"split": split, "index": index},
    }


def write_official_layout(root: str | os.PathLike, config: GenConfig | None = None) -> Path:
    """Generated data in the official layouts under `root`: `corpus.jsonl`, and per split FlashRAG's
    `{split}.jsonl` (id, question, golden_answers, data_source, metadata) and Search-R1's `{split}.parquet` (the
    five processed fields only), so `craft/SearchQA-v0` and Search-R1's own tools can read it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    config = config or GenConfig(questions_per_family={"train": 20, "valid": 5, "test": 10})
    root = write_dataset(root, config)
    for split in SPLITS:
        rows = [json.loads(line) for line in (root / f"{split}.jsonl").read_text().splitlines()]
        # Search-R1 numbers rows per data source; our jsonl ids are `{split}_{i}` with i over the whole split, so the
        # parquet index is that i and both layouts give the same task ids.
        processed = [search_r1_row(row, split, int(row["id"].rsplit("_", 1)[1])) for row in rows]
        pq.write_table(pa.Table.from_pylist(processed), root / f"{split}.parquet")
    return root
