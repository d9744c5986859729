"""Client-side tokenization for the TensorRT-LLM protocol (GenerateRequest carries token ids, not text).

GgufTokenizer: the model's own tokenizer read from the GGUF file (llama.cpp, vocabulary only; for the CPU engine).
HfTokenizer: a Hugging Face tokenizer directory (tokenizer.json + tokenizer_config.json), as trtllm-serve uses
with HF checkpoints. Both render the chat template shipped with the model (jinja2, add_generation_prompt=True).

Message contents are data: they are tokenized as plain text, so a transcript that contains "<|im_end|>" or another
special token's text cannot close its turn or open a new one. Only the template's own text is parsed for special
tokens. (The rendered prompt is split at each message's content and the pieces are tokenized separately.)
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import re
import secrets
import threading
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from callstream.core.errors import ConfigError, InvalidInputError

Message = dict[str, str]


class Tokenizer(Protocol):
    @property
    def eos_token_ids(self) -> list[int]: ...

    def encode_chat(self, messages: list[Message]) -> list[int]:
        """The prompt for a chat: the template rendered with add_generation_prompt=True, tokenized."""
        ...

    def encode(self, text: str) -> list[int]:
        """Plain text (no special tokens parsed, none added): for counting and trimming."""
        ...

    def decode(self, ids: Sequence[int]) -> str:
        """Text of output tokens, special tokens left out."""
        ...


class ChatTemplate:
    """A model's jinja2 chat template, rendered the way transformers does (sandboxed, trim/lstrip blocks)."""

    def __init__(self, source: str, bos_token: str = "", eos_token: str = "") -> None:
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            self._template = env.from_string(source)
        except TemplateError as exc:
            raise ConfigError(f"the model's chat template does not parse: {exc}") from exc
        self.bos_token = bos_token
        self.eos_token = eos_token

    def render(self, messages: list[Message]) -> str:
        try:
            return self._template.render(
                messages=messages, add_generation_prompt=True, bos_token=self.bos_token, eos_token=self.eos_token
            )
        except TemplateError as exc:
            raise InvalidInputError(f"chat template: {exc}") from exc

    def split(self, messages: list[Message]) -> list[tuple[str, bool]]:
        """The rendered prompt as (text, is_template) pieces: message contents are the pieces with False."""
        marks = [f"\x00M{secrets.token_hex(6)}_{i}\x00" for i in range(len(messages))]
        rendered = self.render([{**m, "content": mark} for m, mark in zip(messages, marks, strict=True)])
        pieces: list[tuple[str, bool]] = []
        pattern = re.compile("|".join(re.escape(m) for m in marks))
        pos = 0
        seen: set[str] = set()
        for match in pattern.finditer(rendered):
            if match.start() > pos:
                pieces.append((rendered[pos : match.start()], True))
            index = marks.index(match.group(0))
            seen.add(match.group(0))
            pieces.append((messages[index]["content"], False))
            pos = match.end()
        if pos < len(rendered):
            pieces.append((rendered[pos:], True))
        if len(seen) != len(messages):
            raise InvalidInputError("the chat template dropped or changed a message's content")
        return pieces


def _raise(message: str) -> None:
    raise TemplateError(message)


class GgufTokenizer:
    """The tokenizer and chat template inside a GGUF file (llama.cpp, vocabulary only: no weights loaded)."""

    def __init__(self, path: str | Path, chat_template: str | None = None) -> None:
        from callstream.llm_engine.llama_runtime import init_llama, lc, meta_str

        self._lc = lc
        self.path = Path(path)
        if not self.path.is_file():
            raise ConfigError(f"tokenizer: GGUF file not found: {self.path}")
        init_llama()
        params = lc.llama_model_default_params()
        params.vocab_only = True
        self._model = lc.llama_model_load_from_file(str(self.path).encode(), params)
        if not self._model:
            raise ConfigError(f"tokenizer: llama.cpp could not read the vocabulary of {self.path}")
        self._vocab = lc.llama_model_get_vocab(self._model)
        self.vocab_size = int(lc.llama_vocab_n_tokens(self._vocab))
        bos = int(lc.llama_vocab_bos(self._vocab))
        eos = int(lc.llama_vocab_eos(self._vocab))
        self.bos_token_id = bos if bos >= 0 else None
        self.add_bos = bool(lc.llama_vocab_get_add_bos(self._vocab))
        self._eos = sorted(t for t in range(self.vocab_size) if lc.llama_vocab_is_eog(self._vocab, t))
        if eos >= 0 and eos not in self._eos:
            self._eos.insert(0, eos)
        source = chat_template or meta_str(self._model, "tokenizer.chat_template")
        if not source:
            raise ConfigError(f"tokenizer: {self.path.name} has no tokenizer.chat_template")
        self.template = ChatTemplate(
            source,
            bos_token=self._piece(bos) if bos >= 0 else "",
            eos_token=self._piece(eos) if eos >= 0 else "",
        )

    @property
    def eos_token_ids(self) -> list[int]:
        return list(self._eos)

    def _tokenize(self, text: str, special: bool) -> list[int]:
        lc = self._lc
        data = text.encode("utf-8")
        size = max(16, len(data) + 8)
        while True:
            buf = (lc.llama_token * size)()
            n = int(lc.llama_tokenize(self._vocab, data, len(data), buf, size, False, special))
            if n >= 0:
                return list(buf[:n])
            size = -n

    def _piece(self, token: int) -> str:
        buf = ctypes.create_string_buffer(256)
        n = int(self._lc.llama_token_to_piece(self._vocab, token, buf, 256, 0, True))
        return buf.raw[: max(0, n)].decode("utf-8", errors="replace")

    def encode(self, text: str) -> list[int]:
        return self._tokenize(text, special=False)

    def encode_chat(self, messages: list[Message]) -> list[int]:
        ids: list[int] = []
        for text, is_template in self.template.split(messages):
            ids.extend(self._tokenize(text, special=is_template))
        if self.add_bos and self.bos_token_id is not None and (not ids or ids[0] != self.bos_token_id):
            ids.insert(0, self.bos_token_id)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        lc = self._lc
        tokens = [int(t) for t in ids]
        if not tokens:
            return ""
        arr = (lc.llama_token * len(tokens))(*tokens)
        size = 8 * len(tokens) + 16
        while True:
            buf = ctypes.create_string_buffer(size)
            # remove_special=True, unparse_special=False: control tokens (EOS, ...) do not show up as text.
            n = int(lc.llama_detokenize(self._vocab, arr, len(tokens), buf, size, True, False))
            if n >= 0:
                return buf.raw[:n].decode("utf-8", errors="replace")
            size = -n + 1

    def close(self) -> None:
        if self._model:
            self._lc.llama_model_free(self._model)
            self._model = None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter shutdown
            self.close()


def _token_text(value: Any) -> str:
    """tokenizer_config.json writes special tokens as strings or as AddedToken dicts."""
    if isinstance(value, dict):
        return str(value.get("content", ""))
    return str(value) if value else ""


class HfTokenizer:
    """A Hugging Face tokenizer directory (tokenizer.json, tokenizer_config.json), as trtllm-serve loads it."""

    def __init__(self, directory: str | Path) -> None:
        from tokenizers import Tokenizer as _HfTokenizer

        self.path = Path(directory)
        tok_file = self.path / "tokenizer.json"
        if not tok_file.is_file():
            raise ConfigError(f"tokenizer: {tok_file} not found")
        self._tok = _HfTokenizer.from_file(str(tok_file))
        self._lock = threading.Lock()
        config: dict[str, Any] = {}
        config_file = self.path / "tokenizer_config.json"
        if config_file.is_file():
            config = json.loads(config_file.read_text())
        source = config.get("chat_template")
        if isinstance(source, list):  # named templates: take the default one
            named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
            source = named.get("default") or next(iter(named.values()), None)
        jinja_file = self.path / "chat_template.jinja"
        if not source and jinja_file.is_file():
            source = jinja_file.read_text()
        if not source:
            raise ConfigError(
                f"tokenizer: no chat template in {self.path} (tokenizer_config.json or chat_template.jinja)"
            )
        bos_text, eos_text = _token_text(config.get("bos_token")), _token_text(config.get("eos_token"))
        self.template = ChatTemplate(str(source), bos_token=bos_text, eos_token=eos_text)
        eos: list[int] = []
        if eos_text and (eos_id := self._tok.token_to_id(eos_text)) is not None:
            eos.append(int(eos_id))
        gen_file = self.path / "generation_config.json"
        if gen_file.is_file():
            value = json.loads(gen_file.read_text()).get("eos_token_id")
            for t in value if isinstance(value, list) else [value] if value is not None else []:
                if int(t) not in eos:
                    eos.append(int(t))
        if not eos:
            raise ConfigError(f"tokenizer: no eos token in {self.path}")
        self._eos = eos

    @property
    def eos_token_ids(self) -> list[int]:
        return list(self._eos)

    def _encode(self, text: str, special: bool) -> list[int]:
        with self._lock:
            self._tok.encode_special_tokens = not special  # True: special tokens' text is plain text
            try:
                return list(self._tok.encode(text, add_special_tokens=False).ids)
            finally:
                self._tok.encode_special_tokens = False

    def encode(self, text: str) -> list[int]:
        return self._encode(text, special=False)

    def encode_chat(self, messages: list[Message]) -> list[int]:
        ids: list[int] = []
        for text, is_template in self.template.split(messages):
            ids.extend(self._encode(text, special=is_template))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return str(self._tok.decode([int(t) for t in ids], skip_special_tokens=True))


def load_tokenizer(spec: str | Path) -> GgufTokenizer | HfTokenizer:
    """A .gguf file: its own tokenizer; a directory with tokenizer.json: a Hugging Face tokenizer."""
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        return GgufTokenizer(path)
    if path.is_dir():
        if (path / "tokenizer.json").is_file():
            return HfTokenizer(path)
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return GgufTokenizer(ggufs[0])
        raise ConfigError(f"tokenizer: {path} has no tokenizer.json (and not exactly one .gguf file)")
    raise ConfigError(f"tokenizer: {path} is neither a .gguf file nor a tokenizer directory")
