"""The built-in world: deterministic, and the held-out split never leaks into instruction training data."""

from __future__ import annotations

import itertools

from llama_adapter.builtin import corpus


def test_pretrain_documents_are_deterministic() -> None:
    a = list(corpus.pretrain_documents(0, 50))
    b = list(corpus.pretrain_documents(0, 50))
    c = list(corpus.pretrain_documents(1, 50))
    assert a == b
    assert a != c
    assert all(d.strip() for d in a)


def test_instruction_data_is_deterministic() -> None:
    assert corpus.instruction_data("train", seed=3) == corpus.instruction_data("train", seed=3)
    assert corpus.instruction_data("heldout") == corpus.instruction_data("heldout")
    assert corpus.instruction_data("train", seed=3) != corpus.instruction_data("train", seed=4)


def test_heldout_items_never_in_training_instructions() -> None:
    w = corpus.world()
    held = corpus.instruction_data("heldout")
    assert {r["task"] for r in held} == set(corpus.TASKS)
    train_items = set()
    for seed in range(3):
        train_items |= {corpus.item_of(r) for r in corpus.instruction_data("train", seed=seed)}
    held_items = {corpus.item_of(r) for r in held}
    assert held_items and not held_items & train_items
    # and the item extraction really finds the pools' members
    for r in held:
        item = corpus.item_of(r)
        if r["task"] == "capital":
            assert item in w.held_countries
        elif r["task"] in ("upper", "reverse"):
            assert item in w.held_words
        elif r["task"] == "next":
            assert int(item) in w.held_numbers
    # distinct questions in the evaluation set
    assert len({r["instruction"] for r in held}) == len(held)


def test_heldout_items_are_in_the_pretraining_text() -> None:
    """The knowledge the adapter unlocks is in the base's pre-training text (plain prose, no instructions)."""
    text = "\n".join(corpus.pretrain_documents(0, 3000))
    held = corpus.instruction_data("heldout")
    caps = [r for r in held if r["task"] == "capital"]
    found = sum(
        f"{corpus.item_of(r)} is{r['output']}." in text
        or f"{r['output'].strip()} is the capital of {corpus.item_of(r)}" in text
        for r in caps
    )
    assert found >= 0.9 * len(caps)
    assert "### Instruction:" not in text and "### Response:" not in text and "?" not in text


def test_outputs_are_correct() -> None:
    w = corpus.world()
    for r in itertools.islice(corpus.instruction_data("train"), 200):
        item, out = corpus.item_of(r), r["output"].strip()
        if r["task"] == "capital":
            assert w.capitals[item] == out
        elif r["task"] == "add":
            a, b = map(int, item.split("+"))
            assert int(out) == a + b
        elif r["task"] == "next":
            assert int(out) == int(item) + 1
        elif r["task"] == "upper":
            assert out == item.upper()
        else:
            assert out == item[::-1]


def test_gap_records_are_opt_in_and_plain() -> None:
    """`gap_fraction` adds varied-gap records (plain text, no questions, no template headers); 0 leaves them out."""
    plain = "\n".join(corpus.pretrain_documents(0, 500))
    gap = "\n".join(corpus.pretrain_documents(0, 500, gap_fraction=0.2))
    assert "Remark:" not in plain and "Reply:" not in plain
    assert any(c in gap for c in corpus._GENERIC_CUES) and "Sum:" in gap
    assert "?" not in gap and "### Instruction:" not in gap and "### Response:" not in gap
    assert "Answer:" not in gap
