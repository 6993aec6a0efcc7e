"""The built-in base: shipped, loadable through the ordinary loader, and rebuildable by the recipe."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import llama_adapter as la
from llama_adapter.builtin import builtin_base_dir, check_base_dir, pretrain
from llama_adapter.loading import resolve_base
from llama_adapter.model import Transformer


def test_builtin_resolves_and_is_small() -> None:
    d = builtin_base_dir()
    assert resolve_base("builtin") == d
    for f in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "README.md",
        "recipe.json",
    ):
        assert (d / f).is_file(), f
    total = sum(p.stat().st_size for p in d.iterdir() if p.is_file())
    assert total <= 20 * 1024 * 1024
    rec = json.loads((d / "recipe.json").read_text())
    assert rec["pretrain_time_s"] > 0 and rec["recipe"]["steps"] > 0


def test_missing_builtin_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(la.CheckpointError, match="built-in base model is missing"):
        check_base_dir(tmp_path / "base")


def test_builtin_loads_through_the_normal_loader() -> None:
    m = la.load_model("builtin", dtype=torch.float32)
    assert m.tokenizer is not None and m.config.model_type == "llama"
    assert m.config.eos_token_ids[0] == m.tokenizer.eos_id
    assert all(not p.requires_grad for p in m.parameters())
    ids = torch.tensor([m.tokenizer.encode("The capital of", bos=True)])
    logits = m(ids)
    assert logits.shape == (1, ids.shape[1], m.config.vocab_size) and torch.isfinite(logits).all()


def test_fresh_adapter_leaves_builtin_logits_exactly_equal() -> None:
    m = la.load_model("builtin", dtype=torch.float32)
    ids = torch.tensor([m.tokenizer.encode("### Instruction:\nWhat is 12 + 30?\n\n### Response:", bos=True)])
    with torch.no_grad():
        base = m(ids)
        m.add_adapter("fresh", la.AdapterConfig(prompt_length=10, layers=m.config.n_layers - 1))
        adapted = m(ids, adapter="fresh")
    assert torch.equal(base, adapted)


def test_builtin_knows_plain_facts() -> None:
    """The shipped base completes plain-text statements about held-out items (its knowledge)."""
    rec = json.loads((builtin_base_dir() / "recipe.json").read_text())
    assert rec["plain_text_probe_accuracy"]["all"] >= 0.5


def test_save_checkpoint_round_trips_through_the_loader(tmp_path: Path) -> None:
    cfg = pretrain.PretrainConfig(
        dim=32, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=64, vocab_size=300, tokenizer_docs=300
    )
    tok = pretrain.train_tokenizer(cfg)
    model = Transformer(cfg.model_config(tok.get_vocab_size()))
    pretrain.init_weights(model, 0)
    pretrain.save_checkpoint(model, tmp_path)
    pretrain.save_tokenizer(tok, tmp_path)
    loaded = la.load_model(tmp_path, dtype=torch.float32)
    ids = torch.tensor([loaded.tokenizer.encode("The capital of Varnel is 12", bos=True)])
    with torch.no_grad():
        assert torch.equal(model(ids), loaded(ids))
    assert loaded.tokenizer.encode("37") == [tok.token_to_id("3"), tok.token_to_id("7")]


def test_tiny_pretrain_writes_a_loadable_checkpoint(tmp_path: Path) -> None:
    cfg = pretrain.PretrainConfig(
        dim=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        hidden_dim=64,
        vocab_size=300,
        tokenizer_docs=300,
        steps=3,
        batch_size=4,
        seq_len=32,
        warmup_steps=1,
        log_every=1,
        threads=1,
    )  # tiny ops: one thread avoids OpenMP spin-waits
    lines: list[str] = []
    n_threads = torch.get_num_threads()
    try:
        rec = pretrain.pretrain(cfg, tmp_path / "base", log=lines.append)
    finally:
        torch.set_num_threads(n_threads)
    assert rec["tokens_seen"] == 3 * 4 * 32 and any("step 3/3" in s for s in lines)
    m = la.load_model(tmp_path / "base", dtype=torch.float32)
    assert m.config.n_layers == 2 and m.tokenizer is not None
    cfg_json = json.loads((tmp_path / "base" / "config.json").read_text())
    assert cfg_json["architectures"] == ["LlamaForCausalLM"]
    assert (tmp_path / "base" / "README.md").read_text().startswith("# The built-in base")


def test_recipe_file_matches_the_defaults() -> None:
    """recipes/builtin.yaml is the shipped model's recipe and parses into the dataclass."""
    cfg = pretrain.PretrainConfig.from_file(pretrain.DEFAULT_RECIPE)
    logging_only = {"log_every", "save_every", "extra"}
    default = pretrain.PretrainConfig()
    assert {k: v for k, v in cfg.__dict__.items() if k not in logging_only} == {
        k: v for k, v in default.__dict__.items() if k not in logging_only
    }
    shipped = json.loads((builtin_base_dir() / "recipe.json").read_text())["recipe"]
    assert {k: v for k, v in shipped.items() if k not in logging_only} == {
        k: v for k, v in cfg.__dict__.items() if k not in logging_only
    }


def test_pretrain_cli_rejects_unknown_recipe_keys(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from llama_adapter.cli import main

    bad = tmp_path / "r.yaml"
    bad.write_text("model:\n  dim: 32\n  bogus: 1\n")
    assert main(["pretrain", "--out", str(tmp_path / "o"), "--config", str(bad)]) == 2
    assert "bogus" in capsys.readouterr().err


def test_demo_command_runs_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """`llama-adapter demo` with a handful of steps: prints before/after and writes adapter + plot."""
    from llama_adapter.cli import main

    assert main(["demo", "--out", str(tmp_path / "demo"), "--steps", "3", "--threads", "2"]) == 0
    out = capsys.readouterr().out
    assert "held-out exact match" in out and "trainable parameters" in out and "adapter file" in out
    for f in ("adapter.safetensors", "loss.png", "demo_result.json"):
        assert (tmp_path / "demo" / f).is_file()
    res = json.loads((tmp_path / "demo" / "demo_result.json").read_text())
    assert res["before"] <= 0.2  # the base does not follow the instructions
    adapter_meta, tensors = la.read_adapter(tmp_path / "demo" / "adapter.safetensors")
    assert sum(t.numel() for t in tensors.values()) == res["n_trainable"]
    # a second run into the same directory replaces the first (finetune alone would refuse: not the demo's job)
    assert main(["demo", "--out", str(tmp_path / "demo"), "--steps", "2", "--threads", "2", "--no-progress"]) == 0
    assert json.loads((tmp_path / "demo" / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 2


def test_builtin_adapter_recipe_is_the_demos() -> None:
    """recipes/builtin-adapter.yaml (the README's `finetune` example on the built-in base) = the demo's recipe."""
    import yaml

    from llama_adapter.builtin.demo import DEMO_TRAIN_PER_TASK, demo_train_config
    from llama_adapter.training.config import TrainConfig

    root = Path(__file__).resolve().parents[1]
    recipe = TrainConfig.from_dict(yaml.safe_load((root / "recipes" / "builtin-adapter.yaml").read_text()))
    demo = demo_train_config("runs/demo", 5 * DEMO_TRAIN_PER_TASK, la.load_config("builtin")[0].n_layers)
    free = {"out", "data", "progress", "overwrite", "epochs", "warmup_epochs"}  # where each run goes; floats below
    assert {k: v for k, v in vars(recipe).items() if k not in free} == {
        k: v for k, v in vars(demo).items() if k not in free
    }
    assert recipe.epochs == pytest.approx(demo.epochs) and recipe.warmup_epochs == pytest.approx(demo.warmup_epochs)
