"""Chat-format training data: OpenAI `messages` and ShareGPT records, their validation, the assistant-only loss
mask through the base's chat template (or an instruction template), and a fine-tuning run on a ChatML base."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny import make_chatml_checkpoint

import llama_adapter as la
from llama_adapter.chat_template import ChatTemplate
from llama_adapter.config import ModelConfig
from llama_adapter.errors import DataError, TrainingError
from llama_adapter.tokenizer import Tokenizer
from llama_adapter.training.config import TrainConfig
from llama_adapter.training.data import (
    IGNORE_INDEX,
    Example,
    LoadReport,
    collate,
    encode_record,
    load_records,
    tokenize_records,
    validate_records,
)

pytestmark = pytest.mark.usefixtures("one_thread")

CONVERSATIONS = [
    {
        "id": "a",
        "messages": [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "Tell me about alpacas."},
            {"role": "assistant", "content": "Alpacas are domesticated camelids."},
            {"role": "user", "content": "Where from?"},
            {"role": "assistant", "content": "South American."},
        ],
    },
    {
        "id": "b",
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "What is 1 + 2?"}]},
            {"role": "assistant", "content": "3"},
            {"role": "user", "content": "And 4 + 5?"},
            {"role": "assistant", "content": [{"type": "text", "text": "9"}]},
            {"role": "user", "content": "Thanks."},
            {"role": "assistant", "content": "The answer is (B)."},
        ],
    },
]
SHAREGPT = {
    "id": "c",
    "conversations": [
        {"from": "human", "value": "Jump?"},
        {"from": "gpt", "value": "the quick brown fox jumps"},
        {"from": "human", "value": "Over?"},
        {"from": "gpt", "value": "over the lazy dog"},
    ],
}
END = "<|im_end|>\n"  # ChatML's end of an assistant turn, as the template writes it


@pytest.fixture(scope="module")
def chat_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_chatml_checkpoint(tmp_path_factory.mktemp("chatml_base"))


@pytest.fixture(scope="module")
def tok(chat_base: Path) -> Tokenizer:
    return Tokenizer.from_dir(chat_base, ModelConfig.from_hf(chat_base / "config.json"))


@pytest.fixture(scope="module")
def chat(chat_base: Path) -> ChatTemplate:
    template = ChatTemplate.from_dir(chat_base)
    assert template is not None
    return template


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    d = tmp_path / "chat"
    d.mkdir()
    (d / "1.jsonl").write_text("".join(json.dumps(r) + "\n" for r in CONVERSATIONS))
    (d / "2.json").write_text(json.dumps([SHAREGPT]))
    return d


def spans(ex: Example) -> list[list[int]]:
    """The supervised token ids of an example, one list per contiguous supervised span."""
    out: list[list[int]] = []
    for i, (t, m) in enumerate(zip(ex.ids, ex.mask, strict=True)):
        if m:
            if i == 0 or not ex.mask[i - 1]:
                out.append([])
            out[-1].append(t)
    return out


def answers(rec: dict) -> list[str]:
    return [m["content"] for m in rec["messages"] if m["role"] == "assistant"]


def load_records_from(records: list[dict]) -> list[dict]:
    """In-memory records, validated and normalised as `train(records=...)` does."""
    return validate_records(records)


# ---- records ---------------------------------------------------------------------------------------------
def test_openai_and_sharegpt_records_are_normalised(data_dir: Path) -> None:
    recs = load_records(data_dir)
    assert [r["id"] for r in recs] == ["a", "b", "c"]
    assert recs[1]["messages"][0] == {"role": "user", "content": "What is 1 + 2?"}
    assert [m["role"] for m in recs[2]["messages"]] == ["user", "assistant", "user", "assistant"]
    assert recs[2]["messages"][1]["content"] == "the quick brown fox jumps"
    assert all("instruction" not in r and "input" not in r and r["_dir"] == str(data_dir) for r in recs)
    assert recs[0]["_where"] == f"{data_dir / '1.jsonl'}: record 1 (line 1)"
    assert "messages" in CONVERSATIONS[1] and isinstance(CONVERSATIONS[1]["messages"][0]["content"], list)


def test_openai_image_part_becomes_the_image_field(tmp_path: Path) -> None:
    from llama_adapter.multimodal.features import resolve_image

    rec = {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": "img/a.png"}},
                    {"type": "text", "text": "What is shown?"},
                ],
            },
            {"role": "assistant", "content": "A square."},
        ]
    }
    url = "data:image/png;base64,iVBORw0KGgo="
    only_image = {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}
    f = tmp_path / "mm.jsonl"
    f.write_text(json.dumps(rec) + "\n" + json.dumps({"messages": [only_image, rec["messages"][1]]}) + "\n")
    out = load_records(f)
    assert out[0]["image"] == "img/a.png" and out[0]["messages"][0] == {"role": "user", "content": "What is shown?"}
    assert resolve_image(out[0], None) == tmp_path / "img/a.png"
    assert out[1]["image"] == url and out[1]["messages"][0]["content"] == ""
    # the LLaVA form (a ShareGPT record with an image) stays the paper's single-turn Alpaca record
    llava = {
        "image": "x.png",
        "conversations": [{"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "A"}],
    }
    f.write_text(json.dumps(llava))
    assert load_records(f)[0]["instruction"] == "Q" and load_records(f)[0]["image"] == "x.png"


def _turns(*turns: dict) -> dict:
    return {"messages": list(turns)}


USER = {"role": "user", "content": "hi"}
ASSISTANT = {"role": "assistant", "content": "hello"}
IMAGE = {"type": "image_url", "image_url": {"url": "a.png"}}


@pytest.mark.parametrize(
    "record, expect",
    [
        (_turns(USER, {"role": "tool", "content": "x"}), ["messages[1]", "unknown role 'tool'"]),
        (_turns(USER, {"role": "assistant", "content": "  "}), ["messages[1]", "empty 'content'"]),
        (_turns(USER, ASSISTANT, USER), ["ends with a user turn", "must end with an assistant turn"]),
        (_turns({"role": "user", "content": 5}, ASSISTANT), ["messages[0]", "'content' is a int"]),
        (_turns({"role": "user", "content": [{"type": "audio"}]}, ASSISTANT), ["content[0]", "unknown part type"]),
        (_turns({"role": "user", "content": [{"type": "text", "text": 1}]}, ASSISTANT), ["content[0]", "'text'"]),
        (_turns({"role": "system", "content": "s"}, USER), ["no assistant turn"]),
        (_turns({"role": "user", "content": [IMAGE, IMAGE]}, ASSISTANT), ["content[1]", "second image"]),
        (_turns({"content": "x"}, ASSISTANT), ["messages[0]", "'role' is missing"]),
        ({"messages": []}, ["'messages' is not a non-empty list"]),
        (_turns(USER, {"role": "assistant", "content": [IMAGE]}), ["messages[1]", "image is only allowed"]),
        ({"conversations": [{"from": "bot", "value": "x"}]}, ["conversations[0]", "unknown from 'bot'"]),
        ({"conversations": [{"from": "human", "value": "x"}]}, ["no gpt turn"]),
        ({"conversations": [{"from": "gpt", "value": "x"}, {"from": "human", "value": "y"}]}, ["must end with a gpt"]),
    ],
)
def test_bad_records_one_line_naming_file_record_field(tmp_path: Path, record: dict, expect: list[str]) -> None:
    f = tmp_path / "bad.jsonl"
    good = _turns(USER, ASSISTANT)
    f.write_text(json.dumps(good) + "\n" + json.dumps(record) + "\n" + json.dumps(good) + "\n")
    with pytest.raises(DataError) as e:
        load_records(f)
    msg = str(e.value)
    assert "\n" not in msg and str(f) in msg and "record 2 (line 2)" in msg and "--skip-invalid" in msg
    for s in expect:
        assert s in msg
    rep = LoadReport()
    assert len(load_records(f, skip_invalid=True, report=rep)) == 2 and rep.n_skipped == 1


# ---- the loss mask -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("train_on", ["all", "last"])
def test_chat_template_supervises_exactly_the_assistant_turns(
    data_dir: Path, tok: Tokenizer, chat: ChatTemplate, train_on: str
) -> None:
    recs = load_records(data_dir)
    exs = tokenize_records(tok, recs, "auto", 512, chat_template=chat, train_on=train_on)
    assert len(exs) == 3
    for rec, ex in zip(recs, exs, strict=True):
        assert ex.ids == tok.encode(chat.render(rec["messages"]))  # the template's text, no BOS added
        want = [tok.encode(a + END) for a in answers(rec)]
        assert spans(ex) == (want if train_on == "all" else want[-1:])
        assert tok.decode(ex.ids[: ex.n_prompt]).endswith("assistant\n")
        labels = collate([ex], pad_id=tok.pad_id)["labels"][0].tolist()
        assert labels == [t if m else IGNORE_INDEX for t, m in zip(ex.ids, ex.mask, strict=True)]
        assert ex.n_supervised == sum(len(s) for s in spans(ex))
    first = exs[0]  # the system and user turns, the headers and the turn ends of users are never targets
    masked = tok.decode([t for t, m in zip(first.ids, first.mask, strict=True) if not m])
    assert "Answer briefly." in masked and "Tell me about alpacas." in masked
    assert ("Alpacas are" in masked) == (train_on == "last")


def test_truncation_keeps_the_mask_aligned(tok: Tokenizer, chat: ChatTemplate) -> None:
    rec = load_records_from([CONVERSATIONS[0]])[0]
    full = encode_record(tok, rec, "chat", 512, chat)
    cut = encode_record(tok, rec, "chat", full.n_prompt + 3, chat)
    assert cut.truncated and cut.ids == full.ids[: full.n_prompt + 3] and cut.mask == full.mask[: len(cut.ids)]
    assert cut.n_supervised == 3
    out = tokenize_records(tok, [rec], "chat", full.n_prompt, chat_template=chat)
    assert out == []  # nothing left to learn from


def test_token_merge_across_the_boundary_encodes_pieces_separately(tok: Tokenizer) -> None:
    # the generation prompt ends with a space that the answer's first word absorbs ("Ġthe"): no token boundary
    # falls where the answer starts, so the pieces are encoded on their own and the answer stays exact
    merging = ChatTemplate(
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    rec = load_records_from([_turns(USER, {"role": "assistant", "content": "the answer"})])[0]
    ex = encode_record(tok, rec, "chat", 512, merging)
    assert tok.encode("user: hi\nassistant: the answer\n") != ex.ids  # the joint encoding would blur the edge
    assert ex.ids == tok.encode("user: hi\nassistant: ") + tok.encode("the answer\n")
    assert spans(ex) == [tok.encode("the answer\n")]


@pytest.mark.parametrize(
    "source",
    [
        # the number of turns at the end: every rendering rewrites the previous one's end
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}{{ messages | length }}",
        # past answers dropped, as reasoning templates drop past thinking
        "{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}{{ m['role'] }}: {{ m['content'] }}\n"
        "{% endif %}{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}",
    ],
)
def test_template_that_is_not_prefix_stable_is_refused_naming_the_record(
    tmp_path: Path, tok: Tokenizer, source: str
) -> None:
    f = tmp_path / "c.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in CONVERSATIONS))
    with pytest.raises(DataError, match="prefix-stable") as e:
        tokenize_records(tok, load_records(f), "chat", 512, chat_template=ChatTemplate(source))
    assert str(f) in str(e.value) and "record 1 (line 1)" in str(e.value) and "\n" not in str(e.value)


def test_instruction_template_renders_turns_and_matches_alpaca_for_one_exchange(tok: Tokenizer) -> None:
    one = load_records_from([_turns({"role": "system", "content": "Be kind."}, USER, ASSISTANT)])[0]
    alpaca = load_records_from([{"instruction": "Be kind.\n\nhi", "output": "hello"}])[0]
    a, b = encode_record(tok, one, "alpaca", 512), encode_record(tok, alpaca, "alpaca", 512)
    assert (a.ids, a.mask) == (b.ids, b.mask)
    rec = load_records_from([CONVERSATIONS[1]])[0]
    ex = encode_record(tok, rec, "alpaca", 512)
    assert ex.ids[0] == tok.bos_id and ex.ids.count(tok.bos_id) == 1
    assert spans(ex) == [tok.encode(x, eos=True) for x in answers(rec)]  # each answer ends with EOS
    last = encode_record(tok, rec, "alpaca", 512, train_on="last")
    assert last.ids == ex.ids and spans(last) == [tok.encode(answers(rec)[-1], eos=True)]
    text = tok.decode(ex.ids)
    assert text.count("### Response:") == 3 and "3\n\nBelow is an instruction" in text


def test_alpaca_records_under_chat_are_one_exchange(tok: Tokenizer, chat: ChatTemplate) -> None:
    rec = load_records_from([{"instruction": "Tell me.", "input": "about alpacas", "output": "Camelids."}])[0]
    ex = encode_record(tok, rec, "chat", 512, chat)
    msgs = [{"role": "user", "content": "Tell me.\n\nabout alpacas"}, {"role": "assistant", "content": "Camelids."}]
    assert ex.ids == tok.encode(chat.render(msgs)) and spans(ex) == [tok.encode("Camelids." + END)]
    assert encode_record(tok, rec, "auto", 512, chat).ids[0] == tok.bos_id  # auto: alpaca for Alpaca records


# ---- fine-tuning -----------------------------------------------------------------------------------------
def _cfg(tmp_path: Path, base: Path, **kw: object) -> TrainConfig:
    d: dict = dict(base=str(base), out=str(tmp_path / "run"), epochs=1, warmup_epochs=0, batch_size=2)
    d |= dict(micro_batch=2, dtype="fp32", progress=False, max_length=256, lr=1e-2)
    return TrainConfig(**(d | kw))


def test_finetune_on_chat_data_records_the_template(
    tmp_path: Path, chat_base: Path, data_dir: Path, chat: ChatTemplate
) -> None:
    from llama_adapter.training.loop import train

    res = train(_cfg(tmp_path, chat_base, data=[str(data_dir)], train_on="last"))
    meta = la.read_adapter(res.adapter_path)[0]
    assert meta["template"] == "chat" and meta["chat_template_digest"] == chat.digest
    assert json.loads((res.out_dir / "run_info.json").read_text())["template"] == "chat"
    assert res.n_train == 3 and res.steps == 2 and res.final_train_loss is not None
    # Alpaca data on the same base keeps the paper's template, and no digest
    alpaca = train(
        _cfg(tmp_path / "a", chat_base, max_steps=1),
        model=la.load_model(chat_base, dtype=torch.float32),
        records=[{"instruction": "Tell me about alpacas.", "output": "Camelids."}] * 2,
    )
    meta = la.read_adapter(alpaca.adapter_path)[0]
    assert meta["template"] == "alpaca" and "chat_template_digest" not in meta


def test_chat_records_need_a_chat_template_or_alpaca(tmp_path: Path, tiny_base: Path) -> None:
    from llama_adapter.training.loop import train

    model = la.load_model(tiny_base, dtype=torch.float32)
    assert model.chat_template is None
    recs = [CONVERSATIONS[0], CONVERSATIONS[1]]
    with pytest.raises(TrainingError, match=r"no chat template.*--template alpaca") as e:
        train(_cfg(tmp_path, tiny_base), model=model, records=recs)
    assert str(tiny_base) in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(DataError, match="mixes Alpaca records and conversations"):
        train(_cfg(tmp_path, tiny_base), model=model, records=[*recs, {"instruction": "a", "output": "b"}])
    res = train(_cfg(tmp_path, tiny_base, template="alpaca", max_steps=1), model=model, records=recs)
    assert la.read_adapter(res.adapter_path)[0]["template"] == "alpaca"


def test_train_on_flag_and_validation() -> None:
    from llama_adapter.cli import build_parser
    from llama_adapter.cli.finetune import build_config

    args = build_parser().parse_args(["finetune", "--data", "x.jsonl", "--train-on", "last"])
    cfg = build_config(args)
    assert cfg.train_on == "last" and cfg.template == "auto"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["finetune", "--train-on", "first"])
    with pytest.raises(TrainingError, match="--train-on must be all or last"):
        TrainConfig(train_on="first").validate()
