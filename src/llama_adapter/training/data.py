"""Training data: Alpaca records and conversations; loading, validation, tokenisation, length-grouped batching.

Accepted inputs: a JSON list of records, a JSONL file (one record per line), or a directory of such files
(`*.json`, `*.jsonl`, sorted by name). A record is one of:
- Alpaca: `{"instruction": str, "input": str (optional), "output": str}`; the self-instruct shape
  `{"instruction", "instances": [{"input", "output"}, ...]}` is flattened into one record per instance. An
  optional `"image"`, `"audio"` or `"video"` string (a relative path or a data URL, for multi-modal adapters; one
  record may carry several) is allowed; any other field is kept.
- OpenAI chat: `{"messages": [{"role": "system" | "user" | "assistant", "content": str | [parts]}, ...]}`, parts
  being `{"type": "text", "text": ...}`, one `{"type": "image_url", "image_url": {"url": path | data URL}}` and
  one `{"type": "input_audio", "input_audio": {"data": base64, "format": "wav"}}` (OpenAI's audio part).
- ShareGPT: `{"conversations": [{"from": "system" | "human" | "gpt", "value": ...}, ...]}`. With an `"image"` it
  is a LLaVA record: its first exchange becomes an Alpaca record, as in the paper's single-turn setting.
Conversations are normalised to `{"messages": [{"role", "content": str}], "image"?: str, "audio"?: str}` (an
image part moves to `"image"`, an audio part to `"audio"` as a data URL, where the multi-modal code looks; one of
each per record) and must end with an assistant turn.

Alpaca records: sequence = BOS + prompt + output + EOS, truncated to `max_length`; the loss covers output + EOS
only. Conversations: rendered with the base's chat template (`--template chat`, the default for them) or turn by
turn through an instruction template; the loss covers the assistant turns (each with the end-of-turn text the
template writes after it): all of them, or the last with `--train-on last`. Labels elsewhere are `IGNORE_INDEX` =
-100, never a real token id.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from llama_adapter.errors import DataError, TemplateError
from llama_adapter.templates import format_prompt

if TYPE_CHECKING:
    from llama_adapter.chat_template import ChatTemplate

IGNORE_INDEX = -100
TEXT_FIELDS = ("instruction", "input", "output")
OPTIONAL_STRING_FIELDS = ("input", "image", "audio", "video")
MEDIA_FIELDS = ("image", "audio", "video")
AUTO = "auto"  # the template option's default: alpaca for Alpaca records, chat for conversations
CHAT = "chat"  # the template option's name for the base's own chat template


@dataclass(frozen=True)
class _ChatFormat:
    """The field names of one conversation format, and its role names (as its users write them)."""

    key: str  # the record's list of turns
    role: str  # a turn's role field
    content: str  # a turn's text field
    roles: dict[str, str]  # role name in the file -> system, user or assistant
    user: str
    assistant: str


OPENAI = _ChatFormat(
    "messages", "role", "content", {r: r for r in ("system", "user", "assistant")}, "user", "assistant"
)
SHAREGPT = _ChatFormat(
    "conversations",
    "from",
    "value",
    {"system": "system", "human": "user", "gpt": "assistant", "user": "user", "assistant": "assistant"},
    "human",
    "gpt",
)


# ---- loading and validation -----------------------------------------------------------------------------
@dataclass
class LoadReport:
    files: list[str] = field(default_factory=list)
    n_records: int = 0
    n_skipped: int = 0
    problems: list[str] = field(default_factory=list)  # first few skipped-record messages


def _data_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in (".json", ".jsonl"))
        if not files:
            raise DataError(f"{path}: directory has no .json or .jsonl files")
        return files
    if not path.is_file():
        raise FileNotFoundError(f"{path}: data file not found")
    return [path]


def _parse_file(path: Path) -> list[tuple[str, Any]]:
    """(location label, raw record) pairs; raises DataError for a file that is neither JSON nor JSONL."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e})") from None
    if not text.strip():
        return []
    if path.suffix != ".jsonl":
        try:
            whole = json.loads(text)
        except RecursionError:  # nested past the interpreter's stack: no record is that deep
            raise DataError(f"{path}: JSON nested too deeply to be a training record") from None
        except json.JSONDecodeError as e:
            if text.lstrip().startswith("["):
                raise DataError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
        else:
            if isinstance(whole, list):
                return [(f"record {i + 1}", r) for i, r in enumerate(whole)]
            return [("record 1", whole)]
    out: list[tuple[str, Any]] = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append((f"record {len(out) + 1} (line {n})", json.loads(line)))
        except RecursionError:
            raise DataError(f"{path}: line {n} is JSON nested too deeply to be a training record") from None
        except json.JSONDecodeError as e:
            raise DataError(
                f"{path}: line {n} is not valid JSON ({e.msg}); expected a JSON list or JSONL (one object per line)"
            ) from None
    return out


def is_chat(rec: dict[str, Any]) -> bool:
    """Whether a (validated) record is a conversation rather than an Alpaca record."""
    return "messages" in rec and "instruction" not in rec


def _check_record(rec: Any) -> str | None:
    """The problem with one flat record, or None (conversations were checked when they were normalised)."""
    if not isinstance(rec, dict):
        return f"is a {type(rec).__name__}, not an object"
    if is_chat(rec):
        return None
    for key in ("instruction", "output"):
        if key not in rec:
            return f"field {key!r} is missing"
    for key in TEXT_FIELDS + OPTIONAL_STRING_FIELDS:
        v = rec.get(key)
        if key in rec and not isinstance(v, str) and not (v is None and key in OPTIONAL_STRING_FIELDS):
            return f"field {key!r} is a {type(v).__name__}, not a string"
    return None


def _accept(raw: Any, where: str, skip_invalid: bool, report: LoadReport, out: list[dict[str, Any]]) -> None:
    flat = _flatten(raw)
    problems = [flat] if isinstance(flat, str) else [_check_record(r) for r in flat]
    bad = next((x for x in problems if x), None)
    if bad:
        msg = f"{where}: {bad}"
        if not skip_invalid:
            raise DataError(msg + " (--skip-invalid skips such records)")
        report.n_skipped += 1
        if len(report.problems) < 5:
            report.problems.append(msg)
        return
    assert not isinstance(flat, str)
    for r in flat:
        r = dict(r)
        if not is_chat(r):
            r["input"] = r.get("input") or ""
        r["_where"] = where  # a chat template renders it later, at tokenisation; its errors name the record
        out.append(r)


def _flatten(rec: Any) -> list[Any] | str:
    """Expand the self-instruct `instances` shape, convert LLaVA records and normalise conversations; returns a
    problem string for a malformed one."""
    if isinstance(rec, dict) and "instruction" not in rec:
        if "messages" in rec:
            chat = _chat_record(rec, OPENAI)
            return chat if isinstance(chat, str) else [chat]
        if "conversations" in rec and not any(rec.get(m) for m in MEDIA_FIELDS):
            chat = _chat_record(rec, SHAREGPT)
            return chat if isinstance(chat, str) else [chat]
    if isinstance(rec, dict) and "conversations" in rec and "instruction" not in rec:
        from llama_adapter.multimodal.features import llava_to_alpaca

        try:
            return [llava_to_alpaca(rec)]
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            return f"LLaVA record: {e}"
    if not isinstance(rec, dict) or "instances" not in rec or "output" in rec:
        return [rec]
    inst = rec["instances"]
    if not isinstance(inst, list) or not inst:
        return "field 'instances' is not a non-empty list"
    base = {k: v for k, v in rec.items() if k != "instances"}
    out = []
    for j, x in enumerate(inst):
        if not isinstance(x, dict):
            return f"instances[{j}] is a {type(x).__name__}, not an object"
        out.append({**base, **x})
    return out


def _content(value: Any, name: str) -> tuple[str, dict[str, str]] | str:
    """(text, {"image"?: URL, "audio"?: data URL}) of a turn's content: a string, or a list of text parts and at
    most one image and one audio part (text parts joined by newlines, as the server does); or the problem with it."""
    if isinstance(value, str):
        return value, {}
    if not isinstance(value, list):
        return f"field {name!r} is a {type(value).__name__}, not a string or a list of text/image_url parts"
    texts: list[str] = []
    image: str | None = None
    media: dict[str, str] = {}
    for k, part in enumerate(value):
        at = f"{name}[{k}]"
        if not isinstance(part, dict):
            return f"{at} is a {type(part).__name__}, not an object"
        kind = part.get("type")
        if kind == "text":
            if not isinstance(part.get("text"), str):
                return f"{at}: field 'text' is a {type(part.get('text')).__name__}, not a string"
            texts.append(part["text"])
        elif kind == "image_url":
            iu = part.get("image_url")
            url = iu.get("url") if isinstance(iu, dict) else iu
            if not isinstance(url, str) or not url:
                return f"{at}: 'image_url' needs a 'url' string (an image path or a data: URL)"
            if url.startswith(("http://", "https://")):
                return f"{at}: remote image URLs are not fetched; use an image path or a data: URL"
            if image is not None:
                return f"{at}: a second image (one image per record)"
            image = url.removeprefix("file://")
            media["image"] = image
        elif kind == "input_audio":
            ia = part.get("input_audio")
            data = ia.get("data") if isinstance(ia, dict) else None
            fmt = ia.get("format", "wav") if isinstance(ia, dict) else None
            if not isinstance(data, str) or not data or not isinstance(fmt, str):
                return f"{at}: 'input_audio' needs a base64 'data' string and a 'format' (wav, mp3, ...)"
            if "audio" in media:
                return f"{at}: a second audio clip (one per record)"
            media["audio"] = f"data:audio/{fmt};base64,{data}"
        else:
            return f"{at}: unknown part type {kind!r} (expected text, image_url or input_audio)"
    return "\n".join(texts), media


def _a(role: str) -> str:
    """A role name with its article ("an assistant", "a user")."""
    return ("an " if role[:1] in "aeio" else "a ") + role


def _chat_record(rec: dict[str, Any], fmt: _ChatFormat) -> dict[str, Any] | str:
    """A conversation in `fmt` -> `{"messages": [{"role", "content": str}], "image"?: ...}` with the record's other
    fields; or the problem with it, naming the turn and field in the file's own terms."""
    turns = rec[fmt.key]
    if not isinstance(turns, list) or not turns:
        return f"field {fmt.key!r} is not a non-empty list"
    media: dict[str, str] = {}
    for m in MEDIA_FIELDS:
        value = rec.get(m)
        if value is not None and not isinstance(value, str):
            return f"field {m!r} is a {type(value).__name__}, not a string"
        if value:
            media[m] = value
    messages: list[dict[str, str]] = []
    for j, turn in enumerate(turns):
        at = f"{fmt.key}[{j}]"
        if not isinstance(turn, dict):
            return f"{at} is a {type(turn).__name__}, not an object"
        for key in (fmt.role, fmt.content):
            if key not in turn:
                return f"{at}: field {key!r} is missing"
        role = turn[fmt.role]
        if not isinstance(role, str) or role not in fmt.roles:
            return f"{at}: unknown {fmt.role} {role!r} (expected {', '.join(fmt.roles)})"
        content = _content(turn[fmt.content], fmt.content)
        if isinstance(content, str):
            return f"{at}: {content}"
        text, parts = content
        for m, url in parts.items():
            what = "an image" if m == "image" else "an audio clip"
            if fmt.roles[role] != "user":
                return f"{at}: {what} is only allowed in {_a(fmt.user)} turn"
            if m in media:
                return f"{at}: a second {'image' if m == 'image' else 'audio clip'} (one {m} per record)"
            media[m] = url
        if not text.strip() and not parts:
            return f"{at}: empty {fmt.content!r}"
        messages.append({"role": fmt.roles[role], "content": text})
    if not any(m["role"] == "assistant" for m in messages):
        return f"the conversation has no {fmt.assistant} turn to learn from"
    if messages[-1]["role"] != "assistant":
        last = turns[-1][fmt.role]
        return f"the conversation ends with {_a(last)} turn; it must end with {_a(fmt.assistant)} turn"
    out = {k: v for k, v in rec.items() if k not in (fmt.key, *MEDIA_FIELDS)}
    out["messages"] = messages
    out.update(media)
    return out


def load_records(
    paths: str | Path | Sequence[str | Path], skip_invalid: bool = False, report: LoadReport | None = None
) -> list[dict[str, Any]]:
    """Read and validate records (Alpaca, OpenAI chat, ShareGPT/LLaVA) from files/directories. Unknown fields
    are kept.

    With `skip_invalid`, bad records are skipped and counted in `report.n_skipped`; otherwise the first
    bad record raises DataError naming the file, record number and field.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    report = report if report is not None else LoadReport()
    records: list[dict[str, Any]] = []
    for p in paths:
        for f in _data_files(Path(p)):
            report.files.append(str(f))
            for where, raw in _parse_file(f):
                n = len(records)
                _accept(raw, f"{f}: {where}", skip_invalid, report, records)
                for r in records[n:]:  # relative image paths resolve against their own file's folder
                    r.setdefault("_dir", str(f.parent))
    report.n_records = len(records)
    return records


def validate_records(
    records: Iterable[Any], skip_invalid: bool = False, source: str = "records", report: LoadReport | None = None
) -> list[dict[str, Any]]:
    """The same checks for in-memory records (e.g. passed to `train(records=...)`)."""
    report = report if report is not None else LoadReport()
    out: list[dict[str, Any]] = []
    for i, raw in enumerate(records):
        _accept(raw, f"{source}: record {i + 1}", skip_invalid, report, out)
    report.n_records = len(out)
    return out


def split_validation(
    records: list[dict[str, Any]], fraction: float, seed: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Deterministic (seeded) hold-out of round(fraction * n) records, at least one when fraction > 0."""
    if not 0.0 <= fraction < 1.0:
        raise DataError(f"--val-fraction must be in [0, 1), not {fraction}")
    if fraction == 0.0:
        return records, []
    n_val = max(1, round(fraction * len(records)))
    if n_val >= len(records):
        raise DataError(f"--val-fraction {fraction} leaves no training records out of {len(records)}")
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    val_idx = set(order[:n_val])
    return ([r for i, r in enumerate(records) if i not in val_idx], [r for i, r in enumerate(records) if i in val_idx])


# ---- tokenisation ---------------------------------------------------------------------------------------
@dataclass
class Example:
    """One tokenised record: its ids and which of them are targets of the loss.

    `mask` is the general form (a conversation supervises several separate spans). An Alpaca record supervises
    one tail, so it may be given as `n_prompt` alone; either way both are set after construction, `n_prompt`
    being the position of the first supervised token.
    """

    ids: list[int]  # BOS + prompt + output + EOS, or a rendered conversation (truncated)
    n_prompt: int = 0  # tokens before the first supervised one; without `mask`, every later token is supervised
    truncated: bool = False
    image_features: Tensor | None = None
    mask: list[bool] = field(default_factory=list)  # per token: is it a target? (empty: derived from n_prompt)

    def __post_init__(self) -> None:
        if not self.mask:
            self.mask = [i >= self.n_prompt for i in range(len(self.ids))]
        elif len(self.mask) != len(self.ids):
            raise ValueError(f"mask has {len(self.mask)} entries for {len(self.ids)} tokens")
        else:
            self.n_prompt = next((i for i, m in enumerate(self.mask) if m), len(self.ids))

    @property
    def n_supervised(self) -> int:
        return sum(self.mask)


@dataclass
class TokenizeReport:
    n_examples: int = 0
    n_truncated: int = 0
    n_dropped: int = 0  # prompt alone fills max_length: nothing left to learn from
    n_tokens: int = 0
    n_supervised: int = 0


def record_template(template: str, rec: dict[str, Any]) -> str:
    """The template a record is rendered with: `auto` is alpaca for Alpaca records and chat for conversations."""
    if template != AUTO:
        return template
    return CHAT if is_chat(rec) else "alpaca"


def resolve_template(template: str, records: Iterable[dict[str, Any]]) -> str:
    """The one template of a run (what its adapter file records): `template` unless it is `auto`, which becomes
    alpaca or chat after the data's kind. Data that mixes both kinds must say which to use for all."""
    if template != AUTO:
        return template
    kinds = {is_chat(r) for r in records}
    if kinds == {True, False}:
        raise DataError(
            "the data mixes Alpaca records and conversations; choose one rendering for all of them: "
            "--template chat (the base's chat template) or --template alpaca"
        )
    return CHAT if kinds == {True} else "alpaca"


def alpaca_messages(rec: dict[str, Any]) -> list[dict[str, str]]:
    """An Alpaca record as one exchange (instruction, then its input after a blank line), for a chat template."""
    inp = rec.get("input") or ""
    text = f"{rec['instruction']}\n\n{inp}" if inp.strip() else rec["instruction"]
    return [{"role": "user", "content": text}, {"role": "assistant", "content": rec["output"]}]


Piece = tuple[str | int, bool]  # (text, or a token id such as EOS), and whether its tokens are supervised


def _supervised_turns(messages: Sequence[dict[str, str]], train_on: str) -> set[int]:
    answers = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    return set(answers) if train_on == "all" else set(answers[-1:])


def chat_pieces(
    chat_template: ChatTemplate, messages: Sequence[dict[str, str]], train_on: str, where: str
) -> list[Piece]:
    """The conversation's text through the base's chat template, cut at the edges of the assistant turns.

    An assistant turn's text is the difference between the conversation rendered up to and including it and the
    conversation rendered up to it with the generation prompt (the opening of an assistant turn): the answer and
    the end-of-turn text the template writes after it, which the model must learn to emit to stop. This needs a
    prefix-stable template (each rendering a string prefix of the next); one that rewrites earlier turns (e.g.
    drops past reasoning) cannot mark the assistant tokens, and is refused naming the record.
    """
    supervised = _supervised_turns(messages, train_on)
    pieces: list[Piece] = []
    done = ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        for upto, gen in ((i, True), (i + 1, False)):
            try:
                text = chat_template.render(messages[:upto], add_generation_prompt=gen)
            except TemplateError as e:
                raise DataError(f"{where}: {e}") from None
            if not text.startswith(done):
                raise DataError(
                    f"{where}: the chat template is not prefix-stable at turn {i} (the conversation rendered "
                    f"{'up to' if gen else 'through'} it does not start with the text rendered before), so the "
                    "assistant tokens cannot be marked; train with --template alpaca"
                )
            pieces.append((text[len(done) :], not gen and i in supervised))
            done = text
    return pieces


def instruction_pieces(tokenizer: Any, messages: Sequence[dict[str, str]], template: str, train_on: str) -> list[Piece]:
    """A conversation through an instruction template, as `prompting.conversation_prompt` lays one out: each user
    turn is an instruction (the system text before the first one), each answer follows its response marker and
    ends with EOS (so the model learns to stop), and a blank line separates an answer from the next instruction.
    A single exchange is therefore exactly the Alpaca record {instruction: user, output: answer}."""
    system = "\n".join(m["content"] for m in messages if m["role"] == "system")
    turns = [m for m in messages if m["role"] != "system"]
    supervised = _supervised_turns(turns, train_on)
    pieces: list[Piece] = [(tokenizer.bos_id, False)] if tokenizer.bos_id is not None else []
    first = True
    for i, m in enumerate(turns):
        if m["role"] == "user":
            instr = f"{system}\n\n{m['content']}" if first and system else m["content"]
            first = False
            after_answer = i > 0 and turns[i - 1]["role"] == "assistant"
            pieces.append((("\n\n" if after_answer else "") + format_prompt(template, instr), False))
        else:
            pieces += [(m["content"], i in supervised), (tokenizer.eos_id, i in supervised)]
    return pieces


def _encode_run(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """The token ids of consecutive text pieces: the joint encoding, cut where each piece ends, when every cut
    falls between tokens; otherwise (a token merges across a cut) each piece encoded on its own, as
    `encode_record` does for prompt and output, so the supervised span stays exact."""
    whole = "".join(texts)
    full = tokenizer.encode(whole)
    cuts, end = [0], 0
    for t in texts[:-1]:
        end += len(t)
        head = tokenizer.encode(whole[:end])
        if full[: len(head)] != head or len(head) < cuts[-1]:
            return [tokenizer.encode(t) for t in texts]
        cuts.append(len(head))
    cuts.append(len(full))
    return [full[a:b] for a, b in zip(cuts, cuts[1:], strict=False)]


def encode_pieces(tokenizer: Any, pieces: Sequence[Piece]) -> tuple[list[int], list[bool]]:
    """(ids, supervision mask) of text pieces and token ids; no BOS or EOS is added (a piece carries them)."""
    ids: list[int] = []
    mask: list[bool] = []
    run: list[tuple[str, bool]] = []

    def flush() -> None:
        if not run:
            return
        for (_, sup), part in zip(run, _encode_run(tokenizer, [t for t, _ in run]), strict=True):
            ids.extend(part)
            mask.extend([sup] * len(part))
        run.clear()

    for piece, sup in pieces:
        if isinstance(piece, str):
            run.append((piece, sup))
        else:
            flush()
            ids.append(piece)
            mask.append(sup)
    flush()
    return ids, mask


def encode_record(
    tokenizer: Any,
    rec: dict[str, Any],
    template: str,
    max_length: int,
    chat_template: ChatTemplate | None = None,
    train_on: str = "all",
) -> Example:
    """Tokenise one record.

    Alpaca records with an instruction template: the prompt and prompt+output are encoded jointly and the first
    len(BOS + encode(prompt)) tokens masked, the usual approach; if the joint encoding does not start with the
    prompt's tokens (a merge across the boundary), prompt and output are encoded separately so the label
    boundary stays exact and the prompt tokens match what generation feeds the model. Conversations (and any
    record under `chat`) supervise their assistant turns (`train_on`: all, or the last); the text a chat template
    renders holds its own special tokens, so no BOS is added to it.
    """
    template = record_template(template, rec)
    if template == CHAT or is_chat(rec):
        messages = rec["messages"] if is_chat(rec) else alpaca_messages(rec)
        if template != CHAT:
            pieces = instruction_pieces(tokenizer, messages, template, train_on)
        elif chat_template is None:
            raise TemplateError("template 'chat' needs the base's chat template, and the base has none")
        else:
            pieces = chat_pieces(chat_template, messages, train_on, rec.get("_where", "a record"))
        ids, mask = encode_pieces(tokenizer, pieces)
        return Example(
            ids[:max_length],
            truncated=len(ids) > max_length,
            image_features=rec.get("image_features"),
            mask=mask[:max_length],
        )
    prompt = format_prompt(template, rec["instruction"], rec.get("input") or "")
    p_ids = tokenizer.encode(prompt, bos=True, eos=False)
    full = tokenizer.encode(prompt + rec["output"], bos=True, eos=True)
    if full[: len(p_ids)] != p_ids:
        full = p_ids + tokenizer.encode(rec["output"], bos=False, eos=True)
    truncated = len(full) > max_length
    return Example(full[:max_length], min(len(p_ids), max_length), truncated, rec.get("image_features"))


def tokenize_records(
    tokenizer: Any,
    records: Sequence[dict[str, Any]],
    template: str,
    max_length: int,
    report: TokenizeReport | None = None,
    chat_template: ChatTemplate | None = None,
    train_on: str = "all",
) -> list[Example]:
    """The examples of `records` (see `encode_record`); those with nothing supervised left after truncation are
    dropped and counted."""
    report = report if report is not None else TokenizeReport()
    out = []
    for rec in records:
        ex = encode_record(tokenizer, rec, template, max_length, chat_template, train_on)
        report.n_truncated += ex.truncated
        if ex.n_supervised <= 0:
            report.n_dropped += 1
            continue
        report.n_tokens += len(ex.ids)
        report.n_supervised += ex.n_supervised
        out.append(ex)
    report.n_examples = len(out)
    return out


# ---- batching -------------------------------------------------------------------------------------------
def steps_per_epoch(n_examples: int, batch_size: int) -> int:
    return max(1, math.ceil(n_examples / batch_size))


def epoch_plan(
    lengths: Sequence[int], batch_size: int, micro_batch: int, seed: int, epoch: int
) -> list[list[list[int]]]:
    """The steps of one epoch: each a list of micro-batches (lists of example indices).

    Examples are shuffled (seeded by seed and epoch, so a resumed run sees the same order), cut into
    steps of `batch_size`, and within each step sorted by length before being cut into micro-batches:
    rows of similar length share a micro-batch (little padding) while every step's set of examples is
    the same as with plain shuffling, so the gradient is unchanged.
    """
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(lengths), generator=g).tolist()
    plan = []
    for s in range(0, len(order), batch_size):
        step = sorted(order[s : s + batch_size], key=lambda i: (-lengths[i], i))
        plan.append([step[m : m + micro_batch] for m in range(0, len(step), micro_batch)])
    return plan


def collate(examples: Sequence[Example], pad_id: int, pad_to_multiple: int = 1) -> dict[str, Tensor]:
    """Right-padded `input_ids` [B, T] and `labels` [B, T] (IGNORE_INDEX on unsupervised tokens and padding).

    `image_features` [B, F] is added when any example has features (zero rows for those without).
    Right padding needs no attention mask: under the causal mask real tokens never see the padding.
    """
    T = max(len(e.ids) for e in examples)
    T = -(-T // pad_to_multiple) * pad_to_multiple
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), T), IGNORE_INDEX, dtype=torch.long)
    for i, e in enumerate(examples):
        t = torch.tensor(e.ids, dtype=torch.long)
        ids[i, : len(t)] = t
        labels[i, : len(t)] = torch.where(torch.tensor(e.mask, dtype=torch.bool), t, IGNORE_INDEX)
    batch = {"input_ids": ids, "labels": labels}
    feats = [e.image_features for e in examples]
    if any(f is not None for f in feats):
        ref = next(f for f in feats if f is not None)
        assert ref is not None
        rows = [f.float().reshape(-1) if f is not None else torch.zeros(ref.numel()) for f in feats]
        batch["image_features"] = torch.stack(rows)
    return batch
