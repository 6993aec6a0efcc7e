"""Import adapters made by other tools into our safetensors format.

Supported sources (all map onto the same math: prompts without RoPE, separate softmax, per-head gate):
- official LLaMA-Adapter v1 `.pth`: `adapter_query.weight` [K*L, dim] (row block l -> layer N-L+l) and
  `layers.{i}.attention.gate` [1] or [1, n_heads, 1, 1]; whether the gate went through tanh is the caller's call.
- PEFT adaption-prompt directory: `adapter_config.json` + `adapter_model.safetensors` (or `.bin`) with
  `...layers.{i}.self_attn.adaption_prompt` [1, K, dim] and `adaption_gate` [1]; linear gate.
- litgpt `lit_model.pth.adapter`: `transformer.h.{i}.attn.adapter_wte.weight` [K, dim] and `gating_factor`
  [1, 1, n_heads, 1] or [1, n_heads, 1, 1]; linear gate.
Foreign `.pth` files are read with `weights_only=True`: never unpickle code.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor

from llama_adapter.adapter_file import save_adapter
from llama_adapter.config import ModelConfig
from llama_adapter.errors import AdapterError
from llama_adapter.model import Transformer
from llama_adapter.zero_init_attention import Adapter, AdapterConfig

FORMATS = ("official", "peft", "litgpt")


def detect_format(src: Path) -> str:
    if src.is_dir():
        if (src / "adapter_config.json").is_file():
            return "peft"
        raise AdapterError(f"{src}: a directory without adapter_config.json is not a PEFT adapter")
    keys = _load_pth(src).keys()
    if any(k.endswith("adapter_query.weight") for k in keys):
        return "official"
    if any(".attn.adapter_wte.weight" in k for k in keys):
        return "litgpt"
    raise AdapterError(f"{src}: not an official LLaMA-Adapter, PEFT or litgpt adapter (no known tensor names)")


def _load_pth(src: Path) -> dict[str, Tensor]:
    if not src.is_file():
        raise AdapterError(f"{src}: file not found")
    try:
        sd = torch.load(src, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- any unpickling failure means an unusable file
        raise AdapterError(f"{src}: cannot load with weights_only=True ({type(e).__name__}: {e})") from None
    if isinstance(sd, dict) and "model" in sd and isinstance(sd["model"], dict):
        sd = sd["model"]
    if not isinstance(sd, dict):
        raise AdapterError(f"{src}: expected a state dict")
    return {k.removeprefix("module."): v for k, v in sd.items() if isinstance(v, Tensor)}


def _per_head(g: Tensor, n_heads: int, src: Path, key: str) -> Tensor:
    g = g.float().flatten()
    if g.numel() == 1:
        return g.expand(n_heads).clone()
    if g.numel() != n_heads:
        raise AdapterError(f"{src}: {key} has {g.numel()} values, the base has {n_heads} heads")
    return g


def convert(
    src: str | Path,
    dst: str | Path,
    base: ModelConfig,
    fmt: str | None = None,
    gate: str | None = None,
    template: str = "alpaca",
) -> Path:
    """Convert `src` into our adapter file `dst` for a base of configuration `base`."""
    src = Path(src)
    fmt = fmt or detect_format(src)
    N, H, D = base.n_layers, base.n_heads, base.dim
    layer_gates: dict[int, Tensor] = {}
    layer_prompts: dict[int, Tensor] = {}
    if fmt == "official":
        if gate not in ("tanh", "linear"):
            raise AdapterError(
                "official LLaMA-Adapter checkpoints need --gate tanh or --gate linear "
                "(v1 release code applies tanh; the paper's eq. 7 does not)"
            )
        sd = _load_pth(src)
        q = next((v for k, v in sd.items() if k.endswith("adapter_query.weight")), None)
        gates = {int(m.group(1)): v for k, v in sd.items() if (m := re.search(r"layers\.(\d+)\.attention\.gate$", k))}
        if q is None or not gates:
            raise AdapterError(f"{src}: needs adapter_query.weight and layers.*.attention.gate")
        L = len(gates)
        if q.shape[1] != D or q.shape[0] % L:
            raise AdapterError(f"{src}: adapter_query {tuple(q.shape)} does not fit {L} layers of dim {D}")
        K = q.shape[0] // L
        for i, g in gates.items():
            layer_gates[i] = _per_head(g, H, src, f"layers.{i}.attention.gate")
        for j in range(L):
            layer_prompts[N - L + j] = q[j * K : (j + 1) * K]
    elif fmt == "peft":
        conf_path = src / "adapter_config.json"
        conf = json.loads(conf_path.read_text())
        if conf.get("peft_type") not in (None, "ADAPTION_PROMPT"):
            raise AdapterError(f"{conf_path}: peft_type {conf.get('peft_type')!r} is not ADAPTION_PROMPT")
        st, binf = src / "adapter_model.safetensors", src / "adapter_model.bin"
        sd = load_file(str(st)) if st.is_file() else _load_pth(binf)
        gate = "linear"
        for k, v in sd.items():
            if m := re.search(r"layers\.(\d+)\.self_attn\.adaption_prompt$", k):
                layer_prompts[int(m.group(1))] = v.reshape(-1, v.shape[-1])
            elif m := re.search(r"layers\.(\d+)\.self_attn\.adaption_gate$", k):
                layer_gates[int(m.group(1))] = _per_head(v, H, src, k)
        if int(conf.get("adapter_layers", len(layer_prompts))) != len(layer_prompts):
            raise AdapterError(
                f"{conf_path}: adapter_layers={conf.get('adapter_layers')} but {len(layer_prompts)} layers have prompts"
            )
    elif fmt == "litgpt":
        sd = _load_pth(src)
        gate = "linear"
        for k, v in sd.items():
            if m := re.search(r"\.h\.(\d+)\.attn\.adapter_wte\.weight$", k):
                layer_prompts[int(m.group(1))] = v
            elif m := re.search(r"\.h\.(\d+)\.attn\.gating_factor$", k):
                layer_gates[int(m.group(1))] = _per_head(v, H, src, k)
    else:
        raise AdapterError(f"unknown format {fmt!r} (one of {', '.join(FORMATS)})")

    layers = sorted(layer_prompts)
    if not layers or sorted(layer_gates) != layers:
        raise AdapterError(f"{src}: prompts for layers {layers} but gates for {sorted(layer_gates)}")
    L = len(layers)
    if layers != list(range(N - L, N)):
        raise AdapterError(
            f"{src}: adapted layers {layers[0]}..{layers[-1]} are not the top {L} of a "
            f"{N}-layer base (does --base match the adapter?)"
        )
    Ks = {p.shape[0] for p in layer_prompts.values()}
    dims = {p.shape[1] for p in layer_prompts.values()}
    if len(Ks) != 1 or dims != {D}:
        raise AdapterError(
            f"{src}: prompt shapes {sorted({tuple(p.shape) for p in layer_prompts.values()})} do not fit dim {D}"
        )
    cfg = AdapterConfig(prompt_length=Ks.pop(), layers=L, gate=gate)  # type: ignore[arg-type]
    with torch.device("meta"):
        shell = Transformer(base)
    adapter = Adapter(cfg, N, D, H, device="cpu")
    with torch.no_grad():
        adapter.prompts.copy_(torch.stack([layer_prompts[i].float() for i in layers]))
        adapter.gates.copy_(torch.stack([layer_gates[i] for i in layers]))
    adapter.meta = {"template": template, "converted_from": f"{fmt}:{src.name}"}
    shell.adapters["converted"] = adapter
    return save_adapter(shell, "converted", dst)
