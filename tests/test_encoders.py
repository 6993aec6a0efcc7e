"""Zero-init attention on Hugging Face encoders (ViT, RoBERTa/BERT, CLIP), as a specification.

- At initialisation the adapted encoder IS the unmodified `transformers` model, bit for bit (torch.equal, fp32).
- The prompt term is the paper's equation: each token attends to the layer's prompts (through its frozen k/v)
  with its own softmax, scaled per head by the gate; rand-init is one joint softmax over [prompts; tokens].
- Gradients reach only the prompts, the gates and the head; at init the prompts' gradient is exactly zero
  (the gate is closed) while the gates' is not -- that is how zero-init attention starts learning.
Tiny random configs are built here; everything runs in a few seconds on one CPU thread.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    BertConfig,
    BertModel,
    CLIPConfig,
    CLIPModel,
    RobertaConfig,
    RobertaModel,
    ViTConfig,
    ViTForImageClassification,
    ViTModel,
)

from llama_adapter.encoders.heads import TaskModel, configure, qa_spans  # noqa: E402
from llama_adapter.encoders.prompts import PromptConfig, attach_prompts, attention_sites  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
H, LAYERS, HEADS = 32, 3, 4


def vit_config(**kw: object) -> ViTConfig:
    return ViTConfig(
        hidden_size=H,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=64,
        image_size=16,
        patch_size=4,
        **kw,
    )


def roberta_config(vocab: int = 60) -> RobertaConfig:
    return RobertaConfig(
        vocab_size=vocab,
        hidden_size=H,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=64,
        max_position_embeddings=70,
        pad_token_id=0,
    )


def clip_config(vocab: int = 60) -> CLIPConfig:
    tower = dict(hidden_size=H, num_hidden_layers=2, num_attention_heads=HEADS, intermediate_size=64)
    return CLIPConfig(
        text_config=dict(
            tower, vocab_size=vocab, max_position_embeddings=16, pad_token_id=0, bos_token_id=2, eos_token_id=3
        ),
        vision_config=dict(tower, num_hidden_layers=3, image_size=16, patch_size=4),
        projection_dim=16,
    )


def text_batch(vocab: int = 60) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, vocab, (3, 11), generator=g)
    ids[:, 0], ids[:, -1] = 2, 3
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # a padded row
    ids[1, 6], ids[1, 7:] = 3, 0
    return ids, mask


PIXELS = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))


# ---- 1. bit-exact parity at initialisation ---------------------------------------------------------------------
@pytest.mark.parametrize("gate", ["tanh", "linear"])
def test_vit_equals_unmodified_model_at_init(gate: str) -> None:
    torch.manual_seed(0)
    model = ViTModel(vit_config()).eval()
    ref = model(pixel_values=PIXELS)
    attach_prompts(model, PromptConfig(prompt_length=5, layers=2, gate=gate), H)  # type: ignore[arg-type]
    out = model(pixel_values=PIXELS)
    assert torch.equal(out.last_hidden_state, ref.last_hidden_state)
    assert torch.equal(out.pooler_output, ref.pooler_output)


def test_vit_classifier_checkpoint_equals_unmodified_at_init() -> None:
    torch.manual_seed(0)
    model = ViTForImageClassification(vit_config(num_labels=3)).eval()
    ref = model(pixel_values=PIXELS).logits
    TaskModel(model, "image-classification", "zero-init", 3, PromptConfig(4, 3))
    assert torch.equal(model(pixel_values=PIXELS).logits, ref)


@pytest.mark.parametrize("family", ["roberta", "bert"])
def test_text_encoder_equals_unmodified_model_at_init(family: str) -> None:
    torch.manual_seed(0)
    model = (
        RobertaModel(roberta_config()) if family == "roberta" else BertModel(BertConfig(**roberta_config().to_dict()))
    )
    model.eval()
    ids, mask = text_batch()
    ref = model(input_ids=ids, attention_mask=mask).last_hidden_state
    task = TaskModel(model, "question-answering", "zero-init", prompt_cfg=PromptConfig(6, LAYERS))
    with task.prompts["encoder"].padding(mask):
        out = model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.equal(out, ref)


def test_clip_both_towers_equal_unmodified_model_at_init() -> None:
    torch.manual_seed(0)
    model = CLIPModel(clip_config()).eval()
    ids, mask = text_batch()
    ref = model(input_ids=ids, attention_mask=mask, pixel_values=PIXELS)
    task = TaskModel(model, "clip", "zero-init", prompt_cfg=PromptConfig(4, 3))
    assert set(task.prompts) == {"vision", "text"}
    assert task.prompts["text"].cfg.layers == 2  # capped at the shallower text tower
    out = model(input_ids=ids, attention_mask=mask, pixel_values=PIXELS)
    for k in ("logits_per_image", "text_embeds", "image_embeds"):
        assert torch.equal(getattr(out, k), getattr(ref, k)), k
    # and the task model's own logits are CLIP's logits
    assert torch.equal(task(pixel_values=PIXELS, class_ids=ids, class_mask=mask), ref.logits_per_image)


def test_open_gate_changes_outputs_and_removing_restores_them() -> None:
    """Not a test that cannot fail: the parity above holds because the gate is zero, not because prompts are off."""
    torch.manual_seed(0)
    model = ViTModel(vit_config()).eval()
    ref = model(pixel_values=PIXELS).last_hidden_state
    p = attach_prompts(model, PromptConfig(4, 2), H)
    assert p.gates is not None
    with torch.no_grad():
        p.gates[1, 2] = 0.5
    assert not torch.allclose(model(pixel_values=PIXELS).last_hidden_state, ref)
    p.remove()
    assert torch.equal(model(pixel_values=PIXELS).last_hidden_state, ref)


# ---- 2. the equations, transcribed naively ---------------------------------------------------------------------
def naive_attention(h: torch.Tensor, site: object, prompts: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor:
    """One layer's attention output for tokens h [B, T, D], written from the paper (eq. 2-8), loops over heads.

    zero-init (gate given): softmax(q K_t^T/sqrt(d)) V_t + g * softmax(q K_p^T/sqrt(d)) V_p.
    rand-init (gate None):  softmax(q [K_p; K_t]^T/sqrt(d)) [V_p; V_t].
    """
    q_l, k_l, v_l, o_l = site.q, site.k, site.v, site.out  # type: ignore[attr-defined]
    nh, d = site.n_heads, site.head_dim  # type: ignore[attr-defined]
    q, k, v = q_l(h), k_l(h), v_l(h)
    kp, vp = k_l(prompts), v_l(prompts)
    heads = []
    for i in range(nh):
        s = slice(i * d, (i + 1) * d)
        qi = q[..., s]
        if gate is None:
            kk = torch.cat([kp[None, :, s].expand(h.shape[0], -1, -1), k[..., s]], 1)
            vv = torch.cat([vp[None, :, s].expand(h.shape[0], -1, -1), v[..., s]], 1)
            heads.append(torch.softmax(qi @ kk.transpose(1, 2) / math.sqrt(d), -1) @ vv)
        else:
            tok = torch.softmax(qi @ k[..., s].transpose(1, 2) / math.sqrt(d), -1) @ v[..., s]
            pr = torch.softmax(qi @ kp[:, s].T / math.sqrt(d), -1) @ vp[:, s]
            heads.append(tok + gate[i] * pr)
    return o_l(torch.cat(heads, -1))


@pytest.mark.parametrize("init", ["zero", "random"])
def test_adapted_vit_attention_is_the_papers_equation(init: str) -> None:
    torch.manual_seed(0)
    model = ViTModel(vit_config()).eval()
    p = attach_prompts(model, PromptConfig(5, 1, "tanh", init), H)
    if p.gates is not None:
        with torch.no_grad():
            p.gates.copy_(torch.tensor([[0.3, -0.7, 1.2, 0.0]]))
    layer = model.layers[-1]
    h = layer.layernorm_before(torch.randn(2, 17, H))
    got = layer.attention(h)[0]
    gate = None if p.gates is None else torch.tanh(p.gates[0])
    p.remove()  # the naive transcription calls the projections itself, unhooked
    want = naive_attention(h, p.sites[0], p.prompts[0], gate)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_rand_init_joint_softmax_respects_padding() -> None:
    """The baseline's joint softmax must not let tokens attend to padding (the mask `transformers` would use)."""
    torch.manual_seed(0)
    model = RobertaModel(roberta_config()).eval()
    p = attach_prompts(model, PromptConfig(3, 1, "tanh", "random"), H)
    ids, mask = text_batch()
    with p.padding(mask):
        out = model(input_ids=ids, attention_mask=mask).last_hidden_state
    ids2 = ids.clone()
    ids2[1, 7:] = 9  # change only padded tokens
    with p.padding(mask):
        out2 = model(input_ids=ids2, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(out[1, :7], out2[1, :7])
    # and rand-init is NOT the identity at init: the paper's point about disturbing the pretrained model
    ref_model = RobertaModel(roberta_config()).eval()
    ref_model.load_state_dict(model.state_dict())
    assert not torch.allclose(ref_model(input_ids=ids, attention_mask=mask).last_hidden_state, out)


def test_clip_text_tower_rand_init_is_causal_among_tokens() -> None:
    torch.manual_seed(0)
    model = CLIPModel(clip_config()).eval()
    p = attach_prompts(model.text_model, PromptConfig(3, 2, "tanh", "random"), H, causal=True)
    ids, mask = text_batch()
    full = torch.ones_like(mask)
    with p.padding(full):
        a = model.text_model(input_ids=ids, attention_mask=full).last_hidden_state
    ids2 = ids.clone()
    ids2[:, 8] = 7  # a later token must not change earlier positions
    with p.padding(full):
        b = model.text_model(input_ids=ids2, attention_mask=full).last_hidden_state
    torch.testing.assert_close(a[:, :8], b[:, :8])
    assert not torch.allclose(a[:, 8:], b[:, 8:])


def test_sites_cover_every_family() -> None:
    assert len(attention_sites(ViTModel(vit_config()))) == LAYERS
    assert len(attention_sites(RobertaModel(roberta_config()))) == LAYERS
    clip = CLIPModel(clip_config())
    assert len(attention_sites(clip.vision_model)) == 3 and len(attention_sites(clip.text_model)) == 2
    with pytest.raises(TypeError, match="no encoder layers"):
        attention_sites(nn.Linear(2, 2))


# ---- 3. what trains ---------------------------------------------------------------------------------------
def _grads(task: TaskModel, batch: dict[str, torch.Tensor], target: torch.Tensor) -> dict[str, torch.Tensor | None]:
    task.train()
    logits = task(**batch)
    loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target)
    loss.backward()
    return {n: p.grad for n, p in task.named_parameters()}


def test_gradients_reach_only_prompts_gates_and_head() -> None:
    torch.manual_seed(0)
    task = TaskModel(ViTModel(vit_config()), "image-classification", "zero-init", 3, PromptConfig(4, 2))
    grads = _grads(task, {"pixel_values": PIXELS}, torch.tensor([0, 2]))
    trained = {n for n, g in grads.items() if g is not None}
    assert trained == {
        "prompts.encoder.prompts",
        "prompts.encoder.gates",
        "head.weight",
        "head.bias",
    }
    # the gate is closed at init: no gradient into the prompts yet, but into the gates
    assert torch.count_nonzero(grads["prompts.encoder.gates"]) > 0  # type: ignore[arg-type]
    assert torch.count_nonzero(grads["prompts.encoder.prompts"]) == 0  # type: ignore[arg-type]


def test_rand_init_prompts_get_gradients_at_once_and_have_no_gate() -> None:
    torch.manual_seed(0)
    task = TaskModel(ViTModel(vit_config()), "image-classification", "rand-init", 3, PromptConfig(4, 2))
    grads = _grads(task, {"pixel_values": PIXELS}, torch.tensor([0, 2]))
    assert {n for n, g in grads.items() if g is not None} == {"prompts.encoder.prompts", "head.weight", "head.bias"}
    assert torch.count_nonzero(grads["prompts.encoder.prompts"]) > 0  # type: ignore[arg-type]


def test_methods_train_what_they_say() -> None:
    torch.manual_seed(0)
    lp = TaskModel(CLIPModel(clip_config()), "clip", "linear-probe")
    assert set(lp.trainable()) == {
        "encoder.visual_projection.weight",
        "encoder.text_projection.weight",
        "encoder.logit_scale",
    }
    full = TaskModel(RobertaModel(roberta_config()), "text-classification", "full", 2)
    assert all(p.requires_grad for p in full.parameters()) and not full.prompts
    zi = TaskModel(CLIPModel(clip_config()), "clip", "zero-init", prompt_cfg=PromptConfig(4, 2))
    assert {n.split(".")[1] for n in zi.trainable() if n.startswith("prompts.")} == {"vision", "text"}
    assert zi.n_trainable() == 2 * (2 * 4 * H + 2 * HEADS) + H * 16 * 2 + 1
    configure(zi)  # idempotent
    assert not zi.encoder.vision_model.embeddings.patch_embedding.weight.requires_grad


def test_one_implementation_of_the_equations(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every family goes through the method module's ZeroInitAttention, once per adapted layer per forward."""
    from llama_adapter.encoders import prompts
    from llama_adapter.zero_init_attention import ZeroInitAttention

    assert isinstance(prompts.EQUATIONS, ZeroInitAttention)
    calls: list[int] = []
    real = prompts.EQUATIONS.gated_prompt_attention
    monkeypatch.setattr(prompts.EQUATIONS, "gated_prompt_attention", lambda q, p: calls.append(1) or real(q, p))
    task = TaskModel(CLIPModel(clip_config()), "clip", "zero-init", prompt_cfg=PromptConfig(4, 2))
    ids, mask = text_batch()
    task(pixel_values=PIXELS, class_ids=ids, class_mask=mask)
    assert len(calls) == 2 + 2  # two adapted layers in each tower


# ---- 4. heads -----------------------------------------------------------------------------------------------
def test_qa_span_decoding_and_no_answer() -> None:
    start = torch.tensor([2.0, 0.0, 5.0, 1.0, 0.0, 9.0])
    end = torch.tensor([2.0, 0.0, 1.0, 6.0, 0.0, 0.0])
    s, e, best, null = qa_spans(start, end, 2, 6, max_answer_tokens=3)
    assert (s, e, best, null) == (2, 3, 11.0, 4.0)  # 5 + 6; no span may end before it starts; null = 2 + 2
    s, e, _, _ = qa_spans(start, end, 2, 6, max_answer_tokens=1)
    assert (s, e) == (5, 5)  # spans of one token only
