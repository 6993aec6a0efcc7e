"""The built-in base's world: a pre-training corpus and an instruction set, both generated from a seed.

The pre-training text teaches *knowledge and skills in plain form* and never shows an instruction being
followed: facts about invented countries ("The capital of Varnel is Tosk."), `37 + 45 = 82` lines,
counting ("After 37 comes 38."), and string operations written as prose ("The word plant reversed is
tnalp.", "The word plant in capital letters is PLANT."); optionally (`gap_fraction`, 0.1 in the shipped recipe)
also short records whose answer comes after a varied number of unrelated sentences ("Numbers: 37 and 45 / The
page was turned. / Sum: 82").
The instruction set asks for the same things in the Alpaca template ("What is the capital of Varnel?" ->
"Tosk"). Its held-out split uses items -- countries, words, numbers, number pairs -- that never occur in the
instruction training split; they do occur in the pre-training text, which is the knowledge an adapter has to
unlock.

Everything here is a pure function of its arguments (a `random.Random(seed)` per call), so the corpus,
the tokenizer trained on it and the splits are reproducible byte for byte.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache

WORLD_SEED = 1234  # the seed of the built-in world (names, facts, splits); part of the recipe

_ONSETS = [
    "b",
    "d",
    "f",
    "g",
    "k",
    "l",
    "m",
    "n",
    "p",
    "r",
    "s",
    "t",
    "v",
    "z",
    "br",
    "dr",
    "gr",
    "kr",
    "pl",
    "st",
    "tr",
    "sh",
    "th",
]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ou"]
_CODAS = ["", "", "", "n", "r", "l", "s", "k", "m", "th"]

TASKS = ("capital", "add", "next", "upper", "reverse")

# Instruction phrasings per task (used for both splits; only the items differ).
_INSTRUCTIONS: dict[str, list[str]] = {
    "capital": ["What is the capital of {x}?", "Name the capital city of {x}.", "Which city is the capital of {x}?"],
    "add": ["What is {a} + {b}?", "Add {a} and {b}.", "Compute the sum of {a} and {b}."],
    "next": ["What number comes after {n}?", "Which number follows {n}?", "Give the successor of {n}."],
    "upper": ["Write the word {w} in capital letters.", "Convert {w} to uppercase.", "Spell {w} in upper case."],
    "reverse": ["Reverse the word {w}.", "Write {w} backwards.", "Spell the word {w} in reverse order."],
}

# Plain-text phrasings used in pre-training (no questions, no imperatives).
_PROSE: dict[str, list[str]] = {
    "capital": [
        "The capital of {x} is {y}.",
        "{y} is the capital of {x}.",
        "The capital city of {x} is {y}.",
        "In {x}, the capital is {y}.",
    ],
    "add": ["{a} + {b} = {c}", "{a} plus {b} is {c}.", "The sum of {a} and {b} is {c}."],
    "next": ["After {n} comes {m}.", "The number after {n} is {m}.", "{n} is followed by {m}."],
    "upper": [
        "The word {w} in capital letters is {u}.",
        "In upper case, {w} is written {u}.",
        "{w} in uppercase is {u}.",
    ],
    "reverse": ["The word {w} reversed is {r}.", "Written backwards, {w} is {r}.", "{w} backwards is {r}."],
}

# Generic prose so that the words of the Alpaca preamble and markdown headers are not unseen tokens.
# None of it pairs an instruction with its answer.
_FILLER = [
    "Below is a list of facts.",
    "Each task is described by a short text.",
    "A request was written down.",
    "The response was long and appropriately formal.",
    "An instruction describes a task.",
    "Write the date on the page.",
    "The input provides further context.",
    "This text completes the list.",
    "Some facts are paired with further notes.",
    "The answer is in the table.",
    "Every city has a name.",
    "Numbers can be added.",
    "Words can be written backwards.",
    "What follows is a record of facts.",
    "Please note the numbers below.",
]
_HEADERS = [
    "### Facts",
    "### Notes",
    "### Numbers",
    "### Words",
    "### Cities",
    "### Record",
    "### Table",
    "### Instruction notes",
    "### Response notes",
    "### Input data",
]


@dataclass(frozen=True)
class World:
    countries: tuple[str, ...]
    capitals: dict[str, str]
    words: tuple[str, ...]
    held_countries: frozenset[str]
    held_words: frozenset[str]
    held_numbers: frozenset[int]  # successor task
    held_pairs: frozenset[tuple[int, int]]  # addition task (both orders)


def _name(rng: random.Random, syllables: int) -> str:
    s = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables))
    return s + rng.choice(_CODAS)


@cache
def world(seed: int = WORLD_SEED, n_countries: int = 240, n_words: int = 240, n_held: int = 80) -> World:
    """Entities and the held-out items. Held-out items are a quarter to a third of each pool."""
    rng = random.Random(seed)
    used: set[str] = set()

    def unique(syllables: tuple[int, ...], cap: bool) -> str:
        while True:
            n = _name(rng, rng.choice(syllables))
            if n not in used and n[::-1] not in used and 3 <= len(n) <= 9:
                used.add(n)
                return n.capitalize() if cap else n

    countries = tuple(unique((2, 3), True) for _ in range(n_countries))
    capitals = {c: unique((1, 2), True) for c in countries}
    words = tuple(unique((1, 2), False) for _ in range(n_words))
    held_countries = frozenset(rng.sample(countries, n_held))
    held_words = frozenset(rng.sample(words, n_held))
    held_numbers = frozenset(rng.sample(range(0, 999), n_held))
    pairs: set[tuple[int, int]] = set()
    while len(pairs) < 2 * n_held:
        a, b = rng.randrange(100), rng.randrange(100)
        pairs |= {(a, b), (b, a)}
    return World(countries, capitals, words, held_countries, held_words, held_numbers, frozenset(pairs))


# ---- pre-training text -------------------------------------------------------------------------------
def _prose_line(rng: random.Random, w: World, task: str) -> str:
    t = rng.choice(_PROSE[task])
    if task == "capital":
        x = rng.choice(w.countries)
        return t.format(x=x, y=w.capitals[x])
    if task == "add":
        a, b = rng.randrange(100), rng.randrange(100)
        return t.format(a=a, b=b, c=a + b)
    if task == "next":
        n = rng.randrange(999)
        return t.format(n=n, m=n + 1)
    word = rng.choice(w.words)
    return t.format(w=word, u=word.upper(), r=word[::-1])


def _card(rng: random.Random, w: World, task: str) -> str:
    """A short record about one item: the item is named first and each attribute follows a cue word."""
    if task == "capital":
        x = rng.choice(w.countries)
        return rng.choice(
            ["Country: {x}\nCapital: {y}", "{x} is a country. Its capital is {y}.", "{x} (country). Capital city: {y}."]
        ).format(x=x, y=w.capitals[x])
    if task == "add":
        a, b = rng.randrange(100), rng.randrange(100)
        return rng.choice(
            [
                "Numbers: {a} and {b}\nSum: {c}",
                "Take {a} and {b}. Their sum is {c}.",
                "{a} and {b} added together make {c}.",
            ]
        ).format(a=a, b=b, c=a + b)
    if task == "next":
        n = rng.randrange(999)
        return rng.choice(
            ["Number: {n}\nNext: {m}", "{n} is a number. The next number is {m}.", "Count on from {n}: {m}."]
        ).format(n=n, m=n + 1)
    word = rng.choice(w.words)
    fields = [("Upper case", word.upper()), ("Reversed", word[::-1])]
    rng.shuffle(fields)
    if rng.random() < 0.5:
        fields = [f for f in fields if f[0] == ("Upper case" if task == "upper" else "Reversed")]
    if rng.random() < 0.5:
        return f"Word: {word}\n" + "\n".join(f"{k}: {v}" for k, v in fields)
    spoken = {"Upper case": "in capital letters it is", "Reversed": "written backwards it is"}
    return f"{word} is a word. " + " ".join(f"{spoken[k].capitalize()} {v}." for k, v in fields)


# Records whose answer comes after a *varied* stretch of text: the item is mentioned, then 0-3 unrelated
# sentences (some with the words of an instruction preamble, never the template's headers), then a cue and the
# answer. A fixed gap (as in "37 + 45 = 82") lets the base find the operands by relative position; a varied
# one makes it look them up by content, which an adapter can then point at a number further back in a prompt.
_GAP_INTRO: dict[str, list[str]] = {
    "capital": [
        "{x} is a country.",
        "Consider the country {x}.",
        "This note is about {x}.",
        "Travellers often visit {x}.",
        "Country: {x}",
        "The country of {x} has a long coast.",
    ],
    "add": [
        "Two numbers, {a} and {b}, were written on the page.",
        "Take {a} and {b}.",
        "Numbers: {a} and {b}",
        "Consider {a} plus {b}.",
        "The numbers {a} + {b} are noted.",
        "A list holds {a} and {b}.",
        "Here {a} is added to {b}.",
    ],
    "next": [
        "The number {n} is written on the door.",
        "Start at {n}.",
        "Number: {n}",
        "Consider the number {n}.",
        "Page {n} was read.",
        "The count reached {n}.",
    ],
    "upper": ["Take the word {w}.", "Word: {w}", "Consider the word {w}.", "The word {w} appears in the text."],
    "reverse": ["Take the word {w}.", "Word: {w}", "Consider the word {w}.", "The word {w} appears in the text."],
}
_GAP_ANSWER: dict[str, list[str]] = {
    "capital": ["Its capital is {y}.", "Capital: {y}", "The capital city there is {y}."],
    "add": ["Their sum is {c}.", "Sum: {c}", "Added together they make {c}.", "The total is {c}."],
    "next": ["The next number is {m}.", "Next: {m}", "One more is {m}.", "Then comes {m}."],
    "upper": ["In capital letters it is {u}.", "Upper case: {u}"],
    "reverse": ["Written backwards it is {r}.", "Reversed: {r}"],
}
_GAP_FILLER = _FILLER + [
    "A short request was written below.",
    "The note was read carefully.",
    "Some time passed.",
    "The task is simple.",
    "It was written in plain words.",
    "The reply came quickly.",
    "Below is the result.",
    "Each line has a meaning.",
    "Nothing else was added.",
    "The page was turned.",
]

# Cues that do not name an attribute introduce a remark: only a cue that names the attribute ("Sum:") is followed
# by the answer, so the base does not answer after a cue it has not seen with the item (the template's headers).
_GENERIC_CUES = ["Note:", "Remark:", "Comment:", "Reply:", "Aside:", "Later:"]


def _gap_record(rng: random.Random, w: World, task: str) -> str:
    kw: dict[str, object]
    if task == "capital":
        x = rng.choice(w.countries)
        kw = {"x": x, "y": w.capitals[x]}
    elif task == "add":
        a, b = rng.randrange(100), rng.randrange(100)
        kw = {"a": a, "b": b, "c": a + b}
    elif task == "next":
        n = rng.randrange(999)
        kw = {"n": n, "m": n + 1}
    else:
        word = rng.choice(w.words)
        kw = {"w": word, "u": word.upper(), "r": word[::-1]}
    # the answer's cue names the attribute (never a generic "Answer:"), so the base does not learn to answer
    # whatever cue follows an item -- such as the template's "### Response:"
    parts = [rng.choice(_GAP_INTRO[task]).format(**kw)]
    parts += rng.sample(_GAP_FILLER, rng.choice([0, 1, 1, 2, 2, 3]))
    if rng.random() < 0.4:  # a generic cue is followed by a remark, not by the answer
        parts.append(rng.choice(_GENERIC_CUES) + " " + rng.choice(_GAP_FILLER))
    parts.append(rng.choice(_GAP_ANSWER[task]).format(**kw))
    seps = ["\n", "\n\n", " "]
    out = parts[0]
    for q in parts[1:]:
        out += rng.choice(seps) + q
    return out


def _document(rng: random.Random, w: World, gap_fraction: float = 0.0) -> str:
    kind = rng.random()
    lines: list[str] = []
    if rng.random() < 0.3:
        lines.append(rng.choice(_HEADERS))
    if kind < gap_fraction:  # records with a varied gap between the item and its answer (numbers weighted up)
        for _ in range(rng.randint(2, 4)):
            lines.append(_gap_record(rng, w, rng.choice(("capital", "add", "add", "next", "next", "upper", "reverse"))))
        sep = "\n\n" if rng.random() < 0.5 else "\n"
        return sep.join(lines)
    kind = (kind - gap_fraction) / (1 - gap_fraction)
    if kind < 0.25:  # a block of sums, one per line
        for _ in range(rng.randint(6, 14)):
            a, b = rng.randrange(100), rng.randrange(100)
            lines.append(f"{a} + {b} = {a + b}")
    elif kind < 0.3:  # counting
        n = rng.randrange(990)
        k = rng.randint(5, 12)
        lines.append(", ".join(str(i) for i in range(n, min(n + k, 1000))))
    elif kind < 0.6:  # records: the item first, then its attributes after a cue
        for _ in range(rng.randint(2, 5)):
            lines.append(_card(rng, w, rng.choice(TASKS)))
    else:  # a paragraph mixing facts, sometimes filler
        for _ in range(rng.randint(4, 10)):
            if rng.random() < 0.1:
                lines.append(rng.choice(_FILLER))
            else:
                lines.append(_prose_line(rng, w, rng.choice(TASKS)))
    sep = "\n" if rng.random() < 0.6 else " "
    return sep.join(lines)


def pretrain_documents(
    seed: int, n: int | None = None, world_seed: int = WORLD_SEED, gap_fraction: float = 0.0
) -> Iterator[str]:
    """Documents of plain text; `n=None` streams forever. Different seeds give disjoint-in-expectation text
    drawn from the same distribution (e.g. seed 0 for training, seed 1 for held-out pre-training text).

    `gap_fraction` of the documents are varied-gap records (`_gap_record`; the shipped recipe uses 0.1); 0.0
    gives exactly the stream without them."""
    rng = random.Random(f"pretrain-{seed}")
    w = world(world_seed)
    i = 0
    while n is None or i < n:
        yield _document(rng, w, gap_fraction)
        i += 1


# ---- instruction data --------------------------------------------------------------------------------
def _record(task: str, phr: str, **kw: object) -> dict[str, str]:
    if task == "capital":
        out = kw["y"]
    elif task == "add":
        out = kw["a"] + kw["b"]  # type: ignore[operator]
    elif task == "next":
        out = kw["n"] + 1  # type: ignore[operator]
    elif task == "upper":
        out = str(kw["w"]).upper()
    else:
        out = str(kw["w"])[::-1]
    # The response starts with a space, as in "### Response: 82": the template ends with "Response:" and
    # the output follows directly, so the answer is tokenised exactly as in the pre-training prose.
    return {"instruction": phr.format(**kw), "input": "", "output": f" {out}", "task": task}


def instruction_data(
    split: str = "train", seed: int = 0, n_per_task: int | None = None, world_seed: int = WORLD_SEED
) -> list[dict[str, str]]:
    """Alpaca-style records {instruction, input, output, task}.

    split="train": items outside the held-out pools (all countries/words of the training pool, each phrasing
    at random; `n_per_task` per task, default 400). split="heldout": items only from the held-out pools
    (`n_per_task` default 40). Deterministic in (split, seed).
    """
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', not {split!r}")
    w = world(world_seed)
    held = split == "heldout"
    n = n_per_task or (40 if held else 400)
    rng = random.Random(f"instr-{split}-{seed}")
    countries = sorted(c for c in w.countries if (c in w.held_countries) == held)
    words = sorted(x for x in w.words if (x in w.held_words) == held)
    numbers = sorted(x for x in range(999) if (x in w.held_numbers) == held)
    out: list[dict[str, str]] = []
    for task in TASKS:
        seen: set[str] = set()
        recs: list[dict[str, str]] = []
        tries = 0
        while len(recs) < n and tries < 50 * n:
            tries += 1
            phr = rng.choice(_INSTRUCTIONS[task])
            if task == "capital":
                x = rng.choice(countries)
                r = _record(task, phr, x=x, y=w.capitals[x])
            elif task == "add":
                while True:
                    a, b = rng.randrange(100), rng.randrange(100)
                    if ((a, b) in w.held_pairs) == held:
                        break
                r = _record(task, phr, a=a, b=b)
            elif task == "next":
                r = _record(task, phr, n=rng.choice(numbers))
            else:
                r = _record(task, phr, w=rng.choice(words))
            if held and r["instruction"] in seen:  # distinct evaluation questions
                continue
            seen.add(r["instruction"])
            recs.append(r)
        out.extend(recs)
    rng.shuffle(out)
    return out


def item_of(record: dict[str, str]) -> str:
    """The item a record is about (country, word, number or 'a+b'), for disjointness checks."""
    import re

    task, ins = record["task"], record["instruction"]
    if task == "add":
        a, b = re.findall(r"\d+", ins)
        return f"{min(int(a), int(b))}+{max(int(a), int(b))}"
    if task == "next":
        return re.findall(r"\d+", ins)[0]
    if task == "capital":
        return re.findall(r"[A-Z][a-z]+(?=[?.])", ins)[-1]
    return _word_in(ins)


def _word_in(ins: str) -> str:
    stop = {
        "write",
        "the",
        "word",
        "in",
        "capital",
        "letters",
        "convert",
        "to",
        "uppercase",
        "spell",
        "upper",
        "case",
        "reverse",
        "backwards",
        "order",
    }
    toks = [t.strip(".?") for t in ins.split()]
    return next(t for t in toks if t.lower() not in stop)


def tokenizer_training_text(seed: int = 0, n_docs: int = 20000, gap_fraction: float = 0.0) -> Iterator[str]:
    """What the BPE tokenizer is trained on: pre-training documents plus the Alpaca preamble wording."""
    from llama_adapter.templates import load_template

    t = load_template("alpaca")
    yield from pretrain_documents(seed, n_docs, gap_fraction=gap_fraction)
    for _ in range(50):  # so the template's words are tokens, as in a real base model's vocabulary
        yield t["with_input"].format(instruction="", input="")
