"""A synthetic visual multiple-choice set in the ScienceQA layout: coloured shapes drawn with PIL.

Every question is answerable only from the image ("What colour is the shape?", "Which shape is shown?"),
so a text-only adapter can do no better than chance, and an image-conditioned one has to read the image
token. Written as `problems.json` + `pid_splits.json` + `images/<split>/<pid>/image.png`, so the ScienceQA
reader, training-record conversion and `llama-adapter eval scienceqa` all work on it unchanged.

Group labels are synthetic, so that the Table-2 columns are exercised: colour questions are tagged
natural science / grade 2, shape questions social science / grade 8; none has a text context (IMG).
"""

from __future__ import annotations

import json
import math
import os
import random
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (235, 210, 40)}
SHAPES = ["circle", "square", "triangle"]
QUESTIONS = {
    "colour": ("What colour is the shape?", list(COLOURS), "natural science", "grade2"),
    "shape": ("Which shape is shown?", SHAPES, "social science", "grade8"),
}


def draw_shape(shape: str, colour: str, size: int = 64, rng: random.Random | None = None) -> Image.Image:
    """One shape of one colour at a random place and size on a light, slightly varied background."""
    rng = rng or random.Random()
    bg = tuple(rng.randint(225, 255) for _ in range(3))
    im = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(im)
    r = rng.uniform(0.22, 0.38) * size
    cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
    fill = tuple(max(0, min(255, c + rng.randint(-20, 20))) for c in COLOURS[colour])
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        s = r * 0.9
        d.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
    elif shape == "triangle":
        pts = [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
        d.polygon(pts, fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return im


def make_problem(pid: str, split: str, rng: random.Random) -> tuple[dict[str, Any], str, str]:
    kind = rng.choice(sorted(QUESTIONS))
    question, choices, subject, grade = QUESTIONS[kind]
    shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
    answer = choices.index(colour if kind == "colour" else shape)
    rec = {
        "question": question,
        "choices": list(choices),
        "answer": answer,
        "hint": "",
        "image": "image.png",
        "task": "closed choice",
        "grade": grade,
        "subject": subject,
        "topic": f"synthetic-{kind}",
        "category": kind,
        "skill": kind,
        "lecture": "",
        "solution": "",
        "split": split,
    }
    return rec, shape, colour


def make_shapes_dataset(
    out: str | os.PathLike[str],
    n_train: int = 400,
    n_val: int = 0,
    n_test: int = 200,
    seed: int = 0,
    image_size: int = 64,
) -> Path:
    """Write the set to `out` (ScienceQA official layout); returns `out`."""
    out = Path(out)
    rng = random.Random(seed)
    problems: dict[str, Any] = {}
    splits: dict[str, list[str]] = {}
    pid = 0
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        splits[split] = []
        for _ in range(n):
            pid += 1
            key = str(pid)
            rec, shape, colour = make_problem(key, split, rng)
            img_dir = out / "images" / split / key
            img_dir.mkdir(parents=True, exist_ok=True)
            draw_shape(shape, colour, image_size, rng).save(img_dir / "image.png")
            problems[key] = rec
            splits[split].append(key)
    splits["trainval"] = splits["train"] + splits["val"]
    out.mkdir(parents=True, exist_ok=True)
    (out / "problems.json").write_text(json.dumps(problems, indent=1))
    (out / "pid_splits.json").write_text(json.dumps(splits))
    return out
