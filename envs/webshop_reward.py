"""WebShop's purchase score (`web_agent_site/engine/goal.py`, `engine/normalize.py`) as pure functions.
The one part that needs spaCy (noun overlap of product titles) is replaced by a documented, tested approximation."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache

from rapidfuzz import fuzz
from rapidfuzz.utils import default_process

#: WebShop's price bounds are drawn from these values (10, 20, ..., 990 dollars).
PRICE_RANGE: tuple[float, ...] = tuple(10.0 * i for i in range(1, 100))
#: The bound of a goal whose product costs more than every value of PRICE_RANGE (then the instruction names none).
NO_PRICE_BOUND = 1_000_000.0
#: A fuzzy score strictly above this counts as a match, for attributes and for options alike.
FUZZY_MATCH_THRESHOLD = 85
#: WebShop's colour vocabulary, in its order: `normalize_color` maps an option to the first of these it contains,
#: so the order decides, e.g., that "navy blue" counts as "blue".
COLOR_SET: tuple[str, ...] = (
    "alabaster", "apricot", "aqua", "ash", "asphalt", "azure", "banana", "beige", "black", "blue", "blush",
    "bordeaux", "bronze", "brown", "burgundy", "camel", "camo", "caramel", "champagne", "charcoal", "cheetah",
    "chestnut", "chocolate", "christmas", "coffee", "cognac", "copper", "coral", "cranberry", "cream", "crystal",
    "dark", "denim", "eggplant", "elephant", "espresso", "fuchsia", "gold", "granite", "grape", "graphite", "grass",
    "gray", "green", "grey", "heather", "indigo", "ivory", "ivy", "khaki", "lavender", "lemon", "leopard", "light",
    "lilac", "lime", "magenta", "maroon", "mauve", "merlot", "midnight", "mint", "mocha", "multicolor", "mushroom",
    "mustard", "natural", "navy", "nude", "olive", "orange", "peach", "pewter", "pink", "plum", "purple", "rainbow",
    "red", "rose", "royal", "rust", "sand", "sapphire", "seashell", "silver", "skull", "slate", "steel", "stone",
    "stonewash", "sunflower", "tan", "taupe", "teal", "tiger", "turquoise", "violet", "walnut", "wheat", "white",
    "wine", "yellow",
)

#: Closed-class English words (determiners, pronouns, prepositions, conjunctions, auxiliaries, particles): the words
#: spaCy never tags NOUN or PROPN, removed by the title-noun approximation (see `title_nouns`).
FUNCTION_WORDS = frozenset(
    """a an the this that these those my your his her its our their some any each every no all both either neither
    i you he she it we they me him us them what which who whom whose
    of in on at by for with from to into onto upon over under about above below across after before behind beneath
    beside besides between beyond during except inside near off out outside per since than through throughout till
    toward towards until up via within without against along among around
    and or but nor so yet if because while although though whether as
    is are was were be been being am do does did have has had can could will would shall should may might must
    not very too also just only more most less least much many few""".split()
)
_WORD = re.compile(r"[a-z0-9]+(?:\.[a-z0-9]+)*")
#: thefuzz's `force_ascii` drops the characters 128-255 (and only those) before processing.
_LATIN1 = {code: None for code in range(128, 256)}


def full_process(text: str) -> str:
    """thefuzz's string preprocessing (`utils.full_process(s, force_ascii=True)`, thefuzz >= 0.20): characters
    128-255 removed, then rapidfuzz's `default_process` (non-alphanumeric characters to spaces, lower case, trim)."""
    return default_process(str(text).translate(_LATIN1))


@lru_cache(maxsize=1 << 16)
def fuzzy_score(a: str, b: str) -> int:
    """`thefuzz.fuzz.token_set_ratio(a, b)` as WebShop calls it: both strings through `full_process`, then
    rapidfuzz's token-set ratio (the scorer thefuzz >= 0.20 delegates to), rounded to an integer; 0 if either
    processed string is empty."""
    pa, pb = full_process(a), full_process(b)
    if not pa or not pb:
        return 0
    return int(round(fuzz.token_set_ratio(pa, pb)))


@lru_cache(maxsize=1 << 16)
def normalize_color(option: str) -> str:
    """The first WebShop colour contained in `option` (as a substring), else `option` unchanged."""
    for color in COLOR_SET:
        if color in option:
            return color
    return option


def title_nouns(title: str) -> list[str]:
    """Approximation of `[t.text.lower() for t in nlp(title) if t.pos_ in ('NOUN', 'PROPN')]` with no spaCy model.

    Product titles are Title Case, and spaCy tags nearly every capitalised content word of a title NOUN or PROPN;
    what it leaves out are numbers, punctuation and closed-class words. So: the lower-cased alphanumeric tokens
    that hold a letter ("4k", "921orb"; dotted abbreviations such as "d.o.n" whole), minus `FUNCTION_WORDS`.
    Duplicates are kept, as in WebShop, because its denominator is the length of this list. Where spaCy tags a
    title word as an adjective or verb (e.g. "breathable"), this keeps it: the approximation over-counts content
    words, which moves `title_score` towards the overlap of all content words.
    """
    return [
        word for word in _WORD.findall(title.lower())
        if word not in FUNCTION_WORDS and any(ch.isalpha() for ch in word)
    ]


@dataclass(frozen=True)
class TypeReward:
    """WebShop's type factor and its parts (`get_type_reward`)."""

    r_type: float
    query_match: bool
    category_match: bool
    title_score: float


def category_levels(product_category: str) -> set[str]:
    """The levels of a breadcrumb such as "Beauty & Personal Care › Hair Care › Shampoo", stripped."""
    return {level.strip() for level in product_category.split("›")}


def type_reward(purchased_query: str, purchased_category: str, purchased_name: str,
                goal_query: str, goal_category: str, goal_name: str) -> TypeReward:
    """The type factor: whether the purchase is the same kind of product as the goal's.

    query_match = the scrape queries are equal; category_match = the breadcrumbs share >= 2 levels;
    title_score = |set(nouns(purchased name)) & set(nouns(goal name))| / len(nouns(goal name)), 0.2 if the goal
    name has no noun. r_type = 1, then 0.5 if none of (query_match, category_match, title_score > 0.2) holds, then
    0.1 if title_score < 0.1, then 0 if title_score == 0 (each later rule overrides the earlier ones).
    """
    query_match = purchased_query == goal_query
    category_match = len(category_levels(purchased_category) & category_levels(goal_category)) >= 2
    desired = title_nouns(goal_name)
    purchased = title_nouns(purchased_name)
    title_score = 0.2 if not desired else len(set(purchased) & set(desired)) / len(desired)
    r_type = 1.0
    if not (query_match or category_match or title_score > 0.2):
        r_type = 0.5
    if title_score < 0.1:
        r_type = 0.1
    if title_score == 0.0:
        r_type = 0.0
    return TypeReward(r_type, query_match, category_match, title_score)


def attribute_matches(goal_attributes: Sequence[str], product_attributes: Sequence[str], title: str,
                      bullet_points: Sequence[str], description: str) -> int:
    """How many goal attributes the product has: a product attribute with `fuzzy_score > 85`, else the goal
    attribute as a substring of the lower-cased title, the joined bullet points or the description."""
    title_l, bullets_l, description_l = title.lower(), " ".join(bullet_points).lower(), description.lower()
    matches = 0
    for goal_attribute in goal_attributes:
        if any(fuzzy_score(attribute, goal_attribute) > FUZZY_MATCH_THRESHOLD for attribute in product_attributes):
            matches += 1
        elif goal_attribute in title_l or goal_attribute in bullets_l or goal_attribute in description_l:
            matches += 1
    return matches


def option_matches(goal_options: Iterable[str], purchased_options: Iterable[str]) -> int:
    """How many goal options the chosen options hit: after `normalize_color` on both sides, a goal option counts
    once if some chosen option has `fuzzy_score > 85` with it."""
    chosen = [normalize_color(option) for option in purchased_options]
    return sum(
        any(fuzzy_score(option, goal) > FUZZY_MATCH_THRESHOLD for option in chosen)
        for goal in (normalize_color(goal_option) for goal_option in goal_options)
    )


@dataclass(frozen=True)
class Score:
    """A purchase's score and the parts WebShop's verbose reward reports."""

    score: float
    r_type: float
    attribute_matches: int
    option_matches: int
    price_ok: bool
    n_attributes: int
    n_options: int
    title_score: float
    query_match: bool
    category_match: bool

    def as_dict(self) -> dict[str, float | int | bool]:
        return dict(self.__dict__)


def purchase_score(
    product: Mapping[str, object], price: float, chosen_options: Iterable[str],
    goal: Mapping[str, object],
) -> Score:
    """WebShop's `get_reward`: (attribute matches + option matches + [price <= bound]) / (number of goal attributes
    + number of goal options + 1), times the type factor.

    `product` has WebShop's loaded-product keys (`Title`, `Attributes`, `BulletPoints`, `Description`, `query`,
    `product_category`); `goal` has `name`, `query`, `product_category`, `attributes`, `goal_options` (a list of
    option values) and `price_upper`; `chosen_options` are the option values clicked before buying.
    """
    goal_attributes = list(goal["attributes"])  # type: ignore[call-overload]
    goal_options = list(goal["goal_options"])  # type: ignore[call-overload]
    kind = type_reward(
        str(product["query"]), str(product["product_category"]), str(product["Title"]),
        str(goal["query"]), str(goal["product_category"]), str(goal["name"]),
    )
    price_ok = float(price) <= float(goal["price_upper"])  # type: ignore[arg-type]
    n_attr = attribute_matches(
        goal_attributes, list(product["Attributes"]), str(product["Title"]),  # type: ignore[call-overload]
        list(product["BulletPoints"]), str(product["Description"]),  # type: ignore[call-overload]
    )
    n_opt = option_matches(goal_options, chosen_options)
    base = (n_attr + n_opt + int(price_ok)) / (len(goal_attributes) + len(goal_options) + 1)
    return Score(base * kind.r_type, kind.r_type, n_attr, n_opt, price_ok, len(goal_attributes), len(goal_options),
                 kind.title_score, kind.query_match, kind.category_match)


def price_bound_choices(price: float) -> list[float]:
    """The values a goal's price bound is drawn from: the first four of PRICE_RANGE above the product's price.
    WebShop samples two of them and keeps the larger; with fewer than two there is no bound (`NO_PRICE_BOUND`)."""
    return [bound for bound in PRICE_RANGE if bound > price][:4]
