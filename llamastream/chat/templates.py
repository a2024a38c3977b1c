"""Chat templates: the GGUF's own ``tokenizer.chat_template`` (Jinja), or a ChatML fallback.

The fallback is ChatML (``<|im_start|>role\\ncontent<|im_end|>``), the format most small
instruct models use; it applies only when the model file carries no template.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from llamastream.errors import PromptTemplateError

logger = logging.getLogger(__name__)

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(
    value: Any,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
    ensure_ascii: bool = False,
) -> str:
    """Hugging Face's ``tojson`` (plain JSON; Jinja's own escapes ``<`` and ``>`` for HTML)."""
    return json.dumps(
        value, indent=indent, separators=separators, sort_keys=sort_keys, ensure_ascii=ensure_ascii
    )


class ChatTemplate:
    """Renders a list of ``{"role", "content"}`` messages into prompt text.

    >>> ChatTemplate().render([{"role": "user", "content": "hi"}])
    '<|im_start|>user\\nhi<|im_end|>\\n<|im_start|>assistant\\n'
    """

    def __init__(
        self, source: str | None = None, *, bos_token: str = "", eos_token: str = ""
    ) -> None:
        self.source = source or CHATML_TEMPLATE
        self.is_fallback = source is None
        self.bos_token = bos_token
        self.eos_token = eos_token
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)
        env.filters["tojson"] = _tojson
        self._template = env.from_string(self.source)

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
        variables: Mapping[str, Any] | None = None,
    ) -> str:
        """The prompt text; `PromptTemplateError` when the template refuses the messages.

        ``tools`` reach the template as Hugging Face's ``apply_chat_template`` passes them;
        ``variables`` are more of the template's variables (``enable_thinking``, for one).
        """
        extra = {**(variables or {}), **({"tools": list(tools)} if tools else {})}
        try:
            return self._template.render(
                messages=[dict(m) for m in messages],
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
                **extra,
            )
        except Exception as exc:  # a template's own raise_exception, or a fault inside it
            logger.warning("the chat template failed: %s", exc)
            raise PromptTemplateError(f"the model's chat template refused: {exc}") from None

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, str], *, bos: str, eos: str) -> ChatTemplate:
        """The template a GGUF's metadata names, falling back to ChatML when it has none."""
        return cls(metadata.get("tokenizer.chat_template"), bos_token=bos, eos_token=eos)
