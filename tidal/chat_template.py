"""A checkpoint's chat template, rendered as transformers renders it: Jinja in
a sandbox (templates from the Hub are untrusted code) with trim_blocks and
lstrip_blocks, loop controls, a `tojson` that leaves non-ASCII and HTML
characters alone, `raise_exception` and `strftime_now`, and the tokenizer's
special tokens (bos_token, eos_token, ...) in scope."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from tidal.errors import CheckpointError, InvalidRequestError

_SPECIAL = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


class _Generation(Extension):
    """`{% generation %}...{% endgeneration %}` (marks assistant text for
    training masks): rendered as its body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return caller()


def _raise(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class ChatTemplate:
    def __init__(self, source: str, special_tokens: dict[str, str] | None = None) -> None:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, loopcontrols])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            self.template = env.from_string(source)
        except jinja2.TemplateSyntaxError as exc:
            raise CheckpointError(f"the chat template does not parse: {exc}") from exc
        self.special_tokens = dict(special_tokens or {})

    @classmethod
    def from_folder(cls, folder: Path) -> ChatTemplate | None:
        """From chat_template.jinja, else tokenizer_config.json's `chat_template`
        (a string, or named templates: "default"); None if there is none."""
        config_path = folder / "tokenizer_config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        special = {}
        for name in _SPECIAL:
            tok = config.get(name)
            if isinstance(tok, dict):
                tok = tok.get("content")
            if isinstance(tok, str):
                special[name] = tok
        jinja_file = folder / "chat_template.jinja"
        if jinja_file.is_file():
            return cls(jinja_file.read_text(), special)
        source = config.get("chat_template")
        if isinstance(source, list):
            named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
            source = named.get("default")
        return cls(source, special) if isinstance(source, str) else None

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, tools: list[dict] | None = None, **kwargs: Any) -> str:
        """The prompt text for `messages` ([{"role", "content"}, ...]); extra
        keyword arguments reach the template (e.g. enable_thinking=False)."""
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
            raise InvalidRequestError("messages must be a list of {'role': ..., 'content': ...} dicts")
        try:
            return self.template.render(messages=messages, tools=tools, add_generation_prompt=add_generation_prompt, **self.special_tokens, **kwargs)
        except jinja2.TemplateError as exc:
            raise InvalidRequestError(f"the chat template refused these messages: {exc}") from exc
