"""GPU placement: where a worker's model and KV cache go, whether they fit, which GPUs exist.

The estimate is arithmetic over the GGUF's shape, read from its metadata before any weights are
loaded, so that a configuration that cannot fit is refused at start-up with a message that says
what to change, instead of failing inside CUDA halfway through loading. The GPUs come from
llama.cpp's own ggml backend registry (the devices llama.cpp will use, in its order), with
``nvidia-smi`` as a fallback.
"""

from __future__ import annotations

import bisect
import ctypes
import logging
import math
import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Any, Final, Literal

import llama_cpp

from llamastream.limits import FlashAttn, KvType

logger = logging.getLogger(__name__)


MIB: Final = 1 << 20
# llama.cpp pads each sequence's KV cache to a multiple of 256 cells (with kv_unified off).
KV_PAD: Final = 256
# ggml type → (bytes per block, elements per block), as ggml_type_size / ggml_blck_size say.
KV_TYPE_BLOCKS: Final[Mapping[str, tuple[int, int]]] = MappingProxyType(
    {
        "f32": (4, 1),
        "f16": (2, 1),
        "bf16": (2, 1),
        "q8_0": (34, 32),
        "q5_1": (24, 32),
        "q5_0": (22, 32),
        "q4_1": (20, 32),
        "q4_0": (18, 32),
        "iq4_nl": (18, 32),
    }
)
# ggml's enum ggml_type (llama-cpp-python 0.3.36 does not bind GGML_TYPE_BF16).
GGML_TYPE_IDS: Final[Mapping[str, int]] = MappingProxyType(
    {
        "f32": 0,
        "f16": 1,
        "q4_0": 2,
        "q4_1": 3,
        "q5_0": 6,
        "q5_1": 7,
        "q8_0": 8,
        "iq4_nl": 20,
        "bf16": 30,
    }
)
FLASH_ATTN_TYPES: Final[Mapping[str, int]] = MappingProxyType(
    {
        "auto": llama_cpp.LLAMA_FLASH_ATTN_TYPE_AUTO,
        "on": llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED,
        "off": llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED,
    }
)
# enum ggml_backend_dev_type
_DEV_TYPE_GPU: Final = 1
_DEV_TYPE_IGPU: Final = 2


class GpuMemoryError(ValueError):
    """The model and KV cache planned for a GPU do not fit in its free memory."""


def row_bytes(type_name: str, n: int) -> int:
    """Bytes of ``n`` elements of a ggml type (whole blocks for block-quantized types)."""
    block_bytes, block = KV_TYPE_BLOCKS[type_name]
    return -(-n // block) * block_bytes


def kv_cells(n_ctx: int) -> int:
    """KV cells llama.cpp allocates for a sequence of ``n_ctx`` tokens (padded to 256)."""
    return -(-n_ctx // KV_PAD) * KV_PAD


def kv_bytes_per_slot(
    n_layer: int,
    n_ctx: int,
    n_embd_k_gqa: int,
    n_embd_v_gqa: int,
    type_k: str,
    type_v: str,
) -> int:
    """Bytes of K and V cache for ``n_ctx`` cells of one sequence.

    >>> kv_bytes_per_slot(32, 1, 1024, 1024, "f16", "f16") // 1024  # Llama-3-8B, one token: KiB
    128
    >>> kv_bytes_per_slot(32, 1, 1024, 1024, "q8_0", "q8_0") // 1024
    68
    """
    return n_layer * n_ctx * (row_bytes(type_k, n_embd_k_gqa) + row_bytes(type_v, n_embd_v_gqa))


def _meta_int(meta: Mapping[str, str], key: str) -> int | None:
    """An integer metadata value; the largest entry of a per-layer array such as ``[8, 8, 0]``."""
    raw = meta.get(key)
    if raw is None:
        return None
    try:
        if raw.startswith("["):
            return max(int(v) for v in raw.strip("[]").split(",") if v.strip())
        return int(raw)
    except ValueError:
        return None


@dataclass(frozen=True)
class ModelShape:
    """What the memory estimate needs to know about a GGUF model."""

    n_layer: int
    n_embd_k_gqa: int  # key width per token and layer: head size x KV heads
    n_embd_v_gqa: int
    model_bytes: int
    head_k: int = 0  # head sizes; 0: unknown
    head_v: int = 0

    @classmethod
    def from_metadata(cls, meta: Mapping[str, str], model_bytes: int) -> ModelShape | None:
        """The shape from GGUF metadata (as ``Llama.metadata`` gives it); None when it lacks one.

        Per-layer KV head counts take their largest entry, so the estimate errs on the safe side.
        """
        arch = meta.get("general.architecture")
        if arch is None:
            return None
        n_layer = _meta_int(meta, f"{arch}.block_count")
        n_embd = _meta_int(meta, f"{arch}.embedding_length")
        n_head = _meta_int(meta, f"{arch}.attention.head_count")
        if not n_layer or not n_embd or not n_head:
            return None
        n_head_kv = _meta_int(meta, f"{arch}.attention.head_count_kv") or n_head
        key_len = _meta_int(meta, f"{arch}.attention.key_length") or n_embd // n_head
        value_len = _meta_int(meta, f"{arch}.attention.value_length") or n_embd // n_head
        return cls(
            n_layer, key_len * n_head_kv, value_len * n_head_kv, model_bytes, key_len, value_len
        )


def check_kv_types(shape: ModelShape, type_k: str, type_v: str, flash_attn: str) -> None:
    """Raise ValueError for KV cache types llama.cpp would refuse for this model.

    With flash attention (on, or auto, which may turn it on), a quantized K or V cache needs the
    head size to be a multiple of the type's block; a quantized V cache needs flash attention.
    """
    for which, type_name, head in (
        ("type_k", type_k, shape.head_k),
        ("type_v", type_v, shape.head_v),
    ):
        block = KV_TYPE_BLOCKS[type_name][1]
        if head and head % block and (flash_attn != "off" or which == "type_v"):
            remedy = (
                "set flash_attn=off (a quantized K cache works without it) or type_k=f16"
                if which == "type_k"
                else "use type_v=f16"
            )
            raise ValueError(
                f"{which}={type_name} stores blocks of {block} values, which do not divide this "
                f"model's head size ({head}) under flash attention: {remedy}"
            )


@dataclass(frozen=True)
class DeviceMemory:
    """A GPU as llama.cpp numbers it (``main_gpu``, ``tensor_split``), with its memory."""

    index: int
    name: str
    free: int
    total: int


@dataclass(frozen=True)
class DeviceShare:
    """What one worker puts on one GPU."""

    device: int
    layers: int  # offloaded layers, the output layer counted as one, as llama.cpp counts them
    model_bytes: int
    kv_bytes: int  # for all of the worker's slots

    @property
    def total(self) -> int:
        return self.model_bytes + self.kv_bytes


@dataclass(frozen=True)
class Placement:
    """Where one worker's model and KV cache go: an estimate made before loading.

    Model bytes are spread evenly over the model's layers plus the output layer, as llama.cpp
    offloads them; ``shares`` is empty on the CPU.
    """

    worker: int
    n_layer: int
    gpu_layers: int  # of n_layer + 1
    model_bytes: int
    kv_bytes_per_slot: int
    n_slots: int
    n_ctx: int
    type_k: str
    type_v: str
    shares: tuple[DeviceShare, ...] = ()

    @property
    def kv_bytes(self) -> int:
        return self.kv_bytes_per_slot * self.n_slots

    @property
    def gpu_bytes(self) -> int:
        return sum(share.total for share in self.shares)

    @property
    def host_bytes(self) -> int:
        return self.model_bytes + self.kv_bytes - self.gpu_bytes

    def describe(self, names: Mapping[int, str] | None = None) -> str:
        """One line for the start-up log."""
        names = names or {}
        where = (
            ", ".join(f"GPU {s.device} ({names.get(s.device, '?')})" for s in self.shares) or "CPU"
        )
        return (
            f"worker {self.worker} on {where}: {self.gpu_layers}/{self.n_layer + 1} layers on GPU, "
            f"model {_mib(self.model_bytes)} MiB, KV {_mib(self.kv_bytes_per_slot)} MiB per slot "
            f"({self.n_ctx} tokens, K {self.type_k}, V {self.type_v}) x {self.n_slots} slots = "
            f"{_mib(self.kv_bytes)} MiB, total {_mib(self.model_bytes + self.kv_bytes)} MiB "
            + (
                f"({_mib(self.gpu_bytes)} MiB on GPU, {_mib(self.host_bytes)} MiB in host memory)"
                if self.shares
                else "in host memory"
            )
        )


def _mib(n: int | float) -> str:
    return f"{n / MIB:,.1f}"


def plan_placement(
    worker: int,
    shape: ModelShape,
    *,
    n_slots: int,
    n_ctx: int,
    n_gpu_layers: int,
    type_k: str = "f16",
    type_v: str = "f16",
    offload_kqv: bool = True,
    devices: Sequence[int] = (),
    split: Sequence[float] | None = None,
) -> Placement:
    """The placement of one worker over ``devices`` (GPU indices; none: the CPU).

    Offloaded layers go to the devices in proportion to ``split`` (default: equal), the way
    llama.cpp's layer split assigns them; a layer's KV cache goes where the layer goes unless
    ``offload_kqv`` is off.
    """
    per_slot = kv_bytes_per_slot(
        shape.n_layer,
        kv_cells(n_ctx),
        shape.n_embd_k_gqa,
        shape.n_embd_v_gqa,
        type_k,
        type_v,
    )
    units = shape.n_layer + 1
    offloaded = 0
    if devices:
        offloaded = units if n_gpu_layers < 0 else min(n_gpu_layers, units)
    base = Placement(
        worker,
        shape.n_layer,
        offloaded,
        shape.model_bytes,
        per_slot,
        n_slots,
        n_ctx,
        type_k,
        type_v,
    )
    if not offloaded:
        return base
    layers, kv_layers = _split_layers(shape.n_layer, offloaded, len(devices), split)
    kv_per_layer = per_slot * n_slots / shape.n_layer
    shares = tuple(
        DeviceShare(
            device,
            n,
            round(shape.model_bytes * n / units),
            round(kv_per_layer * k) if offload_kqv else 0,
        )
        for device, n, k in zip(devices, layers, kv_layers, strict=True)
        if n
    )
    return replace(base, shares=shares)


def _split_layers(
    n_layer: int, offloaded: int, n_devices: int, split: Sequence[float] | None
) -> tuple[list[int], list[int]]:
    """Per device, the offloaded layers (the last ``offloaded`` of ``n_layer`` + the output
    layer) and those of them holding a KV cache, in proportion to ``split`` (default equal).

    >>> _split_layers(4, 5, 2, [3, 1])
    ([4, 1], [4, 0])
    """
    units = n_layer + 1
    weights = list(split) if split is not None else [1.0] * n_devices
    weights = (weights + [0.0] * n_devices)[:n_devices]
    if sum(weights) <= 0:
        weights = [1.0] * n_devices
    bounds = [sum(weights[: i + 1]) / sum(weights) for i in range(n_devices)]
    first = units - offloaded
    layers = [0] * n_devices
    kv_layers = [0] * n_devices
    for unit in range(first, units):
        at = min(bisect.bisect_right(bounds, (unit - first) / offloaded), n_devices - 1)
        layers[at] += 1
        if unit < n_layer:  # the output layer holds no KV cache
            kv_layers[at] += 1
    return layers, kv_layers


def check_fits(
    plans: Sequence[Placement], devices: Sequence[DeviceMemory], headroom_bytes: int
) -> None:
    """Raise `GpuMemoryError` when the plans put more on a GPU than it has free, less headroom.

    The message names the GPU, the figures and what to change.
    """
    by_index = {d.index: d for d in devices}
    for index in sorted({s.device for p in plans for s in p.shares}):
        device = by_index.get(index)
        if device is None:
            raise GpuMemoryError(
                f"GPU {index} is planned for but llama.cpp sees {len(devices)} GPU(s); "
                "check main_gpu, tensor_split and CUDA_VISIBLE_DEVICES"
            )
        on_device = [(p, s) for p in plans for s in p.shares if s.device == index]
        need = sum(s.total for _, s in on_device)
        budget = device.free - headroom_bytes
        if need <= budget:
            continue
        raise GpuMemoryError(_refusal(device, on_device, need, budget, headroom_bytes))


def _refusal(
    device: DeviceMemory,
    on_device: list[tuple[Placement, DeviceShare]],
    need: int,
    budget: int,
    headroom: int,
) -> str:
    over = need - max(budget, 0)
    model = sum(s.model_bytes for _, s in on_device)
    kv = sum(s.kv_bytes for _, s in on_device)
    plan = on_device[0][0]
    slots = sum(p.n_slots for p, _ in on_device)
    lines = [
        f"the model and KV cache do not fit on GPU {device.index} ({device.name}): they need "
        f"about {_mib(need)} MiB (model {_mib(model)} MiB, KV cache {_mib(kv)} MiB for {slots} "
        f"slot(s) of {plan.n_ctx} tokens, K {plan.type_k}, V {plan.type_v}), and "
        f"{_mib(device.free)} of its {_mib(device.total)} MiB are free, less "
        f"{_mib(headroom)} MiB of headroom (gpu_headroom_mib). To fit, any of:"
    ]
    if kv > 0:
        kv_per_slot = kv / slots
        keep = slots - math.ceil(over / kv_per_slot)
        if keep >= 1:
            lines.append(f"- fewer slots: num_of_concurrent_executions={keep} or less")
        room = kv - over
        if room > 0:
            cells = int(plan.n_ctx * room / kv) // KV_PAD * KV_PAD
            if cells >= KV_PAD:
                lines.append(f"- a shorter context per slot: n_ctx={cells} or less")
        saved = sum(
            s.kv_bytes * _quantized_share(p.type_k, p.type_v) for p, s in on_device if s.kv_bytes
        )
        if saved > 0:
            lines.append(
                f"- a quantized KV cache: type_k=q8_0 and type_v=q8_0 (saves about "
                f"{_mib(saved)} MiB; a quantized V cache needs flash_attn auto or on)"
            )
    gpu_layers = sum(s.layers for _, s in on_device)
    per_layer = need / gpu_layers if gpu_layers else 0
    if per_layer:
        fewer = max(plan.gpu_layers - math.ceil(over / per_layer), 0)
        lines.append(
            f"- fewer layers on the GPU: n_gpu_layers={fewer} (of {plan.n_layer + 1}; "
            "the rest run on the CPU, slower)"
        )
    lines.append("- a smaller quantization of the model (e.g. Q4_K_M instead of Q8_0)")
    lines.append(
        "- or a smaller gpu_headroom_mib, if nothing else uses this GPU"
        if headroom > over
        else "- or a GPU with more free memory"
    )
    return "\n".join(lines)


def _quantized_share(type_k: str, type_v: str) -> float:
    """The fraction of a KV cache of these types that q8_0 K and V would save."""
    now = sum(b / n for b, n in (KV_TYPE_BLOCKS[type_k], KV_TYPE_BLOCKS[type_v]))
    q8 = 2 * 34 / 32
    return max(0.0, 1 - q8 / now)


# Choosing n_gpu_layers


@dataclass(frozen=True)
class LayerFit:
    """The most layers one worker can offload to the GPUs' free memory, and what would allow more.

    ``advice`` is empty exactly when everything fits or there is no GPU.
    """

    layers: int  # n_gpu_layers chosen, 0..units
    units: int  # n_layer + 1: the output layer counted as one, as llama.cpp counts them
    placement: Placement  # plan_placement with ``layers``
    advice: tuple[str, ...] = ()  # "- <setting> would put ... on the GPU" lines
    free: tuple[int, ...] = ()  # free bytes of each device considered; empty: no GPU
    headroom_bytes: int = 0  # left free on each device

    def describe(self) -> str:
        """One line for the start-up log, and the advice on the lines after it."""
        head = f"n_gpu_layers auto: {self.layers}/{self.units} layers on GPU"
        if not self.free:
            return f"{head}: no GPU, the model runs on the CPU"
        each = " each" if len(self.free) > 1 else ""
        room = (
            f"{' + '.join(_mib(f) for f in self.free)} MiB free less "
            f"{_mib(self.headroom_bytes)} MiB headroom{each}"
        )
        if self.layers == self.units:
            return f"{head} ({_mib(self.placement.gpu_bytes)} MiB of {room}): everything fits"
        if self.layers == 0:
            line = f"{head} ({room}): not even one layer fits, the model runs on the CPU"
        else:
            line = (
                f"{head} ({_mib(self.placement.gpu_bytes)} MiB of {room}); the other "
                f"{self.units - self.layers} run on the CPU, slower"
            )
        lead = "to offload layers" if self.layers == 0 else "for more"
        return "\n".join((f"{line}; {lead}, any of:", *self.advice))


def fit_gpu_layers(
    worker: int,
    shape: ModelShape,
    devices: Sequence[DeviceMemory],
    *,
    n_slots: int,
    n_ctx: int,
    type_k: str = "f16",
    type_v: str = "f16",
    offload_kqv: bool = True,
    headroom_bytes: int = 0,
    split: Sequence[float] | None = None,
) -> LayerFit:
    """The most layers (n_gpu_layers) of one worker whose placement `check_fits` the devices.

    Layers split over ``devices`` by ``split``, by default by free memory as llama.cpp does.
    When not everything fits, the advice says how many layers each of a q8_0 KV cache, the
    longest shorter context (a multiple of `KV_PAD`) and the most fewer slots that fit
    everything (else the shortest context, one slot) would allow; one that gains no layer is
    left out, and when none gains, the advice says how much more memory one more layer needs.

    >>> shape = ModelShape(32, 1024, 1024, model_bytes=33 * 100 * MIB)  # 100 MiB per layer
    >>> card = DeviceMemory(0, "GPU", 2048 * MIB, 4096 * MIB)
    >>> fit = fit_gpu_layers(0, shape, [card], n_slots=1, n_ctx=8192)  # KV: 32 MiB per layer
    >>> fit.layers, fit.units
    (15, 33)
    >>> print(fit.advice[1])
    - n_ctx=256 would put 20/33 layers on the GPU
    """
    units = shape.n_layer + 1
    weights = list(split) if split else [float(d.free) for d in devices]

    def plan(n: int, n_slots: int, n_ctx: int, type_k: str, type_v: str) -> Placement:
        return plan_placement(
            worker,
            shape,
            n_slots=n_slots,
            n_ctx=n_ctx,
            n_gpu_layers=n,
            type_k=type_k,
            type_v=type_v,
            offload_kqv=offload_kqv,
            devices=[d.index for d in devices],
            split=weights,
        )

    def most(n_slots: int, n_ctx: int, type_k: str, type_v: str) -> Placement:
        # a loop, not a bisection: over several GPUs, a GPU's share can shrink as layers grow
        for n in range(units if devices else 0, 0, -1):
            placement = plan(n, n_slots, n_ctx, type_k, type_v)
            if _fits(placement, devices, headroom_bytes):
                return placement
        return plan(0, n_slots, n_ctx, type_k, type_v)

    def all_fit(n_slots: int, n_ctx: int) -> bool:
        return _fits(plan(units, n_slots, n_ctx, type_k, type_v), devices, headroom_bytes)

    best = most(n_slots, n_ctx, type_k, type_v)
    free = tuple(d.free for d in devices)
    if not devices or best.gpu_layers == units:
        return LayerFit(best.gpu_layers, units, best, (), free, headroom_bytes)
    # (setting, layers it allows, note)
    options: list[tuple[str, int, str]] = []
    # q8_0 for a cache wider than it, where flash attention (auto or on) allows it
    q8 = "q8_0"
    q8_k, q8_v = (
        q8 if _value_bytes(t) > _value_bytes(q8) and not head % KV_TYPE_BLOCKS[q8][1] else t
        for t, head in ((type_k, shape.head_k), (type_v, shape.head_v))
    )
    if (q8_k, q8_v) != (type_k, type_v):
        setting = " ".join(
            f"{which}={new}"
            for which, new, old in (("type_k", q8_k, type_k), ("type_v", q8_v, type_v))
            if new != old
        )
        note = " (a quantized V cache needs flash_attn auto or on)" if q8_v != type_v else ""
        options.append((setting, most(n_slots, n_ctx, q8_k, q8_v).gpu_layers, note))
    # bisections: with every layer placed, each GPU's share grows with the context and slots
    shorter = range(KV_PAD, n_ctx, KV_PAD)
    if shorter:
        at = bisect.bisect_left(shorter, True, key=lambda c: not all_fit(n_slots, c))
        ctx = shorter[max(at - 1, 0)]
        options.append((f"n_ctx={ctx}", most(n_slots, ctx, type_k, type_v).gpu_layers, ""))
    fewer = range(1, n_slots)
    if fewer:
        at = bisect.bisect_left(fewer, True, key=lambda s: not all_fit(s, n_ctx))
        slots = fewer[max(at - 1, 0)]
        setting = f"{slots} slot{'s' if slots > 1 else ''} instead of {n_slots}"
        options.append((setting, most(slots, n_ctx, type_k, type_v).gpu_layers, ""))
    advice = [
        f"- {setting} would put "
        + (f"all {units} layers" if n == units else f"{n}/{units} layers")
        + f" on the GPU{note}"
        for setting, n, note in options
        if n > best.gpu_layers
    ]
    if not advice:
        advice.append(
            _one_more(
                plan(best.gpu_layers + 1, n_slots, n_ctx, type_k, type_v), devices, headroom_bytes
            )
        )
    return LayerFit(best.gpu_layers, units, best, tuple(advice), free, headroom_bytes)


def _fits(placement: Placement, devices: Sequence[DeviceMemory], headroom_bytes: int) -> bool:
    try:
        check_fits([placement], devices, headroom_bytes)
    except GpuMemoryError:
        return False
    return True


def _value_bytes(type_name: str) -> float:
    block_bytes, block = KV_TYPE_BLOCKS[type_name]
    return block_bytes / block


def _one_more(placement: Placement, devices: Sequence[DeviceMemory], headroom_bytes: int) -> str:
    """The advice when no smaller KV cache gains a layer: what ``placement`` lacks."""
    budget = {d.index: d.free - headroom_bytes for d in devices}
    short, device = max((s.total - budget[s.device], s.device) for s in placement.shares)
    remedy = (
        "a smaller gpu_headroom_mib, if nothing else uses the GPU"
        if headroom_bytes >= short
        else "a GPU with more free memory"
    )
    return (
        f"- no smaller KV cache gains a layer: n_gpu_layers={placement.gpu_layers} needs about "
        f"{_mib(short)} MiB more on GPU {device}; a smaller quantization of the model, or {remedy}"
    )


@dataclass(frozen=True)
class Offload:
    """A worker's llama.cpp model and context parameters for its placement."""

    n_gpu_layers: int = 0
    split_mode: int = llama_cpp.LLAMA_SPLIT_MODE_LAYER
    main_gpu: int = 0
    tensor_split: tuple[float, ...] | None = None
    flash_attn: FlashAttn = "auto"
    offload_kqv: bool = True
    type_k: KvType = "f16"
    type_v: KvType = "f16"

    def __post_init__(self) -> None:
        if self.type_v not in ("f32", "f16", "bf16") and self.flash_attn == "off":
            raise ValueError(
                f"type_v={self.type_v} (a quantized V cache) needs flash attention: set "
                "flash_attn to auto or on, or type_v to f16"
            )
        if self.tensor_split is not None and len(self.tensor_split) > llama_cpp.LLAMA_MAX_DEVICES:
            raise ValueError(f"tensor_split names more than {llama_cpp.LLAMA_MAX_DEVICES} GPUs")

    def pinned(self, gpu: int) -> Offload:
        """The same parameters, with the whole model on GPU ``gpu`` (split mode none)."""
        return replace(
            self, split_mode=llama_cpp.LLAMA_SPLIT_MODE_NONE, main_gpu=gpu, tensor_split=None
        )

    def apply_model(self, params: llama_cpp.llama_model_params) -> Any:
        """Set ``params``; returns an object the caller keeps alive until the model is loaded."""
        params.n_gpu_layers = 0x7FFFFFFF if self.n_gpu_layers < 0 else self.n_gpu_layers
        params.split_mode = self.split_mode
        params.main_gpu = self.main_gpu
        if self.tensor_split is None:
            return None
        split = (ctypes.c_float * llama_cpp.LLAMA_MAX_DEVICES)(*self.tensor_split)
        params.tensor_split = split
        return split

    def apply_context(self, params: llama_cpp.llama_context_params) -> None:
        params.flash_attn_type = FLASH_ATTN_TYPES[self.flash_attn]
        params.offload_kqv = self.offload_kqv
        params.type_k = GGML_TYPE_IDS[self.type_k]
        params.type_v = GGML_TYPE_IDS[self.type_v]


# Devices


def gpu_devices() -> list[DeviceMemory]:
    """The GPUs llama.cpp can use, with free and total memory; none on a CPU-only build.

    Asking a CUDA device for its memory initializes CUDA in this process.
    """
    if not llama_cpp.llama_supports_gpu_offload():
        return []
    try:
        found = _ggml_gpus()
    except (OSError, AttributeError) as exc:
        logger.debug("ggml's device registry is not reachable: %s", exc)
        found = []
    return found or _nvidia_smi_gpus()


def resolve_workers(workers: int | Literal["auto"], gpu_count: int, n_gpu_layers: int) -> int:
    """The number of workers: ``auto`` is one per GPU when layers are offloaded, else one."""
    if workers != "auto":
        return workers
    return max(gpu_count, 1) if n_gpu_layers != 0 else 1


def _ggml_gpus() -> list[DeviceMemory]:
    from llama_cpp._ctypes_extensions import load_shared_library

    # The ggml library next to the libllama that llama_cpp loaded (LLAMA_CPP_LIB_PATH or its own).
    ggml = load_shared_library("ggml", llama_cpp.llama_cpp._base_path)
    ggml.ggml_backend_dev_count.restype = ctypes.c_size_t
    ggml.ggml_backend_dev_count.argtypes = []
    ggml.ggml_backend_dev_get.restype = ctypes.c_void_p
    ggml.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
    ggml.ggml_backend_dev_type.restype = ctypes.c_int
    ggml.ggml_backend_dev_type.argtypes = [ctypes.c_void_p]
    ggml.ggml_backend_dev_description.restype = ctypes.c_char_p
    ggml.ggml_backend_dev_description.argtypes = [ctypes.c_void_p]
    ggml.ggml_backend_dev_memory.restype = None
    ggml.ggml_backend_dev_memory.argtypes = [
        ctypes.c_void_p,
        ctypes.POINTER(ctypes.c_size_t),
        ctypes.POINTER(ctypes.c_size_t),
    ]
    by_type: dict[int, list[int]] = {_DEV_TYPE_GPU: [], _DEV_TYPE_IGPU: []}
    for i in range(ggml.ggml_backend_dev_count()):
        dev = ggml.ggml_backend_dev_get(i)
        kind = ggml.ggml_backend_dev_type(dev)
        if kind in by_type:
            by_type[kind].append(dev)
    # llama.cpp uses integrated GPUs only where there is no discrete one.
    devs = by_type[_DEV_TYPE_GPU] or by_type[_DEV_TYPE_IGPU]
    found: list[DeviceMemory] = []
    for index, dev in enumerate(devs):
        free, total = ctypes.c_size_t(), ctypes.c_size_t()
        ggml.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
        name = (ggml.ggml_backend_dev_description(dev) or b"").decode("utf-8", "replace")
        found.append(DeviceMemory(index, name, free.value, total.value))
    return found


def _nvidia_smi_gpus() -> list[DeviceMemory]:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return []
    try:
        out = subprocess.run(
            [
                exe,
                "--query-gpu=index,name,memory.free,memory.total",
                "--format=csv,noheader,nounits",
            ],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        logger.warning("nvidia-smi failed: %s", exc)
        return []
    devices = parse_nvidia_smi(out, os.environ.get("CUDA_VISIBLE_DEVICES"))
    if len({d.name for d in devices}) > 1 and os.environ.get("CUDA_DEVICE_ORDER") != "PCI_BUS_ID":
        logger.warning(
            "nvidia-smi numbers GPUs by PCI bus, CUDA fastest first: set "
            "CUDA_DEVICE_ORDER=PCI_BUS_ID so that the memory check reads the right GPUs"
        )
    return devices


def parse_nvidia_smi(out: str, visible: str | None = None) -> list[DeviceMemory]:
    """``nvidia-smi --query-gpu=index,name,memory.free,memory.total`` CSV → the visible GPUs,
    numbered as CUDA numbers them under ``CUDA_VISIBLE_DEVICES`` (numeric lists only)."""
    rows: dict[int, tuple[str, int, int]] = {}
    for line in out.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) != 4:
            continue
        try:
            rows[int(parts[0])] = (parts[1], int(parts[2]) * MIB, int(parts[3]) * MIB)
        except ValueError:
            continue
    order = sorted(rows)
    if visible is not None:
        try:
            order = [int(v) for v in visible.split(",") if v.strip()]
        except ValueError:
            pass  # UUIDs: keep nvidia-smi's order
    return [
        DeviceMemory(i, *rows[physical]) for i, physical in enumerate(p for p in order if p in rows)
    ]
