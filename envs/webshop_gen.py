"""`craft/WebShopGen-v0`: an offline catalogue and instruction generator writing WebShop's own files
(items_shuffle.json, items_ins_v2.json, items_human_ins.json), deterministic per config and cached on disk, and the
env that serves them with `craft/WebShop-v0`'s code.

Products come from templates: five categories as WebShop's (beauty, electronics, fashion, food, furniture), product
types with a scrape query and a breadcrumb, attribute vocabularies, option groups, prices, made-up brands, and
titles, descriptions and bullet points that mention the product's attributes. One instruction per goal product
names its type, some of its attributes and some option values. Every vocabulary is checked against the score's own
fuzzy matching (no two attributes or option values of a group match each other), and every instruction is kept only
if searching its own text finds its product in the top 50, so the expert can win every task.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from craft_bench.envs import webshop
from craft_bench.envs.base import seeded_generator
from craft_bench.envs.cache import build_once, cache_dir
from craft_bench.envs.webshop_reward import FUZZY_MATCH_THRESHOLD, fuzzy_score, normalize_color

#: Bumped whenever the generated files change for the same config (it is part of the cache key and data hash).
GENERATOR_VERSION = "2"
DEFAULT_PRODUCTS = 6000
DEFAULT_GOALS = 4500
#: Instructions drawn per goal product before that product is given up (its instruction text never found it).
INSTRUCTION_TRIES = 4


@dataclass(frozen=True)
class ProductType:
    noun: str
    query: str
    breadcrumb: str
    option_groups: tuple[str, ...]


@dataclass(frozen=True)
class Category:
    name: str
    root: str
    attributes: tuple[str, ...]
    types: tuple[ProductType, ...]


COLORS = ("black", "white", "red", "blue", "green", "grey", "pink", "purple", "yellow", "orange", "brown", "beige",
          "teal", "navy", "ivory", "khaki", "maroon", "olive", "silver", "gold")
OPTION_VALUES: dict[str, tuple[str, ...]] = {
    "color": COLORS,
    "size": ("small", "medium", "large", "plus size"),
    "shoe size": ("6", "7", "8", "9", "10", "11", "12"),
    "scent": ("lavender", "vanilla", "unscented", "citrus", "coconut", "eucalyptus", "rose"),
    "item package quantity": ("single", "twin set", "family bundle"),
    "style": ("corded", "cordless", "bundle", "basic"),
    "length": ("3 ft", "6 ft", "10 ft", "15 ft"),
    "flavor name": ("sea salt", "honey", "cinnamon", "original", "strawberry", "peanut butter", "chili lime"),
    "bed size": ("twin", "full", "queen", "king"),
    "finish": ("matte", "glossy", "satin"),
}
CATEGORIES: tuple[Category, ...] = (
    Category(
        "beauty", "Beauty & Personal Care",
        ("paraben free", "cruelty free", "long lasting", "natural ingredients", "sulfate free", "tea tree",
         "hyaluronic acid", "dry skin", "travel size", "alcohol free", "sensitive skin", "vitamin c"),
        (ProductType("shampoo", "shampoo", "Hair Care › Shampoo & Conditioner › Shampoos",
                     ("scent", "item package quantity")),
         ProductType("face cream", "face moisturizer", "Skin Care › Face › Creams & Moisturizers", ("scent",)),
         ProductType("lipstick", "lipstick", "Makeup › Lips › Lipstick", ("color", "finish")),
         ProductType("body lotion", "body lotion", "Skin Care › Body › Lotions", ("scent", "item package quantity")),
         ProductType("nail polish", "nail polish", "Foot, Hand & Nail Care › Nail Polish", ("color", "finish")),
         ProductType("serum", "face serum", "Skin Care › Face › Serums", ("scent",))),
    ),
    Category(
        "electronics", "Electronics",
        ("noise cancelling", "high speed", "fast charging", "bluetooth 5", "easy install", "long battery life",
         "water resistant", "plug and play", "hands free", "stereo sound", "usb c", "high definition"),
        (ProductType("headphones", "headphones", "Headphones, Earbuds & Accessories › Headphones", ("color", "style")),
         ProductType("usb microphone", "usb microphone", "Computers & Accessories › Microphones", ("color", "style")),
         ProductType("speaker", "bluetooth speaker", "Portable Audio & Video › Speakers", ("color", "style")),
         ProductType("hdmi cable", "hdmi cable", "Accessories & Supplies › Cables › HDMI Cables", ("length", "color")),
         ProductType("phone charger", "phone charger", "Cell Phones & Accessories › Chargers", ("length", "color")),
         ProductType("webcam", "webcam", "Computers & Accessories › Webcams", ("style",))),
    ),
    Category(
        "fashion", "Clothing, Shoes & Jewelry",
        ("machine wash", "long sleeve", "slim fit", "button closure", "elastic waist", "relaxed fit",
         "quick drying", "non slip", "rubber sole", "polyester spandex", "drawstring closure", "moisture wicking"),
        (ProductType("t-shirt", "men's t-shirts", "Men › Clothing › Shirts › T-Shirts", ("color", "size")),
         ProductType("hoodie", "women's hoodies", "Women › Clothing › Fashion Hoodies & Sweatshirts",
                     ("color", "size")),
         ProductType("sneakers", "men's sneakers", "Men › Shoes › Fashion Sneakers", ("color", "shoe size")),
         ProductType("jogger pants", "men's joggers", "Men › Clothing › Pants › Joggers", ("color", "size")),
         ProductType("dress", "women's dresses", "Women › Clothing › Dresses", ("color", "size")),
         ProductType("sandals", "women's sandals", "Women › Shoes › Sandals", ("color", "shoe size"))),
    ),
    Category(
        "food", "Grocery & Gourmet Food",
        ("gluten free", "sugar free", "non gmo", "low carb", "keto friendly", "high protein", "usda organic",
         "dairy free", "ready to eat", "individually wrapped", "plant based", "low sodium"),
        (ProductType("protein bar", "protein bars", "Snacks › Bars › Protein Bars",
                     ("flavor name", "item package quantity")),
         ProductType("beef jerky", "beef jerky", "Meat & Seafood › Jerky", ("flavor name", "item package quantity")),
         ProductType("granola", "granola", "Breakfast Foods › Cereals › Granola", ("flavor name",)),
         ProductType("mixed nuts", "mixed nuts", "Snacks › Nuts & Seeds › Mixed Nuts",
                     ("flavor name", "item package quantity")),
         ProductType("potato chips", "potato chips", "Snacks › Chips & Crisps › Potato Chips", ("flavor name",)),
         ProductType("herbal tea", "herbal tea", "Beverages › Tea › Herbal",
                     ("flavor name", "item package quantity"))),
    ),
    Category(
        "furniture", "Home & Kitchen",
        ("easy assemble", "storage space", "solid wood", "living room", "space saving", "metal legs",
         "high density foam", "mid century", "heavy duty", "faux leather", "memory foam", "engineered wood"),
        (ProductType("ottoman", "ottoman", "Furniture › Living Room Furniture › Ottomans", ("color",)),
         ProductType("bookshelf", "bookshelf", "Furniture › Home Office Furniture › Bookcases", ("color", "finish")),
         ProductType("office chair", "office chair", "Furniture › Home Office Furniture › Chairs", ("color",)),
         ProductType("nightstand", "nightstand", "Furniture › Bedroom Furniture › Nightstands", ("color", "finish")),
         ProductType("bed frame", "bed frame", "Furniture › Bedroom Furniture › Beds & Frames", ("color", "bed size")),
         ProductType("mattress", "mattress", "Furniture › Bedroom Furniture › Mattresses", ("bed size",))),
    ),
)
_SYLLABLES = ("ka", "lo", "mi", "ra", "ven", "tor", "zu", "bel", "nox", "ti", "qua", "dor", "fi", "sa", "ly", "mo",
              "ber", "cal", "dex", "ga", "hu", "jin", "kel", "pra", "vo", "wen", "xi", "yo", "zen", "ar")
_DESCRIPTION_OPENERS = ("Designed for everyday use.", "Made to last with careful quality control.",
                        "A customer favourite, thoughtfully made.", "Simple, practical and reliable.",
                        "Backed by a friendly support team.")
_FILLERS = ("you will notice the difference", "made with care", "tested by our team", "for daily routines",
            "ideal as a gift")
#: How instructions count plural product nouns ("find me a pair of sneakers", not "a sneakers").
_COUNTED = {"headphones": "a pair of headphones", "sneakers": "a pair of sneakers", "sandals": "a pair of sandals",
            "jogger pants": "a pair of jogger pants", "mixed nuts": "a bag of mixed nuts",
            "potato chips": "a bag of potato chips"}
_INSTRUCTION_TEMPLATES = (
    "i am looking for {a_type} that is {attrs}{options}",
    "i need {a_type} which is {attrs}{options}",
    "find me {a_type} that is {attrs}{options}",
    "i want to buy {a_type} that is {attrs}{options}",
    "looking for {a_type}, {attrs}{options}",
)


@dataclass(frozen=True)
class GenConfig:
    """What a generated data set depends on (its cache key)."""

    n_products: int = DEFAULT_PRODUCTS
    n_goals: int = DEFAULT_GOALS
    seed: int = 0
    small_file_names: bool = False

    @classmethod
    def make(cls, n_products: int | None = None, n_goals: int | None = None, seed: int = 0,
             small_file_names: bool = False) -> "GenConfig":
        config = cls(DEFAULT_PRODUCTS if n_products is None else int(n_products),
                     DEFAULT_GOALS if n_goals is None else int(n_goals), int(seed), bool(small_file_names))
        if config.n_products < 1 or config.n_goals < 1:
            raise ValueError(f"n_products and n_goals must be >= 1, got {config.n_products} and {config.n_goals}")
        if config.n_goals > config.n_products:
            raise ValueError(f"n_goals ({config.n_goals}) cannot exceed n_products ({config.n_products}): each goal "
                             "targets its own product, so that splits never share a target product")
        return config

    def key(self) -> str:
        names = "-small" if self.small_file_names else ""
        return f"v{GENERATOR_VERSION}-p{self.n_products}-g{self.n_goals}-s{self.seed}{names}"

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps({**asdict(self), "version": GENERATOR_VERSION}, sort_keys=True)
                              .encode()).hexdigest()


def check_vocabularies() -> None:
    """Raise if two attributes of a category, or two option values of a product type (across its option groups),
    count as the same under the score's colour normalisation and fuzzy matching, or if an attribute is inside
    another: the generated tasks would then have ambiguous right answers."""
    groups = {f"attributes of {c.name}": c.attributes for c in CATEGORIES}
    for category in CATEGORIES:
        for kind in category.types:
            groups[f"options of {kind.noun}"] = tuple(v for g in kind.option_groups for v in OPTION_VALUES[g])
    for label, values in groups.items():
        normalised = [normalize_color(v) for v in values]
        for i, a in enumerate(normalised):
            for j, b in enumerate(normalised[i + 1:], start=i + 1):
                if a == b or fuzzy_score(a, b) > FUZZY_MATCH_THRESHOLD:
                    raise ValueError(f"{label}: {values[i]!r} and {values[j]!r} match each other under WebShop's "
                                     "scoring")
    for category in CATEGORIES:
        for a in category.attributes:
            for b in category.attributes:
                if a != b and a in b:
                    raise ValueError(f"attributes of {category.name}: {a!r} is inside {b!r}")


def _pick(rng: random.Random, values: tuple[str, ...] | list[str], k: int) -> list[str]:
    """`k` distinct values, kept in vocabulary order (so option lists read naturally)."""
    return [values[i] for i in sorted(rng.sample(range(len(values)), min(k, len(values))))]


def _brand(rng: random.Random) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 3))).title()


def _asin(rng: random.Random, taken: set[str]) -> str:
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    while True:
        asin = "B0" + "".join(rng.choice(alphabet) for _ in range(8))
        if asin not in taken:
            taken.add(asin)
            return asin


def _price(rng: random.Random) -> str:
    low = round(rng.uniform(4.0, 180.0), 0) - 0.01
    if rng.random() < 0.25:
        return f"${low:.2f} - ${low * rng.uniform(1.1, 1.5):.2f}"
    return f"${low:.2f}"


def _derived(rng: np.random.Generator) -> random.Random:
    """A private `random.Random` seeded from the data set's Generator: one per product or instruction, because
    many small draws from a numpy Generator cost microseconds each (100k products would take minutes)."""
    return random.Random(int(rng.integers(2**63)))


def generate_product(rng: random.Random, taken: set[str]) -> tuple[dict[str, Any], list[str]]:
    """One raw product record in items_shuffle.json's format, and its attribute list for items_ins_v2.json."""
    category = rng.choice(CATEGORIES)
    kind = rng.choice(category.types)
    attributes = _pick(rng, category.attributes, rng.randint(3, 5))
    order = rng.sample(attributes, len(attributes))
    brand = _brand(rng)
    title = f"{brand} {order[0].title()} {kind.noun.title()} with {order[1].title()}"
    options = {
        group: [{"value": v, "image": None}
                for v in _pick(rng, OPTION_VALUES[group], rng.randint(2, len(OPTION_VALUES[group])))]
        for group in kind.option_groups
    }
    description = (f"This {kind.noun} by {brand} is {', '.join(order[:-1])} and {order[-1]}. "
                   f"{rng.choice(_DESCRIPTION_OPENERS)}")
    bullets = [f"{a.capitalize()}: {rng.choice(_FILLERS)}" for a in order]
    asin = _asin(rng, taken)
    product = {
        "asin": asin,
        "name": title,
        "full_description": description,
        "small_description": bullets,
        "pricing": _price(rng),
        "customization_options": {group.title(): values for group, values in options.items()},
        "images": [""],
        "query": kind.query,
        "category": category.name,
        "product_category": f"{category.root} › {kind.breadcrumb}",
        "brand": brand,
    }
    return product, attributes


def generate_instruction(rng: random.Random, product: dict[str, Any], attributes: list[str]) -> dict[str, Any]:
    """A human-style instruction for `product` in items_human_ins.json's format: its type, one to three of its
    attributes, and a value of each of some of its option groups."""
    kind = next(t for c in CATEGORIES for t in c.types if t.query == product["query"] and c.name == product["category"])
    chosen_attributes = rng.sample(attributes, rng.randint(1, min(3, len(attributes))))
    option_parts, goal_options = [], []
    for group, contents in product["customization_options"].items():
        if rng.random() < 0.75:
            value = rng.choice(contents)["value"]
            goal_options.append(value)
            option_parts.append(f"{group.lower()} {value}")
    attrs = chosen_attributes[0] if len(chosen_attributes) == 1 else (
        ", ".join(chosen_attributes[:-1]) + " and " + chosen_attributes[-1])
    options = f", with {' and '.join(option_parts)}" if option_parts else ""
    template = rng.choice(_INSTRUCTION_TEMPLATES)
    return {
        "asin": product["asin"],
        "instruction": template.format(a_type=_COUNTED.get(kind.noun, f"{'an' if kind.noun[0] in 'aeio' else 'a'} "
                                                                     f"{kind.noun}"), attrs=attrs, options=options),
        "instruction_attributes": chosen_attributes,
        "instruction_options": goal_options,
    }


def write_dataset(out_dir: Path, config: GenConfig) -> None:
    """Generate `config`'s catalogue and instructions into `out_dir` under WebShop's file names.

    Instructions are drawn for `n_goals` distinct products; one whose text does not find its product in the top 50
    search results is redrawn (up to INSTRUCTION_TRIES times), then another product is tried. Duplicate instruction
    texts are redrawn too, so no two goals (and no two splits) share an instruction.
    """
    check_vocabularies()
    rng = seeded_generator(config.seed)
    taken: set[str] = set()
    products, attributes = [], {}
    for _ in range(config.n_products):
        product, attrs = generate_product(_derived(rng), taken)
        products.append(product)
        attributes[product["asin"]] = {"attributes": attrs}
    processed = webshop.process_products(products, attributes)
    search = webshop.ProductSearch([webshop.product_document(p) for p in processed])
    human: dict[str, list[dict[str, Any]]] = {}
    texts: set[str] = set()
    for position in rng.permutation(len(products)).tolist():
        if len(human) == config.n_goals:
            break
        product = products[position]
        draws = _derived(rng)
        for _ in range(INSTRUCTION_TRIES):
            instruction = generate_instruction(draws, product, attributes[product["asin"]]["attributes"])
            if instruction["instruction"] in texts:
                continue
            if position in search.search(webshop.instruction_query(instruction["instruction"])):
                texts.add(instruction["instruction"])
                human[product["asin"]] = [instruction]
                attributes[product["asin"]].update(
                    instruction=instruction["instruction"], instruction_attributes=instruction["instruction_attributes"]
                )
                break
    if len(human) < config.n_goals:
        raise RuntimeError(f"only {len(human)} of {config.n_goals} instructions find their product; lower n_goals "
                           f"or raise n_products ({config})")
    products_file, attributes_file = webshop.FILE_NAMES["small" if config.small_file_names else "all"]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / products_file).write_text(json.dumps(products))
    (out_dir / attributes_file).write_text(json.dumps(attributes))
    (out_dir / webshop.HUMAN_INSTRUCTIONS_FILE).write_text(json.dumps(human))
    (out_dir / "generator.json").write_text(json.dumps({**asdict(config), "version": GENERATOR_VERSION}))


def cached_dataset(config: GenConfig) -> Path:
    """The directory holding `config`'s data set, generated once under $CRAFT_BENCH_HOME/envs/webshop_gen."""
    return build_once(cache_dir("envs", "webshop_gen") / config.key(), lambda tmp: write_dataset(tmp, config))


class WebShopGenEnv(webshop.WebShopBase):
    """`craft/WebShopGen-v0`: a catalogue and instructions generated offline in WebShop's file format
    (`webshop_gen`), cached under $CRAFT_BENCH_HOME and served by the same code as `craft/WebShop-v0`.
    The data is generated on first use (task list or reset), not when the env is made."""

    def __init__(self, split: str = "train", max_steps: int = 15, render_mode: str | None = None,
                 n_products: int | None = None, n_goals: int | None = None, seed: int = 0):
        super().__init__(split, max_steps, render_mode)
        self.gen_config = GenConfig.make(n_products=n_products, n_goals=n_goals, seed=seed)
        self._gen_dir: Path | None = None

    @property
    def data_dir(self) -> Path:
        if self._gen_dir is None:
            self._gen_dir = cached_dataset(self.gen_config)
        return self._gen_dir

    @property
    def data_source(self) -> str:
        return "generated"

    @property
    def data_sha256(self) -> str:
        return self.gen_config.fingerprint()

    def _source_name(self) -> str:
        return f"the generated WebShop catalogue ({self.gen_config})"

    def _extra_info(self) -> dict[str, Any]:
        return {**super()._extra_info(), "generator_version": GENERATOR_VERSION}
