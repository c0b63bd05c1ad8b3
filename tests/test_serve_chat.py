"""Chat templates: the plain fallback, a model's own Jinja template, --chat-template, sandboxing."""

from __future__ import annotations

import json
import shutil

import pytest

from kiln.errors import ConfigError, RequestError
from kiln.runtime.llm import DEFAULT_MODEL_DIR
from kiln.engine.tokenizer import Tokenizer
from kiln.serve.chat import PLAIN_CHAT_TEMPLATE, ChatTemplate

# Llama 2's template, shortened: it insists on alternating roles, as real templates do.
ALTERNATING_TEMPLATE = (
    "{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% else %}{{ ' ' + message['content'] + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)


def tokenizer_with_template(tmp_path, template: str | None) -> Tokenizer:
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(DEFAULT_MODEL_DIR / name, tmp_path / name)
    if template is not None:
        config = json.loads((tmp_path / "tokenizer_config.json").read_text())
        config["chat_template"] = template
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    return Tokenizer(tmp_path, eos_token_ids=(2,), bos_token_id=1)


def test_plain_template_when_the_model_has_none(tmp_path):
    chat = ChatTemplate(tokenizer_with_template(tmp_path, None))
    assert chat.source == PLAIN_CHAT_TEMPLATE
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert chat.render(messages) == "<s>system: Be brief.\n\nuser: Hi\n\nassistant:"
    ids = chat.encode(messages)
    assert ids[0] == 1 and ids[1] != 1, "one BOS: the template's, none added by the tokenizer"


def test_model_template_from_tokenizer_config(tmp_path):
    chat = ChatTemplate(tokenizer_with_template(tmp_path, ALTERNATING_TEMPLATE))
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                {"role": "user", "content": "Again"}]
    assert chat.render(messages) == "<s>[INST] Hi [/INST] Hello </s><s>[INST] Again [/INST]"
    with pytest.raises(RequestError, match="roles must alternate"):
        chat.render([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])


def test_given_template_wins_and_tojson_keeps_text_as_is(tmp_path):
    chat = ChatTemplate(tokenizer_with_template(tmp_path, ALTERNATING_TEMPLATE), "{{ messages | tojson }}")
    messages = [{"role": "user", "content": "<b>é</b>"}]
    assert json.loads(chat.render(messages)) == messages and "<b>é</b>" in chat.render(messages)


def test_template_syntax_error_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="chat template does not compile.*--chat-template"):
        ChatTemplate(tokenizer_with_template(tmp_path, None), "{% for m in messages %}")


def test_templates_run_sandboxed(tmp_path):
    chat = ChatTemplate(tokenizer_with_template(tmp_path, None), "{{ ''.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(RequestError, match="chat template rejected.*unsafe"):
        chat.render([{"role": "user", "content": "x"}])


# A tool-using model's template, shortened: tool results and the assistant's calls have their own markup.
TOOL_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message.role == 'tool' %}<result {{ message.tool_call_id }}>{{ message.content }}</result>\n"
    "{% elif message.tool_calls is defined %}"
    "{% for call in message.tool_calls %}<call {{ call.function.name }} {{ call.function.arguments | tojson }}>\n"
    "{% endfor %}"
    "{% else %}{{ message.role }}: {{ message.content }}\n{% endif %}"
    "{% endfor %}assistant:"
)


def test_tool_support_is_what_the_template_names(tmp_path):
    tokenizer = tokenizer_with_template(tmp_path, None)
    tools = ChatTemplate(tokenizer, TOOL_TEMPLATE)
    assert tools.supports_tool_role and tools.supports_tool_calls and tools.name == "the given chat template"
    for chat in (ChatTemplate(tokenizer), ChatTemplate(tokenizer, ALTERNATING_TEMPLATE)):
        assert not chat.supports_tool_role and not chat.supports_tool_calls
    assert "plain" in ChatTemplate(tokenizer).name
    only_results = ChatTemplate(tokenizer, "{% for m in messages %}{% if m['role'] in ['tool'] %}x{% endif %}"
                                           "{% endfor %}")
    assert only_results.supports_tool_role and not only_results.supports_tool_calls


def test_tool_messages_render_through_the_template(tmp_path):
    chat = ChatTemplate(tokenizer_with_template(tmp_path, None), TOOL_TEMPLATE)
    messages = [{"role": "user", "content": "Weather in Oslo?"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"id": "call_1", "type": "function",
                     "function": {"name": "weather", "arguments": {"city": "Oslo"}}}]},
                {"role": "tool", "content": "-3 C", "tool_call_id": "call_1"}]
    assert chat.render(messages) == ('user: Weather in Oslo?\n<call weather {"city": "Oslo"}>\n'
                                     '<result call_1>-3 C</result>\nassistant:')
