"""Adapter files are read and checked whole before anything is registered: a bad file is an AdapterError (a one-line
CLI error), never a KeyError/TypeError/RuntimeError, and never a half-registered adapter."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import llama_adapter as la
from llama_adapter.adapter_file import check_adapter_name
from llama_adapter.cli import main
from llama_adapter.zero_init_attention import VisualProjection


@pytest.fixture(scope="module")
def model(tiny_base: Path) -> la.Transformer:
    return la.load_model(tiny_base, dtype=torch.float32)


@pytest.fixture()
def good(model: la.Transformer, tmp_path: Path) -> Path:
    torch.manual_seed(0)
    a = model.add_adapter("tmp", la.AdapterConfig(prompt_length=3, layers=2))
    with torch.no_grad():
        a.gates.normal_()
    path = la.save_adapter(model, "tmp", tmp_path / "good.safetensors")
    model.remove_adapter("tmp")
    return path


def _rewrite(src: Path, dst: Path, tensors: dict | None = None, meta: dict | None = None, drop: str = "") -> Path:
    """A copy of adapter file `src` with tensors/metadata replaced (None values delete a metadata key)."""
    with safe_open(str(src), framework="pt") as f:
        m = dict(f.metadata())
        t = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    t.update(tensors or {})
    for k, v in (meta or {}).items():
        if v is None:
            m.pop(k, None)
        else:
            m[k] = v
    t.pop(drop, None)
    save_file(t, str(dst), metadata=m)
    return dst


def _cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(list(args))
    return rc, out.getvalue(), err.getvalue()


def _bad_files(good: Path, tmp_path: Path, n_heads: int) -> dict[str, tuple[Path, str]]:
    """name -> (file, what the error says)."""
    with safe_open(str(good), framework="pt") as f:
        prompts, gates = f.get_tensor("prompts"), f.get_tensor("gates")
        cfg = json.loads(f.metadata()["adapter"])
    nan = prompts.clone()
    nan[0, 0, 0] = float("nan")
    return {
        # a base-dependent mismatch: the gates' head count (the file alone is consistent)
        "gates_heads": (_rewrite(good, tmp_path / "g.safetensors", {"gates": torch.zeros(2, n_heads + 1)}), "gates"),
        # internal inconsistencies, visible without a base
        "gates_layers": (_rewrite(good, tmp_path / "gl.safetensors", {"gates": torch.zeros(3, n_heads)}), "gates"),
        "no_base": (_rewrite(good, tmp_path / "nb.safetensors", meta={"base": None}), "metadata 'base' missing"),
        "no_cfg": (_rewrite(good, tmp_path / "nc.safetensors", meta={"adapter": None}), "metadata 'adapter' missing"),
        "bad_json": (_rewrite(good, tmp_path / "bj.safetensors", meta={"base": "{oops"}), "'base' is not JSON"),
        "unknown_key": (
            _rewrite(good, tmp_path / "uk.safetensors", meta={"adapter": json.dumps({**cfg, "rank": 4})}),
            "unknown adapter config key",
        ),
        "bad_value": (
            _rewrite(good, tmp_path / "bv.safetensors", meta={"adapter": json.dumps({**cfg, "gate": "relu"})}),
            "gate must be",
        ),
        "nan": (_rewrite(good, tmp_path / "nan.safetensors", {"prompts": nan}), "non-finite values in prompts"),
        "int": (_rewrite(good, tmp_path / "int.safetensors", {"gates": gates.to(torch.int32)}), "dtype torch.int32"),
        "visual_cfg": (
            _rewrite(good, tmp_path / "v.safetensors", {"visual_proj.fc1.weight": torch.zeros(2, 2)}),
            "metadata 'visual' missing",
        ),
        # a run directory given where its adapter file was meant
        "directory": (_run_dir(good, tmp_path / "run"), r"run: a directory, not a safetensors adapter file \(it holds"),
    }


def _run_dir(good: Path, run: Path) -> Path:
    run.mkdir(exist_ok=True)
    (run / "adapter.safetensors").write_bytes(good.read_bytes())
    return run


def test_bad_files_are_refused_before_registering(model: la.Transformer, good: Path, tmp_path: Path) -> None:
    model.add_adapter("keep", la.AdapterConfig(prompt_length=2, layers=1))
    before = {k: v for k, v in model.adapters.items()}
    for what, (path, msg) in _bad_files(good, tmp_path, model.config.n_heads).items():
        with pytest.raises(la.AdapterError, match=msg):
            model.load_adapter(path, "new")
        # the registry is exactly as it was: no half-registered adapter to serve
        assert dict(model.adapters.items()) == before, what
    # a correct load of the same name then works
    a = model.load_adapter(good, "new")
    assert model.adapters["new"] is a and a.gates.abs().sum() > 0
    model.remove_adapter("new")
    model.remove_adapter("keep")


def test_visual_projection_that_contradicts_its_config(model: la.Transformer, tmp_path: Path) -> None:
    a = model.add_adapter("mm", la.AdapterConfig(prompt_length=2, layers=1))
    a.visual_proj = VisualProjection(8, model.config.dim, hidden=4)
    path = la.save_adapter(model, "mm", tmp_path / "mm.safetensors")
    model.remove_adapter("mm")
    bad = _rewrite(path, tmp_path / "mm2.safetensors", {"visual_proj.fc1.weight": torch.zeros(5, 8)})
    with pytest.raises(la.AdapterError, match="visual projection does not match"):
        model.load_adapter(bad, "mm")
    assert "mm" not in model.adapters
    assert model.load_adapter(path, "mm").visual_proj is not None
    model.remove_adapter("mm")


def test_names() -> None:
    for ok in ("a", "alpaca-7B_v2", "x" * 64):
        assert check_adapter_name(ok) == ok
    for bad in ("x/y", " ", "", "x" * 300, "..", "a.b", "-a", "/abs", "a b", None, 3):
        with pytest.raises(la.AdapterError, match="not allowed"):
            check_adapter_name(bad)


def test_cli_one_line_errors(model: la.Transformer, good: Path, tmp_path: Path, tiny_base: Path) -> None:
    files = _bad_files(good, tmp_path, model.config.n_heads)
    # `info` has no base, but refuses every file that is inconsistent on its own
    for what in ("gates_layers", "no_base", "no_cfg", "unknown_key", "nan", "int", "visual_cfg"):
        path, msg = files[what]
        rc, out, err = _cli("info", str(path))
        assert rc == 2 and msg in err and len(err.strip().splitlines()) == 1, (what, err)
    assert _cli("info", str(good))[0] == 0
    for what in ("gates_heads", "nan"):
        path, msg = files[what]
        rc, _, err = _cli("generate", "--base", str(tiny_base), "--dtype", "fp32", "--adapter", str(path), "hi")
        assert rc == 2 and msg in err and len(err.strip().splitlines()) == 1, (what, err)
    dotted = _rewrite(good, tmp_path / "my.adapter.safetensors")
    rc, _, err = _cli("generate", "--base", str(tiny_base), "--adapter", str(dotted), "--max-new-tokens", "1", "hi")
    assert rc == 2 and "use NAME=FILE" in err
