"""The offline data-to-text task of the [L] language analogue (docs/papers.md §6b).

E2E-like restaurant records (name, eatType, food, priceRange, area, customer rating,
familyFriendly, near) are linearized as E2E writes its meaning representations,
``name[The Blue Eagle], eatType[pub], food[Italian], ...``, and rendered to one or two sentences by
a small grammar: several sentence frames, several templates per attribute, synonyms for the
values, and the clauses in random order. The mapping (which phrase goes with which value, which
frames exist) is this grammar's own, so a model must learn it from the samples.

Everything is generated from one seed: `make_splits(seed, n_train, n_val, n_test)` draws the
test records first, then validation, then training, all distinct meaning representations, so the
test and validation sets do not depend on the training size and smaller training sets are
prefixes of larger ones (nested sizes, as a sample-efficiency curve needs).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

ATTRS = ("name", "eatType", "food", "priceRange", "area", "customer rating", "familyFriendly", "near")
NAMES_A = ("Golden", "Blue", "Red", "Green", "Silver", "Old", "Little", "Royal", "Wild", "Lucky", "Crooked", "Northern")
NAMES_B = ("Palace", "Dragon", "Eagle", "Lion", "Garden", "Mill", "Phoenix", "Plough", "Anchor", "Lantern", "Oak", "Bell")
VALUES = {
    "eatType": ("restaurant", "pub", "coffee shop"),
    "food": ("French", "Italian", "Chinese", "Indian", "Japanese", "English", "fast food"),
    "priceRange": ("cheap", "moderate", "high", "less than 20 pounds", "20-25 pounds", "more than 30 pounds"),
    "area": ("city centre", "riverside"),
    "customer rating": ("low", "average", "high", "1 out of 5", "3 out of 5", "5 out of 5"),
    "familyFriendly": ("yes", "no"),
    "near": ("Burger King", "the Bakers", "Raja Indian Cuisine", "the Sorrento", "Crowne Plaza Hotel",
             "All Bar One", "the Portland Arms", "the Rice Boat"),
}
# Verb phrases per attribute (third person singular); {v} is the value, {w} a synonym of it.
PHRASES = {
    "eatType": ("is a {v}", "operates as a {v}", "is run as a {v}"),
    "food": ("serves {w} food", "offers {w} cuisine", "provides {w} dishes"),
    "area": ("is located in the {w}", "is in the {w} area", "can be found in the {w}"),
    "near": ("is near {v}", "is close to {v}", "sits not far from {v}"),
}
PRICE_WORDS = {"cheap": ("cheap", "low", "inexpensive"), "moderate": ("moderate", "average", "mid-range"),
               "high": ("high", "expensive", "premium")}
PRICE_PHRASES = ("has {w} prices", "is in the {w} price range", "charges {w} prices")
PRICE_NUMERIC = ("has prices of {v}", "costs {v} per person", "has a price range of {v}")
RATING_WORDS = {"low": ("low", "poor", "weak"), "average": ("average", "middling", "decent"), "high": ("high", "excellent", "great")}
RATING_PHRASES = ("has a {w} customer rating", "is rated {w} by customers", "gets {w} reviews")
RATING_NUMERIC = ("is rated {v}", "has a customer rating of {v}", "scores {v} with customers")
FAMILY = {"yes": ("is family friendly", "is kid friendly", "welcomes children"),
          "no": ("is not family friendly", "is not kid friendly", "does not welcome children")}
AREA_WORDS = {"city centre": ("city centre", "centre of town", "city center"), "riverside": ("riverside", "river bank", "waterfront")}
FOOD_WORDS = {"fast food": ("fast", "quick", "takeaway")}
SPLITS = ("test", "val", "train")


@dataclass(frozen=True)
class Example:
    """One record: its meaning representation (the input) and one rendered sentence (the target)."""

    mr: str
    text: str

    def to_json(self) -> dict:
        return {"input": self.mr, "reference": self.text}


def article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def linearize(record: dict) -> str:
    """E2E's input format: ``attr[value]`` in the canonical attribute order, comma separated."""
    return ", ".join(f"{a}[{record[a]}]" for a in ATTRS if a in record)


def draw_record(rng: random.Random) -> dict:
    """A name and 2..6 of the other seven attributes, each with a uniform value."""
    record = {"name": f"The {rng.choice(NAMES_A)} {rng.choice(NAMES_B)}"}
    for attr in sorted(rng.sample(ATTRS[1:], rng.randint(2, 6)), key=ATTRS.index):
        record[attr] = rng.choice(VALUES[attr])
    return record


def phrase(attr: str, value: str, rng: random.Random) -> str:
    """One verb phrase for `attr` = `value`: a random template and a random synonym."""
    if attr == "familyFriendly":
        return rng.choice(FAMILY[value])
    if attr == "priceRange":
        if value in PRICE_WORDS:
            return rng.choice(PRICE_PHRASES).format(w=rng.choice(PRICE_WORDS[value]))
        return rng.choice(PRICE_NUMERIC).format(v=value)
    if attr == "customer rating":
        if value in RATING_WORDS:
            return rng.choice(RATING_PHRASES).format(w=rng.choice(RATING_WORDS[value]))
        return rng.choice(RATING_NUMERIC).format(v=value)
    words = {"area": AREA_WORDS, "food": FOOD_WORDS}.get(attr, {})
    return rng.choice(PHRASES[attr]).format(v=value, w=rng.choice(words.get(value, (value,))))


def join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def render(record: dict, rng: random.Random) -> str:
    """The record as one or two sentences: a frame (name first, 'There is a ... called', or a
    food-typed opening), then the remaining attributes' phrases in random order."""
    rest = [a for a in ATTRS[1:] if a in record]
    name = record["name"]
    frame = rng.choice(("plain", "called", "typed") if "eatType" in record else ("plain",))
    if frame == "plain":
        opening = name
    else:
        eat = record["eatType"]
        rest.remove("eatType")
        kind = eat
        if frame == "typed" and "food" in record:
            rest.remove("food")
            kind = f"{record['food']} {eat}"
        opening = f"There is {article(kind)} {kind} called {name}" if frame == "called" else f"{name} is {article(kind)} {kind}"
    rng.shuffle(rest)
    phrases = [phrase(a, record[a], rng) for a in rest]
    if not phrases:
        return opening + "."
    if frame == "plain" and (len(phrases) < 3 or rng.random() < 0.5):
        return f"{name} {join(phrases)}."
    if frame == "plain":  # two sentences: the first two phrases, then "It ..." for the rest
        return f"{name} {join(phrases[:2])}. It {join(phrases[2:])}."
    if rng.random() < 0.5:
        return f"{opening} that {join(phrases)}."
    return f"{opening}. It {join(phrases)}."


def make_splits(seed: int, n_train: int, n_val: int, n_test: int) -> dict[str, list[Example]]:
    """Disjoint test, validation and training records (distinct meaning representations), drawn in
    that order from one seeded stream; each record's sentence is rendered from the same stream."""
    rng = random.Random(seed)
    seen: set[str] = set()
    out: dict[str, list[Example]] = {}
    for split, n in zip(SPLITS, (n_test, n_val, n_train)):
        examples = []
        while len(examples) < n:
            record = draw_record(rng)
            mr = linearize(record)
            if mr in seen:
                continue
            seen.add(mr)
            examples.append(Example(mr, render(record, rng)))
        out[split] = examples
    return out


def grammar_summary() -> dict:
    """What the grammar can say (for the result JSON and the docs)."""
    return {"attributes": list(ATTRS), "names": len(NAMES_A) * len(NAMES_B),
            "values": {a: len(v) for a, v in VALUES.items()},
            "frames": ["<name> <phrases>", "<name> <p1 and p2>. It <rest>", "There is a <type> called <name> (that|. It) <phrases>",
                       "<name> is a [<food>] <type> (that|. It) <phrases>"],
            "templates_per_attribute": 3, "synonyms_per_value": "1-3",
            "attributes_per_record": "name + 2..6 of the other 7"}
