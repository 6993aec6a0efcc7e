"""A knowledge task for a real pre-trained model: short facts it already knows, asked in a format it does not.

Why: the paper's Table 5 claim is that zero-init attention keeps the base's *pre-trained knowledge* intact while
the prompts are still random. A task tests that when (1) answering needs the base's own knowledge, (2) the
base cannot score by itself (the answer format is new), and (3) the held-out questions are about entities the
tuning never showed, so only knowledge can answer them. ScienceQA at 135M parameters fails (1): the untuned base
is at the answer prior there. Here: capitals and continents of countries, opposites of adjectives, plurals of
nouns and small sums, each asked tersely ("capital: France") and answered with one lower-case word ("paris").

The facts are common knowledge, typed for this benchmark (ambiguous cases left out: countries with disputed or
split capitals, words with several usual opposites). Alternatives a reader may type are accepted (`ACCEPT`).
Train and test are split by *entity*: a held-out country appears in no training question of any relation.
"""

from __future__ import annotations

import random
from typing import Any

CAPITALS = {
    "France": "paris", "Germany": "berlin", "Italy": "rome", "Spain": "madrid", "Portugal": "lisbon",
    "United Kingdom": "london", "Ireland": "dublin", "Netherlands": "amsterdam", "Belgium": "brussels",
    "Austria": "vienna", "Poland": "warsaw", "Czech Republic": "prague", "Hungary": "budapest", "Greece": "athens",
    "Sweden": "stockholm", "Norway": "oslo", "Denmark": "copenhagen", "Finland": "helsinki", "Iceland": "reykjavik",
    "Russia": "moscow", "Ukraine": "kyiv", "Romania": "bucharest", "Bulgaria": "sofia", "Serbia": "belgrade",
    "Croatia": "zagreb", "Turkey": "ankara", "Egypt": "cairo", "Morocco": "rabat", "Kenya": "nairobi",
    "Nigeria": "abuja", "Ethiopia": "addis ababa", "Ghana": "accra", "Algeria": "algiers", "Tunisia": "tunis",
    "Senegal": "dakar", "Uganda": "kampala", "Japan": "tokyo", "China": "beijing", "India": "new delhi",
    "South Korea": "seoul", "North Korea": "pyongyang", "Thailand": "bangkok", "Vietnam": "hanoi",
    "Indonesia": "jakarta", "Philippines": "manila", "Malaysia": "kuala lumpur", "Pakistan": "islamabad",
    "Bangladesh": "dhaka", "Nepal": "kathmandu", "Iran": "tehran", "Iraq": "baghdad", "Saudi Arabia": "riyadh",
    "Syria": "damascus", "Lebanon": "beirut", "Jordan": "amman", "Afghanistan": "kabul", "Mongolia": "ulaanbaatar",
    "Australia": "canberra", "New Zealand": "wellington", "Canada": "ottawa", "United States": "washington",
    "Mexico": "mexico city", "Cuba": "havana", "Brazil": "brasilia", "Argentina": "buenos aires",
    "Chile": "santiago", "Peru": "lima", "Colombia": "bogota", "Venezuela": "caracas", "Ecuador": "quito",
    "Uruguay": "montevideo", "Paraguay": "asuncion", "Jamaica": "kingston", "Qatar": "doha", "Oman": "muscat",
    "Cambodia": "phnom penh", "Laos": "vientiane", "Taiwan": "taipei", "Estonia": "tallinn", "Latvia": "riga",
    "Lithuania": "vilnius", "Slovakia": "bratislava", "Slovenia": "ljubljana", "Albania": "tirana",
    "Belarus": "minsk", "Georgia": "tbilisi", "Armenia": "yerevan", "Azerbaijan": "baku", "Uzbekistan": "tashkent",
    "Libya": "tripoli", "Sudan": "khartoum", "Zimbabwe": "harare", "Zambia": "lusaka", "Angola": "luanda",
    "Mozambique": "maputo", "Madagascar": "antananarivo", "Somalia": "mogadishu", "Rwanda": "kigali",
    "Namibia": "windhoek", "Botswana": "gaborone", "Honduras": "tegucigalpa", "Nicaragua": "managua",
    "Haiti": "port-au-prince", "Malta": "valletta", "Cyprus": "nicosia",
}  # fmt: skip
EUROPE = (
    """France Germany Italy Spain Portugal Ireland Netherlands Belgium Austria Poland Hungary Greece Sweden Norway
Denmark Finland Iceland Ukraine Romania Bulgaria Serbia Croatia Estonia Latvia Lithuania Slovakia Slovenia Albania
Belarus Malta""".split()
    + ["United Kingdom", "Czech Republic"]
)
AFRICA = """Egypt Morocco Kenya Nigeria Ethiopia Ghana Algeria Tunisia Senegal Uganda Libya Sudan Zimbabwe Zambia Angola
Mozambique Madagascar Somalia Rwanda Namibia Botswana""".split()
ASIA = """Japan China India Thailand Vietnam Indonesia Philippines Malaysia Pakistan Bangladesh Nepal Iran Iraq Syria
Lebanon Jordan Afghanistan Mongolia Qatar Oman Cambodia Laos Taiwan Uzbekistan""".split() + [
    "South Korea", "North Korea", "Saudi Arabia"]  # fmt: skip
CONTINENTS = (
    {c: "europe" for c in EUROPE}
    | {c: "africa" for c in AFRICA}
    | {c: "asia" for c in ASIA}
    | {"Australia": "oceania", "New Zealand": "oceania"}
    | {c: "north america" for c in ("Canada", "United States", "Mexico", "Cuba", "Jamaica", "Honduras", "Haiti")}
    | {c: "north america" for c in ("Nicaragua",)}
    | {c: "south america" for c in "Brazil Argentina Chile Peru Colombia Venezuela Ecuador Uruguay Paraguay".split()}
)
OPPOSITES = {
    "hot": "cold", "big": "small", "tall": "short", "fast": "slow", "happy": "sad", "early": "late", "rich": "poor",
    "full": "empty", "wet": "dry", "strong": "weak", "heavy": "light", "loud": "quiet", "clean": "dirty",
    "thick": "thin", "wide": "narrow", "deep": "shallow", "long": "short", "high": "low", "good": "bad",
    "true": "false", "alive": "dead", "cheap": "expensive", "safe": "dangerous", "inside": "outside",
    "above": "below", "before": "after", "north": "south", "east": "west", "left": "right", "day": "night",
    "boy": "girl", "king": "queen", "black": "white", "friend": "enemy", "war": "peace", "male": "female",
    "winter": "summer", "top": "bottom", "ancient": "modern", "asleep": "awake", "polite": "rude",
    "present": "absent", "increase": "decrease", "accept": "reject", "maximum": "minimum", "positive": "negative",
    "success": "failure", "victory": "defeat", "private": "public", "always": "never", "entrance": "exit",
    "import": "export", "future": "past", "buy": "sell", "win": "lose", "love": "hate", "remember": "forget",
    "give": "take", "question": "answer", "push": "pull", "open": "closed", "sharp": "blunt", "smooth": "rough",
    "young": "old", "light": "dark", "soft": "hard", "begin": "end", "laugh": "cry",
}  # fmt: skip
PLURALS = {
    "mouse": "mice", "child": "children", "man": "men", "woman": "women", "tooth": "teeth", "foot": "feet",
    "goose": "geese", "person": "people", "ox": "oxen", "cactus": "cacti", "leaf": "leaves", "knife": "knives",
    "wolf": "wolves", "wife": "wives", "life": "lives", "half": "halves", "shelf": "shelves", "box": "boxes",
    "bus": "buses", "church": "churches", "city": "cities", "baby": "babies", "party": "parties", "story": "stories",
    "dog": "dogs", "cat": "cats", "book": "books", "tree": "trees", "house": "houses", "car": "cars",
    "potato": "potatoes", "tomato": "tomatoes", "hero": "heroes", "sheep": "sheep", "fish": "fish", "deer": "deer",
    "glass": "glasses", "dish": "dishes", "watch": "watches", "fox": "foxes", "day": "days", "key": "keys",
    "toy": "toys", "boy": "boys", "lady": "ladies", "country": "countries", "family": "families", "bird": "birds",
    "apple": "apples", "horse": "horses", "river": "rivers", "window": "windows", "table": "tables",
    "bridge": "bridges", "class": "classes", "brush": "brushes", "wish": "wishes", "match": "matches",
}  # fmt: skip
ACCEPT = {
    "kyiv": ["kiev"], "washington": ["washington, d.c.", "washington dc", "washington d.c."], "bogota": ["bogotá"],
    "brasilia": ["brasília"], "asuncion": ["asunción"], "north america": ["central america"], "closed": ["shut"],
}  # fmt: skip
NATURAL = {  # the same fact asked the ordinary way (to measure what the base knows in free text)
    "capital": "What is the capital of {x}?",
    "continent": "On which continent is {x}?",
    "opposite": 'What is the opposite of "{x}"?',
    "plural": 'What is the plural of "{x}"?',
    "sum": "What is {x}?",
}


def facts(seed: int = 0, test_fraction: float = 0.4) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train, test) items {"relation", "x", "answer", "instruction", "output", "natural"}, split by entity."""
    rng = random.Random(seed)
    countries = sorted(CAPITALS)
    rng.shuffle(countries)
    held_countries = set(countries[: int(len(countries) * test_fraction)])
    items = []
    for c in countries:
        items.append(("capital", c, CAPITALS[c], c in held_countries))
        if c in CONTINENTS:
            items.append(("continent", c, CONTINENTS[c], c in held_countries))
    for rel, table in (("opposite", OPPOSITES), ("plural", PLURALS)):
        words = sorted(table)
        rng.shuffle(words)
        held = set(words[: int(len(words) * test_fraction)])
        items += [(rel, w, table[w], w in held) for w in words]
    pairs = [(a, b) for a in range(2, 20) for b in range(2, 20) if a <= b]
    rng.shuffle(pairs)
    pairs = pairs[:100]
    held_pairs = set(pairs[: int(len(pairs) * test_fraction)])
    items += [("sum", f"{a} + {b}", str(a + b), (a, b) in held_pairs) for a, b in pairs]
    train, test = [], []
    for rel, x, ans, held in items:
        rec = {
            "relation": rel,
            "x": x,
            "answer": ans,
            "instruction": f"{rel}: {x}",
            "input": "",
            "output": ans,
            "natural": NATURAL[rel].format(x=x),
        }
        (test if held else train).append(rec)
    rng.shuffle(train)
    rng.shuffle(test)
    return train, test


def normalise(text: str) -> str:
    return text.strip().splitlines()[0].strip().strip(".!\"'").strip().lower() if text.strip() else ""


def correct(item: dict[str, Any], text: str) -> bool:
    """Exact match of the first line (case, surrounding quotes and a final period ignored)."""
    return normalise(text) in [normalise(a) for a in [item["answer"], *ACCEPT.get(item["answer"], [])]]


def mentions(item: dict[str, Any], text: str) -> bool:
    """The answer appears as a word anywhere in a free-text reply (what the base knows, format aside)."""
    import re

    low = text.lower()
    return any(
        re.search(rf"(?<![\w-]){re.escape(a)}(?![\w-])", low) for a in [item["answer"], *ACCEPT.get(item["answer"], [])]
    )
