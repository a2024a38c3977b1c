"""ChatPrompt and chat templates."""

from __future__ import annotations

import pytest

from llamastream.chat.prompt import ChatPrompt
from llamastream.chat.templates import ChatTemplate
from llamastream.errors import PromptTemplateError

LLAMA3 = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>"
    "\n\n{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def test_renders_with_the_models_template() -> None:
    prompt = ChatPrompt("sys", template=ChatTemplate(LLAMA3, bos_token="<|begin_of_text|>"))
    prompt.add_user_message("hi")
    assert prompt.create_prompt() == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nsys<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def test_fallback_is_chatml() -> None:
    template = ChatTemplate(None)
    assert template.is_fallback
    assert ChatTemplate.from_metadata({}, bos="", eos="").is_fallback
    text = template.render(
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    )
    assert text == "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\na<|im_end|>\n" + (
        "<|im_start|>assistant\n"
    )


def test_template_exceptions_surface() -> None:
    template = ChatTemplate("{{ raise_exception('roles must alternate') }}")
    with pytest.raises(PromptTemplateError, match="alternate") as raised:
        template.render([])
    assert raised.value.status_code == 400  # the same answer on every route


def test_messages_carry_ids_and_regenerate_drops_the_reply() -> None:
    prompt = ChatPrompt()
    user = prompt.add_user_message("q")
    reply = prompt.add_assistant_message("a")
    assert user.id != reply.id and len(reply.id) == 32
    assert prompt.remove_trailing_assistant() is reply
    assert prompt.remove_trailing_assistant() is None
    assert prompt.last_user_message() is user


def test_fit_drops_oldest_turns_and_keeps_system_and_last_input() -> None:
    prompt = ChatPrompt("system rules")
    for i in range(5):
        prompt.add_user_message(f"question {i} " + "x" * 50)
        prompt.add_assistant_message(f"answer {i} " + "y" * 50)
    prompt.add_user_message("last")
    view = prompt.copy()
    n = view.fit(len, 300)
    assert n <= 300
    assert view.messages[0].role == "user"
    assert view.messages[-1].content == "last"
    assert "system rules" in view.create_prompt()
    assert len(view.messages) < len(prompt.messages) == 11  # the original is untouched


def test_fit_reports_an_input_that_cannot_fit() -> None:
    prompt = ChatPrompt()
    prompt.add_user_message("z" * 500)
    assert prompt.fit(len, 100) > 100
    assert len(prompt.messages) == 1


def test_round_trips_through_a_dict() -> None:
    prompt = ChatPrompt("s")
    prompt.add_user_message("日本語")
    prompt.add_assistant_message("partial", partial=True)
    again = ChatPrompt.from_dict(prompt.to_dict())
    assert again.to_dict() == prompt.to_dict()
    assert again.create_prompt() == prompt.create_prompt()
