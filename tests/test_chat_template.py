"""The base's own chat template: found and rendered string for string as `transformers` does (real-world templates,
named templates, chat_template.json/.jinja), sandboxed; the one rule that picks a prompt format; BOS/EOS of chat
prompts; and a tiny instruct model answering through `generate`, `chat` and the Python API without any flag."""

from __future__ import annotations

import io
import json
import logging
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import transformers
from tiny import chatml

import llama_adapter as la
from llama_adapter import prompting
from llama_adapter.chat_template import ChatTemplate
from llama_adapter.cli import main
from llama_adapter.errors import TemplateError
from llama_adapter.inference.chat import chat, stream_chat
from llama_adapter.inference.text_stream import TextStream
from llama_adapter.prompting import CHAT, render_chat, render_instruction, resolve_template
from llama_adapter.tokenizer import Tokenizer

# ---- real-world templates (their public texts, reproduced) ------------------------------------------------------
CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + "
    "'\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
QWEN2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SMOLLM2 = """{%- for message in messages %}
    {%- if loop.first and messages[0]['role'] != 'system' %}
        {{- '<|im_start|>system
You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>
' }}
    {%- endif %}
    {{- '<|im_start|>' + message['role'] + '
' + message['content'] + '<|im_end|>' + '
' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant
' }}
{%- endif %}
"""
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
LLAMA31 = """{{- bos_token }}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{%- if tools is not none %}
    {{- "Environment: ipython\\n" }}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""
LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = "
    "messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + "
    "'\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)
MISTRAL = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
# the helpers templates use: namespace, loop controls, {% generation %}, tojson (no HTML escaping), dict
HELPERS = """{%- set ns = namespace(n=0) -%}
{%- for m in messages -%}
{%- if m.role == 'system' %}{% continue %}{% endif -%}
{%- set ns.n = ns.n + 1 -%}
{% generation %}{{ ns.n }}:{{ m | tojson }}{% endgeneration %}
{%- if loop.index > 5 %}{% break %}{% endif %}
{% endfor %}
{{- dict(a=1, b='<&>') | tojson }}{{ eos_token }}"""

SPECIAL = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "<|endoftext|>"]
SPECIAL += ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
BOS = {
    "__type": "AddedToken",
    "content": "<s>",
    "lstrip": False,
    "normalized": False,
    "rstrip": False,
    "single_word": False,
}
LLAMA_TOKENS = {"bos_token": BOS, "eos_token": "</s>", "unk_token": "<unk>"}  # a token as an object, as Llama 2 has
CASES = {  # name -> (template, tokenizer_config's special tokens)
    "chatml": (CHATML, {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}),
    "qwen2": (QWEN2, {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}),
    "smollm2": (SMOLLM2, {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}),
    "llama3": (LLAMA3, {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}),
    "llama31": (LLAMA31, {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}),
    "llama2": (LLAMA2, LLAMA_TOKENS),
    "mistral": (MISTRAL, LLAMA_TOKENS),
    "helpers": (HELPERS, {"eos_token": "</s>"}),
}
SYSTEM = {"role": "system", "content": "You are terse. Use <b>bold</b> & 'quotes'."}
Q1 = {"role": "user", "content": "What is the capital of France?"}
A1 = {"role": "assistant", "content": " Paris. "}
Q2 = {"role": "user", "content": "And of Italy?", "name": None}  # None-valued keys are dropped, as transformers does
CONVERSATIONS = {
    "user": [Q1],
    "system": [SYSTEM, Q1],
    "multi": [Q1, A1, Q2],
    "system-multi": [SYSTEM, Q1, A1, Q2],
    "answered": [Q1, A1],
}


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory) -> Path:
    """A byte-level BPE tokenizer.json with the special tokens of all the templates above."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    text = [m["content"] for c in CONVERSATIONS.values() for m in c] + ["system user assistant [INST] [/INST]"]
    tok.train_from_iterator(text * 20, trainer)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return path


def _dir(root: Path, tokenizer_json: Path, name: str, config: dict, files: dict[str, str] | None = None) -> Path:
    d = root / name
    d.mkdir()
    shutil.copy(tokenizer_json, d / "tokenizer.json")
    (d / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", **config}))
    for rel, text in (files or {}).items():
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        (d / rel).write_text(text)
    return d


def _hf(d: Path):
    return transformers.AutoTokenizer.from_pretrained(str(d))


def _hf_render(tok, messages, add_generation_prompt, **kw):
    """transformers' text, or the exception class it raises."""
    try:
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt, **kw)
    except Exception as e:  # noqa: BLE001 -- compared with ours below
        return type(e)


@pytest.mark.parametrize("case", sorted(CASES))
def test_real_world_templates_render_as_transformers(case, tmp_path, tokenizer_json):
    template, special = CASES[case]
    d = _dir(tmp_path, tokenizer_json, case, {**special, "chat_template": template})
    ours, hf = ChatTemplate.from_dir(d), _hf(d)
    assert ours is not None and ours.source == template and ours.origin.endswith("tokenizer_config.json")
    rendered = 0
    for conv in CONVERSATIONS.values():
        for gen in (False, True):
            want = _hf_render(hf, conv, gen)
            if isinstance(want, type):  # transformers refuses (Mistral has no system role): so do we
                with pytest.raises(TemplateError) as e:
                    ours.render(conv, add_generation_prompt=gen)
                assert "\n" not in str(e.value) and "roles" in str(e.value)
                continue
            assert ours.render(conv, add_generation_prompt=gen) == want, (case, conv, gen)
            rendered += 1
    assert rendered >= 6
    if case == "llama31":  # `tools is not none`: tools is None unless given, not undefined
        assert "ipython" not in ours.render([Q1])
        assert ours.render([Q1], tools=[{"name": "f"}]) == _hf_render(hf, [Q1], False, tools=[{"name": "f"}])
    if case == "helpers":  # no HTML escaping, the message without its None key, the loop stopped by {% continue %}
        text = ours.render([SYSTEM, Q1, Q2])
        assert '"b": "<&>"' in text and '"name"' not in text and text.count(":{") == 2


def test_chat_prompt_tokens_are_transformers_ids_without_an_added_bos(tmp_path, tokenizer_json):
    """Item 3: the rendered text is encoded as is (the template writes BOS where it wants one)."""
    for case in ("llama3", "chatml", "llama2"):
        template, special = CASES[case]
        d = _dir(tmp_path, tokenizer_json, case, {**special, "chat_template": template})
        tok = Tokenizer.from_file(d / "tokenizer.json")
        model = SimpleNamespace(chat_template=ChatTemplate.from_dir(d), tokenizer=tok, adapters={}, source=str(d))
        for conv in (CONVERSATIONS["user"], CONVERSATIONS["system-multi"]):
            p = render_chat(model, resolve_template(model, None), conv)
            assert p.template == CHAT and not p.bos
            want = _hf(d).apply_chat_template(conv, tokenize=True, add_generation_prompt=True, return_dict=False)
            assert p.encode(tok) == list(want)
        if case == "llama3":
            ids = p.encode(tok)
            assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1  # once: the template's own


def test_named_templates_chat_template_json_and_jinja_priority(tmp_path, tokenizer_json, caplog):
    named = [{"name": "default", "template": CHATML}, {"name": "tool_use", "template": LLAMA31}]
    d = _dir(tmp_path, tokenizer_json, "named", {**CASES["llama31"][1], "chat_template": named})
    hf = _hf(d)
    conv = CONVERSATIONS["system-multi"]
    default, tool_use = ChatTemplate.from_dir(d), ChatTemplate.from_dir(d, name="tool_use")
    assert default is not None and default.name == "default" and default.source == CHATML
    assert default.render(conv, True) == _hf_render(hf, conv, True)
    assert tool_use.render(conv, True) == _hf_render(hf, conv, True, chat_template="tool_use")
    assert default.digest != tool_use.digest and len(default.digest) == 16
    with pytest.raises(TemplateError, match="no chat template named 'nope'.*default, tool_use"):
        ChatTemplate.from_dir(d, name="nope")

    no_default = [{"name": "a", "template": CHATML}, {"name": "b", "template": MISTRAL}]
    d2 = _dir(tmp_path, tokenizer_json, "no-default", {**LLAMA_TOKENS, "chat_template": no_default})
    with caplog.at_level(logging.WARNING, logger="llama_adapter.chat_template"):
        assert ChatTemplate.from_dir(d2) is None  # transformers refuses to choose too
    assert "none is the default" in caplog.text
    assert isinstance(_hf_render(_hf(d2), [Q1], True), type)
    assert ChatTemplate.from_dir(d2, name="b").render([Q1], True) == _hf_render(_hf(d2), [Q1], True, chat_template="b")

    # chat_template.json (processor checkpoints), with the special tokens still from tokenizer_config.json
    d3 = _dir(
        tmp_path, tokenizer_json, "json", LLAMA_TOKENS, {"chat_template.json": json.dumps({"chat_template": LLAMA2})}
    )
    t3 = ChatTemplate.from_dir(d3)
    assert t3 is not None and t3.origin.endswith("chat_template.json") and t3.special_tokens["bos_token"] == "<s>"
    assert t3.render(conv, True) == _hf_render(_hf(d3), conv, True, chat_template=LLAMA2)

    # chat_template.jinja replaces the template in tokenizer_config.json, as in transformers
    d4 = _dir(
        tmp_path, tokenizer_json, "jinja", {**LLAMA_TOKENS, "chat_template": MISTRAL}, {"chat_template.jinja": CHATML}
    )
    t4 = ChatTemplate.from_dir(d4)
    assert t4 is not None and t4.source == CHATML
    assert t4.render(conv, True) == _hf_render(_hf(d4), conv, True)

    d5 = _dir(tmp_path, tokenizer_json, "none", LLAMA_TOKENS)
    assert ChatTemplate.from_dir(d5) is None
    with pytest.raises(TemplateError, match="has no chat template"):
        ChatTemplate.from_dir(d5, name="default")


def test_special_tokens_as_transformers_has_them(tmp_path, tokenizer_json):
    """Standard tokens (a string or an AddedToken object), a model's own `*_token`, `extra_special_tokens`, and an
    old special_tokens_map.json; a variable passed to `render` wins over a token of the same name."""
    tpl = "{{ bos_token }}|{{ image_token }}|{{ foo_token }}|{{ eos_token }}|{{ pad_token }}|{{ unk_token }}|"
    config = {"bos_token": BOS, "eos_token": "<|im_end|>", "image_token": "<|im_start|>", "chat_template": tpl}
    d = _dir(tmp_path, tokenizer_json, "special", {**config, "extra_special_tokens": {"foo_token": "</s>"}})
    (d / "special_tokens_map.json").write_text(json.dumps({"pad_token": "</s>"}))
    ours = ChatTemplate.from_dir(d)
    assert ours.render([Q1]) == _hf_render(_hf(d), [Q1], False) == "<s>|<|im_start|>|</s>|<|im_end|>|</s>||"
    assert ours.render([Q1], eos_token="END") == _hf_render(_hf(d), [Q1], False, eos_token="END")


@pytest.mark.parametrize(
    "source, words",
    [
        ("{{ ''.__class__ }}", "unsafe"),
        ("{{ messages.__class__.__mro__ }}", "unsafe"),
        ("{% set x = [] %}{{ x.append(1) }}{{ x }}", "unsafe"),
        ("{{ messages.pop() }}", "unsafe"),
        ("{% set ns = namespace(_secret=1) %}{{ ns }}", "underscore"),
        ("{{ raise_exception('Conversation roles must alternate') }}", "roles must alternate"),
        ("{% for m in messages %}{{ m.content + 1 }}{% endfor %}", "cannot render"),
    ],
)
def test_sandbox_and_raise_exception_give_one_line_template_errors(source, words):
    t = ChatTemplate(source, origin="tokenizer_config.json")
    msgs = [{"role": "user", "content": "hi"}]
    with pytest.raises(TemplateError) as e:
        t.render(msgs, add_generation_prompt=True)
    msg = str(e.value)
    assert words in msg and "\n" not in msg and "tokenizer_config.json" in msg
    assert msgs == [{"role": "user", "content": "hi"}]  # the caller's messages are never touched


def test_invalid_jinja_is_a_template_error():
    with pytest.raises(TemplateError, match="not valid jinja2"):
        ChatTemplate("{% for m in messages %}{{ m }}").render([Q1])


# ---- the one rule ------------------------------------------------------------------------------------------------
def _model(chat_template: ChatTemplate | None, **adapters: dict) -> SimpleNamespace:
    return SimpleNamespace(
        chat_template=chat_template,
        source="/ckpt",
        adapters={name: SimpleNamespace(meta=meta) for name, meta in adapters.items()},
    )


def test_resolve_template_rule(caplog):
    chatml = ChatTemplate(CHATML, {"eos_token": "<|im_end|>"})
    m = _model(chatml, alp={"template": "alpaca"}, bare={}, trained={"template": "chat"})
    assert resolve_template(m, None) == CHAT  # an instruct base: its own template
    assert resolve_template(m, "bare") == CHAT  # an adapter that recorded nothing: the base's
    assert resolve_template(m, "alp") == "alpaca"  # what the adapter was trained with
    assert resolve_template(m, "trained") == CHAT
    assert resolve_template(m, "alp", "chat") == CHAT  # explicit choices win
    assert resolve_template(m, None, "plain") == "plain"
    assert resolve_template(m, "alp", "raw") is None and resolve_template(m, None, "none") is None
    with pytest.raises(TemplateError, match="unknown template 'nope'"):
        resolve_template(m, None, "nope")

    plain = _model(None, alp={"template": "alpaca"}, trained={"template": "chat"})
    assert resolve_template(plain, None) is None  # a base without a chat template: plain text
    assert resolve_template(plain, "alp") == "alpaca"
    with pytest.raises(TemplateError, match="--template chat.*/ckpt has none"):
        resolve_template(plain, None, "chat")
    with pytest.raises(TemplateError, match="'trained' was trained with its base's chat template"):
        resolve_template(plain, "trained")
    assert prompting.describe_template(plain, "trained") == "chat"  # listings never raise

    # a recorded digest that differs from the base's template: one warning, however often it is asked
    m2 = _model(chatml, old={"template": "chat", "chat_template_digest": "0123456789abcdef"})
    m2.adapters["same"] = SimpleNamespace(meta={"template": "chat", "chat_template_digest": chatml.digest})
    with caplog.at_level(logging.WARNING, logger="llama_adapter.prompting"):
        for _ in range(3):
            assert resolve_template(m2, "old") == CHAT
            assert resolve_template(m2, "same") == CHAT
    warnings = [r for r in caplog.records if r.name == "llama_adapter.prompting"]
    assert len(warnings) == 1 and "'old'" in warnings[0].getMessage() and "0123456789abcdef" in warnings[0].getMessage()


def test_rendered_prompts_bos_and_response_markers():
    m = _model(ChatTemplate(CHATML))
    conv = [("system", "Be brief."), ("user", "What is the capital of France?")]
    c = render_chat(m, CHAT, conv)
    assert c.text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert not c.bos and not c.strip_separator  # ChatML ends with a newline: nothing to strip
    a = render_chat(m, "alpaca", conv)
    assert a.bos and a.strip_separator and a.text.endswith("### Response:") and "Be brief.\n\nWhat is" in a.text
    t = render_chat(m, None, conv)
    assert t.bos and t.strip_separator and t.text == "Be brief.\nUser: What is the capital of France?\nAssistant:"
    inst = render_chat(_model(ChatTemplate(LLAMA2, {"bos_token": "<s>", "eos_token": "</s>"})), CHAT, conv)
    assert inst.text == "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nWhat is the capital of France? [/INST]"
    assert not inst.bos and inst.strip_separator  # the answer follows "[/INST]"
    assert render_instruction(m, "plain", "Say hi").strip_separator is False
    assert render_instruction(m, None, "Say hi", "now").text == "Say hi\nnow"
    g = render_instruction(m, CHAT, "Say hi", "now")
    assert g.text == "<|im_start|>user\nSay hi\n\nnow<|im_end|>\n<|im_start|>assistant\n" and not g.bos


class _PieceTokenizer:
    """decode = the pieces joined: enough for TextStream."""

    def __init__(self, pieces: list[str]) -> None:
        self.pieces = pieces

    def decode(self, ids: list[int]) -> str:
        return "".join(self.pieces[i] for i in ids)


def test_text_stream_strips_one_separator_space():
    tok = _PieceTokenizer([" ", " Paris", ".", "  two"])
    for ids, plain, stripped in (([1, 2], " Paris.", "Paris."), ([0, 1], "  Paris", " Paris"), ([3], "  two", " two")):
        for strip, want in ((False, plain), (True, stripped)):
            s = TextStream(tok, strip_separator=strip)
            assert "".join(s.push(i) for i in ids) + s.finish() == want
    s = TextStream(tok, stop=["Par"], strip_separator=True)
    assert "".join(s.push(i) for i in [1, 2]) + s.finish() == ""


# ---- EOS and special tokens of the tokenizer ---------------------------------------------------------------------
def test_tokenizer_config_eos_token_ends_turns(tmp_path, tokenizer_json):
    from tokenizers import Tokenizer as HFTokenizer

    im_end = HFTokenizer.from_file(str(tokenizer_json)).token_to_id("<|im_end|>")
    cfg = SimpleNamespace(bos_token_id=1, eos_token_ids=[2], pad_token_id=None)
    for eos in ("<|im_end|>", {**BOS, "content": "<|im_end|>"}):
        d = _dir(tmp_path, tokenizer_json, f"eos{len(str(eos))}", {"eos_token": eos})
        tok = Tokenizer.from_file(d / "tokenizer.json", cfg)  # type: ignore[arg-type]
        assert tok.eos_ids == [2, im_end] and tok.eos_id == 2  # the config's EOS stays the first (training's)
        assert Tokenizer.from_file(d / "tokenizer.json").eos_ids == [im_end]
    d = _dir(tmp_path, tokenizer_json, "same", {"eos_token": "</s>"})
    assert Tokenizer.from_file(d / "tokenizer.json", cfg).eos_ids == [2]  # type: ignore[arg-type]


def test_sentencepiece_reads_special_tokens_written_in_the_text(tmp_path):
    import sentencepiece as spm

    lines = ["What is the capital of France?", "Paris is the capital.", "[INST] hello [/INST]", "<<SYS>> be brief"]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines * 50),
        model_prefix=str(tmp_path / "tokenizer"),
        vocab_size=80,
        model_type="bpe",
        hard_vocab_limit=False,
        bos_id=1,
        eos_id=2,
        unk_id=0,
        minloglevel=2,
    )
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>", "bos_token": "<s>"}))
    tok = Tokenizer.from_file(tmp_path / "tokenizer.model")
    sp = tok.backend
    assert tok.bos_id == 1 and tok.eos_ids == [2]
    text = "<s>[INST] hello [/INST] Paris</s><s>[INST] France [/INST]"
    want = [1, *sp.encode("[INST] hello [/INST] Paris"), 2, 1, *sp.encode("[INST] France [/INST]")]
    assert tok.encode(text) == want
    assert tok.encode("hello Paris") == list(sp.encode("hello Paris"))  # no special token: as before
    assert tok.encode("hello", bos=True, eos=True) == [1, *sp.encode("hello"), 2]


# ---- the tiny instruct model: answers in its own format, without any flag ----------------------------------------
FRANCE = "What is the capital of France?"


@pytest.fixture(scope="module")
def instruct(tiny_instruct):
    return la.load_model(tiny_instruct, dtype=torch.float32)


def test_tiny_instruct_checkpoint(tiny_instruct, instruct):
    assert instruct.chat_template is not None and instruct.chat_template.source.startswith("{% for message")
    im_end = instruct.tokenizer.backend.token_to_id("<|im_end|>")
    assert instruct.config.eos_token_ids == [2] and instruct.tokenizer.eos_ids == [2, im_end]
    hf = _hf(tiny_instruct)
    conv = [{"role": "user", "content": FRANCE}]
    assert instruct.chat_template.render(conv, True) == _hf_render(hf, conv, True)


def test_python_api_answers_in_the_base_chat_template(instruct):
    assert chat(instruct, [{"role": "user", "content": FRANCE}], temperature=0.0) == "Paris"
    assert chat(instruct, [("system", "Answer briefly."), ("user", "What is the capital of Italy?")]) == "Rome"
    convo = [("user", FRANCE), ("assistant", "Paris"), ("user", "What is the capital of Spain?")]
    assert "".join(stream_chat(instruct, convo, temperature=0.0)) == "Madrid"
    assert chat(instruct, [("user", "Say nothing.")], temperature=0.0) == ""


def test_cli_generate_with_an_instruct_base(tiny_instruct, capsys):
    assert main(["generate", "--base", str(tiny_instruct), "--dtype", "float32", FRANCE]) == 0
    out = capsys.readouterr()
    assert out.out == "Paris\n" and out.err == ""
    assert main(["generate", "--base", str(tiny_instruct), "--dtype", "float32", "--no-stream", FRANCE]) == 0
    assert capsys.readouterr().out == "Paris\n"
    # the model ends its turn at once: a hint on stderr instead of a silent blank line
    assert main(["generate", "--base", str(tiny_instruct), "--dtype", "float32", "Say nothing."]) == 0
    out = capsys.readouterr()
    assert out.out == "\n" and "ended its turn without answering" in out.err and "\n" not in out.err.strip()
    assert main(["generate", "--base", str(tiny_instruct), "--template", "nope", FRANCE]) == 2
    assert "unknown template 'nope'" in capsys.readouterr().err


def test_cli_generate_template_chat_needs_a_chat_template(tiny_base, capsys):
    assert main(["generate", "--base", str(tiny_base), "--dtype", "float32", "--template", "chat", "hi"]) == 2
    assert "has none" in capsys.readouterr().err


def test_cli_chat_keeps_the_conversation_in_the_chat_template(tiny_instruct, monkeypatch, capsys):
    from llama_adapter.inference import generate as gen_module

    prompts: list[list[int]] = []
    real = gen_module.stream_generate

    def recording(model, prompts_, **kw):
        prompts.append(list(prompts_[0]))
        return real(model, prompts_, **kw)

    monkeypatch.setattr(gen_module, "stream_generate", recording)
    lines = [FRANCE, "What is the capital of Italy?", "/reset", "Say nothing.", "What is the capital of Spain?"]
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(lines) + "\n"))
    assert main(["chat", "--base", str(tiny_instruct), "--dtype", "float32", "--system", "Answer briefly."]) == 0
    out = capsys.readouterr()
    answers = [line.replace("[base] > ", "") for line in out.out.splitlines()]
    assert answers == ["Paris", "Rome", "", "Madrid", ""]  # /reset's prompt shares the empty answer's line; EOF
    assert out.err.count("ended its turn without answering") == 1
    tok = Tokenizer.from_file(Path(tiny_instruct) / "tokenizer.json")
    system = {"role": "system", "content": "Answer briefly."}
    second = [system, {"role": "user", "content": FRANCE}, {"role": "assistant", "content": "Paris"}]
    second.append({"role": "user", "content": "What is the capital of Italy?"})
    assert prompts[1] == tok.encode(chatml(second, add_generation_prompt=True))  # the history, no BOS added
    assert prompts[3] == tok.encode(
        chatml([system, {"role": "user", "content": "Say nothing."}, {"role": "assistant", "content": ""}])
        + chatml([{"role": "user", "content": "What is the capital of Spain?"}], add_generation_prompt=True)
    )


def test_a_named_chat_template_is_chosen_at_load_time(tiny_base: Path, tmp_path: Path, capsys) -> None:
    """`load_model(..., chat_template=NAME)` and `--chat-template NAME` pick one of several named templates."""
    d = tmp_path / "base"
    shutil.copytree(tiny_base, d)
    config = json.loads((d / "tokenizer_config.json").read_text())
    named = [{"name": "default", "template": CHATML}, {"name": "brief", "template": MISTRAL}]
    (d / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": named}))
    assert la.load_model(d).chat_template.source == CHATML
    assert la.load_model(d, chat_template="brief").chat_template.source == MISTRAL
    assert main(["generate", "--base", str(d), "--chat-template", "nope", "hi"]) == 2
    assert "no chat template named 'nope'" in capsys.readouterr().err
