"""Sampling parameters of one request, validated, with the server's defaults filled in."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictInt


def _not_a_bool(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError("a number is required, not a boolean")
    return value


Number = Annotated[float, BeforeValidator(_not_a_bool)]  # JSON true is not 1.0


class GenerationParams(BaseModel):
    """Per-session generation parameters (all optional); out-of-range values are refused."""

    model_config = ConfigDict(extra="forbid")

    temperature: Number | None = Field(None, ge=0.0, le=5.0)
    top_p: Number | None = Field(None, gt=0.0, le=1.0)
    top_k: StrictInt | None = Field(None, ge=0, le=100_000)
    repeat_penalty: Number | None = Field(None, gt=0.0, le=10.0)
    max_new_tokens: StrictInt | None = Field(None, ge=1, le=1_048_576)
    seed: StrictInt | None = Field(None, ge=0, lt=2**32)


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
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def updated(self, **changes: Any) -> SamplingParams:
        """A copy with the given non-None fields replaced."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})
