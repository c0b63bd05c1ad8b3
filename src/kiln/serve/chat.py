"""Chat messages -> prompt token ids, through the model's Jinja chat template.

The template comes from ``--chat-template FILE``, else the model's (``chat_template.jinja`` or
``tokenizer_config.json``'s ``chat_template``), else ``PLAIN_CHAT_TEMPLATE``: each message as
``role: content`` followed by a blank line, then ``assistant:``. Templates render in Jinja's sandbox
with the same helpers as Hugging Face transformers (``raise_exception``, ``strftime_now``, a ``tojson``
that does not escape HTML), so models' own templates work unchanged.

Tool messages in a chat's history reach a template only if it names them: ``supports_tool_role`` when
its code holds the string ``'tool'`` (as in ``message['role'] == 'tool'``), ``supports_tool_calls``
when it reads ``tool_calls``. A template that never names them would drop such messages silently or
fail on them, so the server refuses those requests with a 400 naming the role instead.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from kiln.errors import ConfigError, RequestError
from kiln.engine.tokenizer import Tokenizer

PLAIN_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def _raise_exception(message: str):
    raise jinja2.TemplateError(message)


def _tojson(value, indent=None, ensure_ascii=False, sort_keys=False) -> str:
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys)


def _names(template: nodes.Template) -> set[str]:
    """The strings and attribute names a template's code holds: what it can compare or look up."""
    strings = {node.value for node in template.find_all(nodes.Const) if isinstance(node.value, str)}
    return strings | {node.attr for node in template.find_all(nodes.Getattr)}


class ChatTemplate:
    def __init__(self, tokenizer: Tokenizer, source: str | None = None):
        self.tokenizer = tokenizer
        self.source = source or tokenizer.chat_template or PLAIN_CHAT_TEMPLATE
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            names = _names(env.parse(self.source))
            self._template = env.from_string(self.source)
        except jinja2.TemplateSyntaxError as e:
            raise ConfigError(f"chat template does not compile: {e.message} (line {e.lineno}); fix the template "
                              "or pass another with --chat-template") from None
        self.supports_tool_role = "tool" in names
        self.supports_tool_calls = "tool_calls" in names
        self.name = ("the given chat template" if source else "the model's chat template" if tokenizer.chat_template
                     else "kiln's plain chat template (the model has none)")
        self._special = {"bos_token": self._token(tokenizer.bos_token_id),
                         "eos_token": self._token(tokenizer.eos_token_ids[0] if tokenizer.eos_token_ids else None)}

    def _token(self, token_id: int | None) -> str:
        return (self.tokenizer.token_str(token_id) or "") if token_id is not None else ""

    def render(self, messages: list[dict[str, Any]]) -> str:
        try:
            return self._template.render(messages=messages, add_generation_prompt=True, **self._special)
        except Exception as e:  # a template is code from the model folder: any failure is about these messages
            raise RequestError(f"the chat template rejected the messages: {e}") from None

    def encode(self, messages: list[dict[str, Any]]) -> list[int]:
        """Prompt token ids; the template writes any BOS itself, so the tokenizer adds none."""
        return self.tokenizer.encode(self.render(messages), add_special_tokens=False)
