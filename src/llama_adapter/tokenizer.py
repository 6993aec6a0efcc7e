"""One interface over `tokenizer.json` (tokenizers) and `tokenizer.model` (sentencepiece).

Special tokens are never added implicitly: callers say `bos=True` / `eos=True`, so training and inference
build exactly the sequences they mean. Special tokens written in the text (`<s>`, `<|im_start|>`: a chat template
writes them) are encoded as their ids, as `transformers` does, for both kinds of tokenizer. BOS/EOS/pad ids come
from the checkpoint's files; the EOS ids are every id that ends a turn: config.json's and generation_config.json's
`eos_token_id`s and tokenizer_config.json's `eos_token` (an instruct model's end of turn, e.g. `<|im_end|>`, is
often only there).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from llama_adapter.config import ModelConfig
from llama_adapter.errors import CheckpointError


class Tokenizer:
    def __init__(
        self,
        backend: Any,
        kind: str,
        bos_id: int | None,
        eos_ids: list[int],
        pad_id: int | None,
        path: Path,
        special_pieces: dict[str, int] | None = None,
    ) -> None:
        self.backend, self.kind, self.path = backend, kind, path
        self.bos_id, self.eos_ids = bos_id, eos_ids
        self.pad_id = pad_id if pad_id is not None else (eos_ids[0] if eos_ids else 0)
        # sentencepiece: control pieces (<s>, </s>, <unk>) that text may spell out; sentencepiece itself reads
        # them as plain characters (tokenizers' added tokens need nothing: the library splits them out itself)
        self.special_pieces = dict(special_pieces or {})
        self._special_re = (
            re.compile("|".join(re.escape(p) for p in sorted(self.special_pieces, key=len, reverse=True)))
            if self.special_pieces
            else None
        )

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
            ids = self._sp_encode(text)
        else:
            ids = list(self.backend.encode(text, add_special_tokens=False).ids)
        if bos and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        if eos:
            ids = [*ids, self.eos_id]
        return ids

    def _sp_encode(self, text: str) -> list[int]:
        """sentencepiece ids, with the special pieces spelled out in `text` as their ids (between them, each
        stretch of text is encoded on its own, as `transformers`' sentencepiece tokenizers do)."""
        if self._special_re is None or not self._special_re.search(text):
            return list(self.backend.encode(text))
        ids: list[int] = []
        start = 0
        for m in self._special_re.finditer(text):
            if m.start() > start:
                ids += self.backend.encode(text[start : m.start()])
            ids.append(self.special_pieces[m.group()])
            start = m.end()
        if start < len(text):
            ids += self.backend.encode(text[start:])
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
        conf = _tokenizer_config(path.parent / "tokenizer_config.json")
        if path.suffix == ".model":
            import sentencepiece as spm

            sp = spm.SentencePieceProcessor()
            try:
                sp.load(str(path))
            except Exception as e:  # noqa: BLE001 -- sentencepiece raises bare OSError/RuntimeError
                raise CheckpointError(f"{path}: not a sentencepiece model ({e})") from None

            def sp_id(token: str) -> int | None:
                i = int(sp.piece_to_id(token))
                return i if 0 <= i < sp.get_piece_size() and sp.id_to_piece(i) == token else None

            specials = {
                sp.id_to_piece(i): i for i in range(sp.get_piece_size()) if sp.is_control(i) or sp.is_unknown(i)
            }
            bos = bos if bos is not None else _token_id(conf, "bos_token", sp_id)
            bos = bos if bos is not None else (sp.bos_id() if sp.bos_id() >= 0 else None)
            eos = _with(eos or ([sp.eos_id()] if sp.eos_id() >= 0 else []), _token_id(conf, "eos_token", sp_id))
            pad = pad if pad is not None else (sp.pad_id() if sp.pad_id() >= 0 else None)
            return cls(sp, "sentencepiece", bos, eos, pad, path, {p: i for p, i in specials.items() if p})
        from tokenizers import Tokenizer as HFTokenizer

        try:
            tok = HFTokenizer.from_file(str(path))
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"{path}: not a tokenizers JSON file ({e})") from None
        bos = bos if bos is not None else _token_id(conf, "bos_token", tok.token_to_id)
        eos = _with(eos, _token_id(conf, "eos_token", tok.token_to_id))
        pad = pad if pad is not None else _token_id(conf, "pad_token", tok.token_to_id)
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


def _tokenizer_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        conf = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    return conf if isinstance(conf, dict) else {}


def _token_id(conf: dict[str, Any], key: str, lookup: Any) -> int | None:
    """The id of tokenizer_config.json's `key` token (a string, or {"content": ...}); None if absent or unknown."""
    t = conf.get(key)
    t = t.get("content") if isinstance(t, dict) else t
    return lookup(t) if isinstance(t, str) else None


def _with(ids: list[int], extra: int | None) -> list[int]:
    """`ids`, then `extra` if it is an id not already there (the first id stays the EOS that training appends)."""
    return ids if extra is None or extra in ids else [*ids, extra]
