"""Sampling parameters of one request, validated, with the server's defaults filled in."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import BaseModel, ConfigDict, Strict

from llamastream.chat.reasoning import ReasoningBudget
from llamastream.errors import InvalidRequestError
from llamastream.limits import MaxNewTokens, RepeatPenalty, Seed, Temperature, TopK, TopP

if TYPE_CHECKING:
    from llamastream.config import Settings


@dataclass(frozen=True)
class SamplingParams:
    """What a worker needs to sample one reply. ``seed`` None means a fresh random seed."""

    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.0
    repeat_penalty: float = 1.1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    max_new_tokens: int = 256
    seed: int | None = None
    grammar: str | None = None
    # With triggers the grammar is lazy: it holds the reply from the first match of one of
    # these regular expressions (its first group) on, e.g. once a tool call opens.
    grammar_triggers: tuple[str, ...] = ()
    # Control tokens written as text (a tool-call marker such as Mistral's [TOOL_CALLS]).
    special_tokens: bool = False
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    # A thinking model's reasoning closed after so many tokens (None: no budget).
    reasoning: ReasoningBudget | None = None
    # (token, bias) added to the logits; -100 or less bans the token.
    logit_bias: tuple[tuple[int, float], ...] = ()
    # Each token's log probability and this many most likely tokens (None: none).
    logprobs: int | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> SamplingParams:
        """The server's defaults."""
        return cls(
            temperature=settings.temperature,
            top_p=settings.top_p,
            top_k=settings.top_k,
            repeat_penalty=settings.repeat_penalty,
            max_new_tokens=settings.max_new_tokens,
            seed=settings.seed,
        )

    def updated(self, **changes: Any) -> SamplingParams:
        """A copy with the given non-None fields replaced."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


class GenerationParams(BaseModel):
    """Per-session generation parameters (all optional); out-of-range values are refused.

    >>> GenerationParams(temperature=0.2).apply(SamplingParams()).temperature
    0.2
    """

    model_config = ConfigDict(extra="forbid")

    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: Annotated[TopK, Strict()] | None = None
    repeat_penalty: RepeatPenalty | None = None
    max_new_tokens: Annotated[MaxNewTokens, Strict()] | None = None
    seed: Annotated[Seed, Strict()] | None = None

    def check_cap(self, max_new_tokens: int) -> None:
        """Refuse a reply length above the server's cap (400 naming ``max_new_tokens``)."""
        if self.max_new_tokens is not None and self.max_new_tokens > max_new_tokens:
            raise InvalidRequestError(
                f"max_new_tokens: at most {max_new_tokens}", field="max_new_tokens"
            )

    def apply(self, base: SamplingParams) -> SamplingParams:
        """``base`` with the parameters set here."""
        return base.updated(**self.model_dump(exclude_none=True))
