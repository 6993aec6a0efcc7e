"""One interface over `tokenizer.json` (tokenizers) and `tokenizer.model` (sentencepiece).

Special tokens are never added implicitly: callers say `bos=True` / `eos=True`, so training and inference
build exactly the sequences they mean. BOS/EOS/pad ids come from the checkpoint's files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from llama_adapter.config import ModelConfig
from llama_adapter.errors import CheckpointError


class Tokenizer:
    def __init__(
        self, backend: Any, kind: str, bos_id: int | None, eos_ids: list[int], pad_id: int | None, path: Path
    ) -> None:
        self.backend, self.kind, self.path = backend, kind, path
        self.bos_id, self.eos_ids = bos_id, eos_ids
        self.pad_id = pad_id if pad_id is not None else (eos_ids[0] if eos_ids else 0)

    @property
    def eos_id(self) -> int:
        return self.eos_ids[0]

    @property
    def vocab_size(self) -> int:
        if self.kind == "sentencepiece":
            return int(self.backend.get_piece_size())
        return int(self.backend.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        if self.kind == "sentencepiece":
            ids = list(self.backend.encode(text))
        else:
            ids = list(self.backend.encode(text, add_special_tokens=False).ids)
        if bos and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        if eos:
            ids = [*ids, self.eos_id]
        return ids

    def decode(self, ids: list[int]) -> str:
        ids = [int(i) for i in ids]
        if self.kind == "sentencepiece":
            return str(self.backend.decode(ids))
        return str(self.backend.decode(ids, skip_special_tokens=True))

    @classmethod
    def from_file(cls, path: str | Path, cfg: ModelConfig | None = None) -> Tokenizer:
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"{path}: tokenizer file not found")
        bos = cfg.bos_token_id if cfg else None
        eos = list(cfg.eos_token_ids) if cfg else []
        pad = cfg.pad_token_id if cfg else None
        if path.suffix == ".model":
            import sentencepiece as spm

            sp = spm.SentencePieceProcessor()
            try:
                sp.load(str(path))
            except Exception as e:  # noqa: BLE001 -- sentencepiece raises bare OSError/RuntimeError
                raise CheckpointError(f"{path}: not a sentencepiece model ({e})") from None
            bos = bos if bos is not None else (sp.bos_id() if sp.bos_id() >= 0 else None)
            eos = eos or ([sp.eos_id()] if sp.eos_id() >= 0 else [])
            pad = pad if pad is not None else (sp.pad_id() if sp.pad_id() >= 0 else None)
            return cls(sp, "sentencepiece", bos, eos, pad, path)
        from tokenizers import Tokenizer as HFTokenizer

        try:
            tok = HFTokenizer.from_file(str(path))
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"{path}: not a tokenizers JSON file ({e})") from None
        tc = path.parent / "tokenizer_config.json"
        if tc.is_file():
            conf = json.loads(tc.read_text())

            def tid(key: str) -> int | None:
                t = conf.get(key)
                t = t.get("content") if isinstance(t, dict) else t
                return tok.token_to_id(t) if isinstance(t, str) else None

            bos = bos if bos is not None else tid("bos_token")
            eos_id = tid("eos_token")
            eos = eos or ([eos_id] if eos_id is not None else [])
            pad = pad if pad is not None else tid("pad_token")
        if not eos:
            raise CheckpointError(f"{path}: no EOS token id in config.json or tokenizer_config.json")
        return cls(tok, "tokenizers", bos, eos, pad, path)

    @classmethod
    def from_dir(cls, path: str | Path, cfg: ModelConfig | None = None) -> Tokenizer:
        found = find_tokenizer(path)
        if found is None:
            raise CheckpointError(f"{path}: no tokenizer.json or tokenizer.model found")
        return cls.from_file(found, cfg)


def find_tokenizer(path: str | Path) -> Path | None:
    path = Path(path)
    for d in (path, path.parent):  # Meta checkpoints keep tokenizer.model one level up
        for name in ("tokenizer.json", "tokenizer.model"):
            if (d / name).is_file():
                return d / name
    return None
