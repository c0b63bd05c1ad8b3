"""Tokenizer: HF ``tokenizers`` from tokenizer.json (sentencepiece where only tokenizer.model exists),
the model's BOS/EOS ids, and incremental detokenization that is right for multi-byte characters."""

from __future__ import annotations

import json
from pathlib import Path

from kiln.errors import EngineError


class Tokenizer:
    def __init__(self, path: str | Path, eos_token_ids: tuple[int, ...] = (), bos_token_id: int | None = None):
        path = Path(path)
        self.path = path
        cfg_file = path / "tokenizer_config.json"
        self.config = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
        if (path / "tokenizer.json").is_file():
            from tokenizers import Tokenizer as HFTokenizer

            self._tok = HFTokenizer.from_file(str(path / "tokenizer.json"))
            self._sp = None
            self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        elif (path / "tokenizer.model").is_file():
            try:
                import sentencepiece
            except ImportError as e:
                raise EngineError(f"{path}: only tokenizer.model is present; pip install sentencepiece") from e
            self._tok = None
            self._sp = sentencepiece.SentencePieceProcessor(model_file=str(path / "tokenizer.model"))
            self.vocab_size = self._sp.get_piece_size()
        else:
            raise EngineError(f"{path}: no tokenizer.json or tokenizer.model")
        self.eos_token_ids = tuple(eos_token_ids)
        self.bos_token_id = bos_token_id
        self.chat_template = self._chat_template()

    def _chat_template(self) -> str | None:
        template_file = self.path / "chat_template.jinja"
        if template_file.is_file():
            return template_file.read_text()
        template = self.config.get("chat_template")
        if isinstance(template, list):  # [{"name": ..., "template": ...}]
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        return template

    def token_str(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id) if self._tok else self._sp.id_to_piece(token_id)

    @property
    def special_token_ids(self) -> set[int]:
        ids = set(self.eos_token_ids)
        if self.bos_token_id is not None:
            ids.add(self.bos_token_id)
        if self._tok is not None:
            ids.update(i for i, tok in self._tok.get_added_tokens_decoder().items() if tok.special)
        else:
            ids.update(i for i in range(self.vocab_size) if self._sp.is_control(i) or self._sp.is_unknown(i))
        return ids

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if self._tok is not None:
            return self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        ids = self._sp.encode(text)
        if add_special_tokens and self.config.get("add_bos_token", True) and self.bos_token_id is not None:
            ids = [self.bos_token_id] + ids
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        if self._tok is not None:
            return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)
        if skip_special_tokens:
            ids = [i for i in ids if not (self._sp.is_control(i) or self._sp.is_unknown(i))]
        return self._sp.decode(ids)


MAX_DANGLING_BYTES = 3  # of a UTF-8 character (at most 4 bytes) cut at a token boundary


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas.

    Decodes a short window of earlier tokens together with the new ones, so that word-boundary spaces
    come out right, and holds text back while it ends in an incomplete UTF-8 sequence (U+FFFD).
    """

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int]):
        self.tokenizer = tokenizer
        self.ids = list(prompt_ids[-6:])
        # The window must hold whole characters: a prompt of token ids may start the window, or end, inside
        # a multi-byte character (byte-fallback tokens), which decodes to U+FFFD, and some decoders then
        # replace the whole byte run. Take the widest window that decodes cleanly; bytes dangling at the
        # end count as unread, so the first delta carries the whole character.
        n = len(self.ids)
        self.prefix_offset, self.read_offset = next(
            (start, end) for start in range(min(MAX_DANGLING_BYTES, n) + 1)
            for end in range(n, max(start, n - MAX_DANGLING_BYTES) - 1, -1)
            if not _has_broken_edge(tokenizer.decode(self.ids[start:end])))
        self.text = ""

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset])
        full = self.tokenizer.decode(self.ids[self.prefix_offset:])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            delta = full[len(prefix):]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            self.text += delta
            return delta
        return ""


def _has_broken_edge(text: str) -> bool:
    return text.startswith("\ufffd") or text.endswith("\ufffd")
