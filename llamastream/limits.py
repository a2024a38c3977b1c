"""Every generation limit, declared once: `Settings`, the per-session parameters and the request
models of each API build their fields from these types.

Numbers never take JSON booleans (``true`` is not 1).

>>> from pydantic import TypeAdapter
>>> TypeAdapter(Temperature).validate_python(0.5)
0.5
>>> TypeAdapter(RepeatPenalty).json_schema()
{'exclusiveMinimum': 0.0, 'maximum': 10.0, 'type': 'number'}
>>> TypeAdapter(TopK).validate_python(True)
Traceback (most recent call last):
...
pydantic_core._pydantic_core.ValidationError: 1 validation error for ...
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field


def _not_a_bool(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError("a number is required, not a boolean")
    return value


NOT_A_BOOL = BeforeValidator(_not_a_bool)

Temperature = Annotated[float, Field(ge=0.0, le=5.0), NOT_A_BOOL]
TopP = Annotated[float, Field(gt=0.0, le=1.0), NOT_A_BOOL]
TopK = Annotated[int, Field(ge=0, le=100_000), NOT_A_BOOL]
MinP = Annotated[float, Field(ge=0.0, le=1.0), NOT_A_BOOL]
# llama.cpp divides logits by it: 0 would make them infinite.
RepeatPenalty = Annotated[float, Field(gt=0.0, le=10.0), NOT_A_BOOL]
# OpenAI's presence and frequency penalties.
Penalty = Annotated[float, Field(ge=-2.0, le=2.0), NOT_A_BOOL]
MaxNewTokens = Annotated[int, Field(ge=1, le=1_048_576), NOT_A_BOOL]
Seed = Annotated[int, Field(ge=0, lt=2**32), NOT_A_BOOL]

# OpenAI's API takes temperatures up to 2.
OPENAI_MAX_TEMPERATURE = 2.0
# OpenAI's API takes at most 4 stop sequences.
MAX_STOP_SEQUENCES = 4

# KV cache types llama.cpp can store (`engine/gpu.py` knows their block sizes).
KvType = Literal["f32", "f16", "bf16", "q8_0", "q5_1", "q5_0", "q4_1", "q4_0", "iq4_nl"]
FlashAttn = Literal["auto", "on", "off"]
