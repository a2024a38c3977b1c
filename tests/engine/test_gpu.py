"""GPU placement: the KV arithmetic against llama.cpp, refusals, workers per GPU, least-loaded
placement, quantized KV caches on the CPU; and, on a CUDA build, the real thing."""

from __future__ import annotations

import ctypes
import doctest
import logging
import queue
import re
import threading
from pathlib import Path
from typing import Any

import httpx
import llama_cpp
import pytest
from llama_cpp import _internals as internals
from llama_cpp._ctypes_extensions import load_shared_library
from make_tiny_gguf import write_tiny_gguf

from llamastream import create_app
from llamastream.config import Settings
from llamastream.engine import gpu
from llamastream.engine.gpu import (
    KV_PAD,
    KV_TYPE_BLOCKS,
    MIB,
    DeviceMemory,
    GpuMemoryError,
    LayerFit,
    ModelShape,
    Offload,
    Placement,
    check_fits,
    fit_gpu_layers,
    gpu_devices,
    kv_bytes_per_slot,
    kv_cells,
    parse_nvidia_smi,
    plan_placement,
    resolve_workers,
)
from llamastream.engine.pool import WorkerPool
from llamastream.engine.sampling import SamplingParams
from llamastream.engine.slots import SlotController
from llamastream.engine.worker import Event, Finished, Job, TextChunk, load_llama
from tests.conftest import LiveServer, wait_idle

GIB = 1 << 30
HAS_GPU = llama_cpp.llama_supports_gpu_offload()
needs_gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA build of llama.cpp")
# Llama-3-8B: 32 layers, 8 KV heads x 128; Q4_K_M is about 4.58 GiB.
LLAMA3_8B = ModelShape(32, 1024, 1024, model_bytes=4_920_000_000, head_k=128, head_v=128)


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model at 128 wide: heads of 32, a whole q8_0 block, so flash attention (and
    with it a quantized V cache) works on the CPU. The 64-wide one has heads of 16."""
    return write_tiny_gguf(tmp_path_factory.mktemp("wide") / "wide.gguf", n_embd=128)


@pytest.fixture(scope="module")
def gpu_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """256 wide: heads of 64, a size CUDA's flash attention kernels handle."""
    return write_tiny_gguf(tmp_path_factory.mktemp("gpu") / "gpu.gguf", n_embd=256)


def settings(model: Path, **changes: Any) -> Settings:
    base: dict[str, Any] = {
        "model_path": model,
        "num_of_concurrent_executions": 2,
        "n_ctx": 512,
        "max_new_tokens": 16,
        "n_threads": 1,
    }
    return Settings(**{**base, **changes})


def generate(pool: WorkerPool, slot: int = 0, n: int = 8) -> list[Event]:
    events: queue.Queue[Event] = queue.Queue()
    tokens = pool.tokenize(pool.template.render([{"role": "user", "content": "hi"}]))
    job = Job(tokens, SamplingParams(max_new_tokens=n, seed=1, ignore_eos=True), events.put)
    pool.submit(slot, job)
    assert job.done.wait(30)
    return list(events.queue)


# The arithmetic


def test_doc_examples() -> None:
    assert doctest.testmod(gpu).failed == 0


def test_type_table_matches_ggml() -> None:
    ggml = load_shared_library("ggml", llama_cpp.llama_cpp._base_path)
    ggml.ggml_type_size.restype = ctypes.c_size_t
    ggml.ggml_type_size.argtypes = [ctypes.c_int]
    ggml.ggml_blck_size.restype = ctypes.c_int64
    ggml.ggml_blck_size.argtypes = [ctypes.c_int]
    for name, (block_bytes, block) in KV_TYPE_BLOCKS.items():
        type_id = gpu.GGML_TYPE_IDS[name]
        assert (ggml.ggml_type_size(type_id), ggml.ggml_blck_size(type_id)) == (block_bytes, block)


def test_real_model_shapes() -> None:
    # Llama-3-8B at f16: K + V per token = 2 x 32 layers x 1024 x 2 bytes = 128 KiB.
    per_token = kv_bytes_per_slot(32, 1, 1024, 1024, "f16", "f16")
    assert per_token == 128 * 1024
    assert kv_bytes_per_slot(32, 8192, 1024, 1024, "f16", "f16") == GIB
    # q8_0 stores 32 values in 34 bytes: 68 KiB, not quite half.
    assert kv_bytes_per_slot(32, 1, 1024, 1024, "q8_0", "q8_0") == 68 * 1024
    assert kv_bytes_per_slot(32, 1, 1024, 1024, "q4_0", "q4_0") == 36 * 1024
    assert [kv_cells(n) for n in (64, 256, 257, 700, 8192)] == [256, 256, 512, 768, 8192]


def test_shape_from_metadata_agrees_with_the_loaded_model(tiny_model: Path) -> None:
    vocab = load_llama(str(tiny_model), vocab_only=True)
    shape = ModelShape.from_metadata(vocab.metadata, tiny_model.stat().st_size)
    vocab.close()
    model = internals.LlamaModel(
        path_model=str(tiny_model), params=llama_cpp.llama_model_default_params(), verbose=False
    )
    try:
        m = model.model
        head = llama_cpp.llama_model_n_embd(m) // llama_cpp.llama_model_n_head(m)
        width = head * llama_cpp.llama_model_n_head_kv(m)
        assert shape == ModelShape(
            llama_cpp.llama_model_n_layer(m), width, width, tiny_model.stat().st_size, head, head
        )
        assert shape.model_bytes >= llama_cpp.llama_model_size(m)  # the file: an upper bound
    finally:
        model.close()


def test_shape_from_metadata_variants() -> None:
    meta = {
        "general.architecture": "qwen3",
        "qwen3.block_count": "28",
        "qwen3.embedding_length": "1024",
        "qwen3.attention.head_count": "16",
        "qwen3.attention.head_count_kv": "[8, 8, 4]",
        "qwen3.attention.key_length": "128",
        "qwen3.attention.value_length": "96",
    }
    assert ModelShape.from_metadata(meta, 1) == ModelShape(28, 1024, 768, 1, 128, 96)
    assert ModelShape.from_metadata({"general.architecture": "rwkv"}, 1) is None
    assert ModelShape.from_metadata({}, 1) is None


def _seq_state_bytes(model: Path, type_k: str, n_tokens: int) -> int:
    """Bytes llama.cpp serializes for one sequence of ``n_tokens`` with this K cache type."""
    m = internals.LlamaModel(
        path_model=str(model), params=llama_cpp.llama_model_default_params(), verbose=False
    )
    params = llama_cpp.llama_context_default_params()
    params.n_ctx, params.n_batch, params.n_ubatch, params.n_threads = 256, 64, 64, 1
    params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
    params.type_k = gpu.GGML_TYPE_IDS[type_k]
    ctx = internals.LlamaContext(model=m, params=params, verbose=False)
    batch = internals.LlamaBatch(n_tokens=64, embd=0, n_seq_max=1)
    try:
        b = batch.batch
        for i in range(n_tokens):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = 10 + i, i, 1, i == n_tokens - 1
            b.seq_id[i][0] = 0
        b.n_tokens = n_tokens
        assert llama_cpp.llama_decode(ctx.ctx, b) == 0
        return int(llama_cpp.llama_state_seq_get_size(ctx.ctx, 0))
    finally:
        batch.close()
        ctx.close()
        m.close()


def test_kv_arithmetic_matches_what_llama_cpp_stores(tiny_model: Path) -> None:
    vocab = load_llama(str(tiny_model), vocab_only=True)
    shape = ModelShape.from_metadata(vocab.metadata, 0)
    vocab.close()
    assert shape is not None
    n = 40

    def estimate(type_k: str) -> int:
        return kv_bytes_per_slot(
            shape.n_layer, n, shape.n_embd_k_gqa, shape.n_embd_v_gqa, type_k, "f16"
        )

    f16, q8 = _seq_state_bytes(tiny_model, "f16", n), _seq_state_bytes(tiny_model, "q8_0", n)
    assert f16 - q8 == estimate("f16") - estimate("q8_0")
    # The rest of a sequence's state is its cells' positions and ids: a few bytes per token.
    assert estimate("f16") < f16 < estimate("f16") + 16 * n + 1024


# Placement and refusal


def test_placement_full_partial_and_split() -> None:
    full = plan_placement(
        0, LLAMA3_8B, n_slots=4, n_ctx=8192, n_gpu_layers=-1, devices=[0], split=None
    )
    assert full.gpu_layers == 33
    assert full.kv_bytes == 4 * GIB
    assert full.gpu_bytes == LLAMA3_8B.model_bytes + 4 * GIB
    assert full.host_bytes == 0
    assert "33/33 layers on GPU" in full.describe({0: "H100"})

    half = plan_placement(0, LLAMA3_8B, n_slots=4, n_ctx=8192, n_gpu_layers=16, devices=[0])
    (share,) = half.shares
    # as llama.cpp counts: the output layer and the last 15 of the 32 layers (with their KV)
    assert share.layers == 16 and share.kv_bytes == 4 * GIB * 15 // 32
    assert share.model_bytes == round(LLAMA3_8B.model_bytes * 16 / 33)

    no_kqv = plan_placement(
        0, LLAMA3_8B, n_slots=4, n_ctx=8192, n_gpu_layers=-1, devices=[0], offload_kqv=False
    )
    assert no_kqv.shares[0].kv_bytes == 0 and no_kqv.host_bytes == 4 * GIB

    split = plan_placement(
        0, LLAMA3_8B, n_slots=1, n_ctx=8192, n_gpu_layers=-1, devices=[0, 1], split=[3, 1]
    )
    assert [(s.device, s.layers) for s in split.shares] == [(0, 25), (1, 8)]
    assert sum(s.kv_bytes for s in split.shares) == GIB

    cpu = plan_placement(0, LLAMA3_8B, n_slots=2, n_ctx=4096, n_gpu_layers=-1, devices=[])
    assert cpu.shares == () and cpu.gpu_layers == 0 and cpu.host_bytes == cpu.model_bytes + GIB
    assert cpu.describe().startswith("worker 0 on CPU: 0/33 layers on GPU")


def _card(gib: float) -> DeviceMemory:
    return DeviceMemory(0, f"{gib:g} GB card", int(gib * GIB * 0.95), int(gib * GIB))


def test_refusal_says_what_to_change_and_each_suggestion_fits() -> None:
    def plan(**changes: Any) -> Placement:
        kwargs: dict[str, Any] = {
            "n_slots": 8,
            "n_ctx": 8192,
            "n_gpu_layers": -1,
            "devices": [0],
            "type_k": "f16",
            "type_v": "f16",
            **changes,
        }
        return plan_placement(0, LLAMA3_8B, **kwargs)

    card, headroom = _card(12), 512 * MIB
    check_fits([plan(n_ctx=4096)], [card], headroom)  # 4.6 + 8 x 0.5 GiB: fine
    with pytest.raises(GpuMemoryError) as refused:
        check_fits([plan()], [card], headroom)  # 4.6 + 8 x 1 GiB
    message = str(refused.value)
    assert "GPU 0 (12 GB card)" in message
    assert "gpu_headroom_mib" in message and "smaller quantization" in message
    slots = int(re.search(r"num_of_concurrent_executions=(\d+)", message)[1])  # type: ignore[index]
    n_ctx = int(re.search(r"n_ctx=(\d+)", message)[1])  # type: ignore[index]
    layers = int(re.search(r"n_gpu_layers=(\d+)", message)[1])  # type: ignore[index]
    assert "type_k=q8_0 and type_v=q8_0" in message
    assert (slots, n_ctx, layers) == (6, 6400, 28)
    check_fits([plan(type_k="q8_0", type_v="q8_0")], [card], headroom)
    check_fits([plan(n_slots=slots)], [card], headroom)
    check_fits([plan(n_ctx=n_ctx)], [card], headroom)
    check_fits([plan(n_gpu_layers=layers)], [card], headroom)
    with pytest.raises(GpuMemoryError):
        check_fits([plan(n_slots=slots + 1)], [card], headroom)


def test_refusal_sums_workers_sharing_a_gpu_and_names_a_missing_one() -> None:
    one = plan_placement(0, LLAMA3_8B, n_slots=1, n_ctx=4096, n_gpu_layers=-1, devices=[0])
    card = _card(8)
    check_fits([one], [card], 512 * MIB)
    with pytest.raises(GpuMemoryError, match="GPU 0"):
        check_fits([one, one], [card], 512 * MIB)  # two model copies on one card
    other = plan_placement(1, LLAMA3_8B, n_slots=1, n_ctx=4096, n_gpu_layers=-1, devices=[1])
    with pytest.raises(GpuMemoryError, match=r"GPU 1 is planned for but llama.cpp sees 1 GPU\("):
        check_fits([one, other], [card], 512 * MIB)


# Choosing n_gpu_layers


def _refit(devices: list[DeviceMemory], **kwargs: Any) -> LayerFit:
    return fit_gpu_layers(0, LLAMA3_8B, devices, headroom_bytes=512 * MIB, **kwargs)


def _assert_most_layers(fit: LayerFit, devices: list[DeviceMemory], **kwargs: Any) -> None:
    """``fit.layers`` fits and one more does not, as `check_fits` says (split by free memory)."""
    split = kwargs.pop("split", None) or [d.free for d in devices]

    def plan(n: int) -> Placement:
        indices = [d.index for d in devices]
        return plan_placement(0, LLAMA3_8B, n_gpu_layers=n, devices=indices, split=split, **kwargs)

    assert fit.placement == plan(fit.layers)
    check_fits([fit.placement], devices, 512 * MIB)
    if fit.layers < fit.units:
        with pytest.raises(GpuMemoryError):
            check_fits([plan(fit.layers + 1)], devices, 512 * MIB)


def _assert_advice_holds(fit: LayerFit, devices: list[DeviceMemory], **kwargs: Any) -> None:
    """Each advised setting, refitted, puts the layers it says on the GPU."""
    assert fit.advice
    for line in fit.advice:
        claim = re.search(r"would put (?:all (\d+)|(\d+)/\d+) layers on the GPU", line)
        assert claim is not None, line
        layers = int(claim[1] or claim[2])
        assert layers > fit.layers
        changed = dict(kwargs)
        for key, value in re.findall(r"(type_k|type_v|n_ctx)=(\w+)", line):
            changed[key] = int(value) if key == "n_ctx" else value
        if slots := re.match(r"- (\d+) slots? instead of", line):
            changed["n_slots"] = int(slots[1])
        assert changed != kwargs, line
        assert _refit(devices, **changed).layers == layers, line
        # the longest context and the most slots that fit everything: one step more does not
        if layers == fit.units and "n_ctx=" in line:
            more = {**changed, "n_ctx": changed["n_ctx"] + KV_PAD}
            assert _refit(devices, **more).layers < fit.units
        if layers == fit.units and slots:
            assert _refit(devices, **{**changed, "n_slots": int(slots[1]) + 1}).layers < fit.units


def test_fit_puts_everything_on_a_big_gpu_and_nothing_without_one() -> None:
    big = [_card(80)]
    fit = _refit(big, n_slots=4, n_ctx=8192)
    assert (fit.layers, fit.units, fit.advice) == (33, 33, ())
    assert fit.placement.host_bytes == 0
    assert fit.describe().startswith("n_gpu_layers auto: 33/33 layers on GPU (8,788.1 MiB of ")
    assert fit.describe().endswith("less 512.0 MiB headroom): everything fits")

    cpu = _refit([], n_slots=4, n_ctx=8192)
    assert (cpu.layers, cpu.units, cpu.advice, cpu.placement.shares) == (0, 33, (), ())
    assert (
        cpu.describe() == "n_gpu_layers auto: 0/33 layers on GPU: no GPU, the model runs on the CPU"
    )


def test_fit_on_a_gpu_that_holds_half_says_what_would_fit_more() -> None:
    card = [_card(8)]  # 7.6 GiB free: the 4.6 GiB model and 8 GiB of KV cache do not fit
    kwargs: dict[str, Any] = {"n_slots": 4, "n_ctx": 16384}
    fit = _refit(card, **kwargs)
    assert fit.layers == 18
    _assert_most_layers(fit, card, **kwargs)
    assert fit.advice == (
        "- type_k=q8_0 type_v=q8_0 would put 26/33 layers on the GPU "
        "(a quantized V cache needs flash_attn auto or on)",
        "- n_ctx=5120 would put all 33 layers on the GPU",
        "- 1 slot instead of 4 would put all 33 layers on the GPU",
    )
    _assert_advice_holds(fit, card, **kwargs)
    first, *rest = fit.describe().splitlines()
    assert first == (
        "n_gpu_layers auto: 18/33 layers on GPU (6,911.3 MiB of 7,782.4 MiB free less 512.0 MiB "
        "headroom); the other 15 run on the CPU, slower; for more, any of:"
    )
    assert tuple(rest) == fit.advice
    # a setting already at its smallest is not advised; a q4_0 K cache stays as it is
    quantized: dict[str, Any] = {"n_slots": 1, "n_ctx": 65536, "type_k": "q4_0", "type_v": "q8_0"}
    small = _refit(card, **quantized)
    assert 0 < small.layers < 33
    assert len(small.advice) == 1 and small.advice[0].startswith("- n_ctx=")
    _assert_advice_holds(small, card, **quantized)
    # without offload_kqv the KV cache stays in host memory: no KV setting gains a layer
    no_kqv = _refit([_card(4)], n_slots=4, n_ctx=16384, offload_kqv=False)
    assert 0 < no_kqv.layers < 33
    assert no_kqv.advice[0].startswith("- no smaller KV cache gains a layer")


def test_fit_over_two_gpus_splits_by_free_memory_or_tensor_split() -> None:
    cards = [DeviceMemory(0, "A", 6 * GIB, 8 * GIB), DeviceMemory(1, "B", 2 * GIB, 4 * GIB)]
    kwargs: dict[str, Any] = {"n_slots": 4, "n_ctx": 16384}
    fit = _refit(cards, **kwargs)
    assert [(s.device, s.layers) for s in fit.placement.shares] == [(0, 14), (1, 4)]
    _assert_most_layers(fit, cards, **kwargs)
    _assert_advice_holds(fit, cards, **kwargs)
    assert "6,144.0 + 2,048.0 MiB free less 512.0 MiB headroom each" in fit.describe()
    # an even split fills the small card first
    even = _refit(cards, split=[1, 1], **kwargs)
    assert even.layers < fit.layers
    a, b = (s.layers for s in even.placement.shares)
    assert a + b == even.layers and abs(a - b) <= 1
    _assert_most_layers(even, cards, split=[1, 1], **kwargs)
    _assert_advice_holds(even, cards, split=[1, 1], **kwargs)
    assert _refit(cards, n_slots=1, n_ctx=4096).advice == ()


def test_fit_on_a_gpu_too_small_for_one_layer_runs_on_the_cpu() -> None:
    # llama.cpp offloads the output layer first (no KV cache): 142 MiB of weights
    tiny = [DeviceMemory(0, "Tiny", 640 * MIB, 1024 * MIB)]
    fit = _refit(tiny, n_slots=4, n_ctx=8192)
    assert (fit.layers, fit.placement.shares) == (0, ())
    _assert_most_layers(fit, tiny, n_slots=4, n_ctx=8192)
    assert fit.advice == (
        "- no smaller KV cache gains a layer: n_gpu_layers=1 needs about 14.2 MiB more on GPU 0; "
        "a smaller quantization of the model, or a smaller gpu_headroom_mib, if nothing else "
        "uses the GPU",
    )
    assert fit.describe().startswith(
        "n_gpu_layers auto: 0/33 layers on GPU (640.0 MiB free less 512.0 MiB headroom): not even "
        "one layer fits, the model runs on the CPU; to offload layers, any of:\n- no smaller"
    )
    smaller = [DeviceMemory(0, "Tiny", 100 * MIB, 1024 * MIB)]
    none = fit_gpu_layers(0, LLAMA3_8B, smaller, n_slots=4, n_ctx=8192)
    assert none.layers == 0 and none.advice[0].endswith("or a GPU with more free memory")


def test_offload_parameters_reach_llama_cpp() -> None:
    offload = Offload(
        n_gpu_layers=-1,
        tensor_split=(3.0, 1.0),
        flash_attn="on",
        offload_kqv=False,
        type_k="q8_0",
        type_v="q4_0",
    )
    model = llama_cpp.llama_model_default_params()
    keep = offload.apply_model(model)
    assert model.n_gpu_layers == 0x7FFFFFFF
    assert model.split_mode == llama_cpp.LLAMA_SPLIT_MODE_LAYER
    assert [model.tensor_split[i] for i in range(3)] == [3.0, 1.0, 0.0]
    del keep
    ctx = llama_cpp.llama_context_default_params()
    offload.apply_context(ctx)
    assert ctx.flash_attn_type == llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
    assert not ctx.offload_kqv
    assert (ctx.type_k, ctx.type_v) == (llama_cpp.GGML_TYPE_Q8_0, llama_cpp.GGML_TYPE_Q4_0)
    pinned = offload.pinned(2)
    assert (pinned.split_mode, pinned.main_gpu, pinned.tensor_split) == (
        llama_cpp.LLAMA_SPLIT_MODE_NONE,
        2,
        None,
    )
    assert pinned.apply_model(model) is None and model.main_gpu == 2


def test_quantized_v_without_flash_attention_is_refused(tiny_model: Path) -> None:
    with pytest.raises(ValueError, match=r"type_v=q8_0 .*needs flash attention"):
        WorkerPool(settings(tiny_model, type_v="q8_0", flash_attn="off"))
    WorkerPool(settings(tiny_model, type_k="q8_0", flash_attn="off"))  # a quantized K is fine


def test_nvidia_smi_parsing() -> None:
    out = "0, NVIDIA H100 80GB HBM3, 80000, 81559\n1, NVIDIA L4, 20000, 23034\n"
    assert parse_nvidia_smi(out) == [
        DeviceMemory(0, "NVIDIA H100 80GB HBM3", 80000 * MIB, 81559 * MIB),
        DeviceMemory(1, "NVIDIA L4", 20000 * MIB, 23034 * MIB),
    ]
    assert parse_nvidia_smi(out, "1") == [DeviceMemory(0, "NVIDIA L4", 20000 * MIB, 23034 * MIB)]
    assert parse_nvidia_smi("garbage\n") == []


# Workers


def test_workers_resolution() -> None:
    assert resolve_workers("auto", 0, -1) == 1
    assert resolve_workers("auto", 4, -1) == 4
    assert resolve_workers("auto", 4, 0) == 1  # nothing offloaded: one CPU worker
    assert resolve_workers(3, 1, -1) == 3


@pytest.mark.skipif(HAS_GPU, reason="a CPU-only build")
async def test_auto_is_one_worker_on_a_cpu_build(
    tiny_model: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert len(gpu_devices()) == 0
    caplog.set_level(logging.INFO, logger="llamastream")
    pool = WorkerPool(settings(tiny_model, workers="auto", n_gpu_layers=-1))
    await pool.start()
    try:
        assert len(pool.workers) == 1
        assert "this llama.cpp build has no GPU support" in caplog.text
        assert "worker 0 on CPU: 0/3 layers on GPU" in caplog.text
        assert "x 2 slots" in caplog.text
        assert any(isinstance(e, TextChunk) for e in generate(pool))
    finally:
        await pool.stop()


def test_several_gpus_pin_a_worker_each_or_split_one_worker(
    tiny_model: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="llamastream")
    vocab = load_llama(str(tiny_model), vocab_only=True)
    meta = vocab.metadata
    vocab.close()
    cards = [DeviceMemory(0, "A", 3 * GIB, 4 * GIB), DeviceMemory(1, "B", 1 * GIB, 4 * GIB)]
    pool = WorkerPool(settings(tiny_model, workers="auto", n_gpu_layers=-1, tensor_split=[1, 1]))
    pool._build_workers(meta, cards)  # plans and workers only: nothing is loaded
    assert [(w.offload.main_gpu, w.offload.split_mode) for w in pool.workers] == [
        (0, llama_cpp.LLAMA_SPLIT_MODE_NONE),
        (1, llama_cpp.LLAMA_SPLIT_MODE_NONE),
    ]
    assert [[(s.device, s.layers) for s in p.shares] for p in pool.placements] == [
        [(0, 3)],
        [(1, 3)],
    ]
    assert "tensor_split is ignored" in caplog.text
    assert "worker 1 on GPU 1 (B): 3/3 layers on GPU" in caplog.text
    # One worker over two GPUs: llama.cpp's layer split, by free memory unless tensor_split.
    one = WorkerPool(settings(tiny_model, n_gpu_layers=-1))
    one._build_workers(meta, cards)
    assert one.workers[0].offload.split_mode == llama_cpp.LLAMA_SPLIT_MODE_LAYER
    assert [(s.device, s.layers) for s in one.placements[0].shares] == [(0, 3)]  # 3:1 of 3 units
    even = WorkerPool(settings(tiny_model, n_gpu_layers=-1, tensor_split=[1, 1]))
    even._build_workers(meta, cards)
    assert [(s.device, s.layers) for s in even.placements[0].shares] == [(0, 2), (1, 1)]


async def test_start_refuses_a_plan_that_cannot_fit(
    tiny_model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tiny_card = DeviceMemory(0, "Tiny GPU", 520 * MIB, 1024 * MIB)
    monkeypatch.setattr("llamastream.engine.pool.gpu_devices", lambda: [tiny_card])
    pool = WorkerPool(settings(tiny_model, n_gpu_layers=-1, n_ctx=65536, max_new_tokens=16))
    with pytest.raises(GpuMemoryError, match=r"do not fit on GPU 0 \(Tiny GPU\)") as refused:
        await pool.start()
    assert "n_ctx=" in str(refused.value)
    assert pool.workers == [] and pool._vocab is None  # nothing loaded is left behind


async def test_least_loaded_worker_takes_new_conversations(tiny_model: Path) -> None:
    pool = WorkerPool(settings(tiny_model, num_of_concurrent_executions=4, workers=2))
    await pool.start()
    try:
        assert [w.n_slots for w in pool.workers] == [2, 2]  # slots 0, 1 | 2, 3
        slots = SlotController(4, 4)
        new = [1, 2, 3]

        def reserve() -> int:
            ticket = slots.reserve(prefer=pool.best_slot(new, slots.free_slots()))
            assert ticket.slot is not None
            return ticket.slot

        first, second = reserve(), reserve()
        assert {pool._slot_place[s][0].index for s in (first, second)} == {0, 1}
        assert pool.least_loaded([1, 3]) == 1  # a tie: the slot free the longest
        assert pool.least_loaded([3, 1]) == 3
        assert pool.least_loaded([0, 1, 3]) == 0  # worker 0 idle, worker 1 one busy
        # A slot whose cache holds the prompt still wins over the load.
        pool.workers[1]._cached[1] = [5, 6, 7]
        assert pool.best_slot([5, 6, 7, 8], [0, 1, 3]) == 3
    finally:
        await pool.stop()


async def test_new_conversations_join_the_busy_slots_of_their_worker(tiny_model: Path) -> None:
    """Of the least loaded worker's free slots, one next to its busy ones (a step computes
    each run of consecutive busy slots apart); slots of another worker are no neighbours."""
    pool = WorkerPool(settings(tiny_model, num_of_concurrent_executions=6, workers=2))
    await pool.start()
    try:
        assert [w.n_slots for w in pool.workers] == [3, 3]  # slots 0, 1, 2 | 3, 4, 5
        # Busy: 0 (worker 0) and 3 (worker 1). Slot 2 is free the longest, but its only
        # neighbour of its worker (1) is free; 3, next to it, is another worker's.
        assert pool.least_loaded([2, 1, 4, 5]) == 1
        assert pool.least_loaded([2, 5, 4]) == 4  # worker 1's 4 is next to its busy 3
        # A slot freed recently goes last of those next to busy ones: 1 is passed over for
        # 4, but taken when the other choice (2) would add a run.
        assert pool.least_loaded([2, 1, 4, 5], recent={1}) == 4
        assert pool.least_loaded([1, 2], recent={1}) == 1
    finally:
        await pool.stop()


# Quantized KV caches on the CPU


async def test_q8_0_keys_load_and_generate_on_the_cpu(tiny_model: Path) -> None:
    # heads of 16 hold half a q8_0 block: llama.cpp allows that only without flash attention
    pool = WorkerPool(settings(tiny_model, type_k="q8_0"))
    with pytest.raises(ValueError, match=r"head size \(16\) under flash attention: set flash"):
        await pool.start()
    assert pool.workers == [] and pool._vocab is None
    pool = WorkerPool(settings(tiny_model, type_k="q8_0", flash_attn="off"))
    await pool.start()
    try:
        events = generate(pool)
        assert events[-1] == Finished("length", events[-1].prompt_tokens, 8)  # type: ignore[union-attr]
    finally:
        await pool.stop()


async def test_q8_0_values_need_a_head_size_flash_attention_supports(
    tiny_model: Path, wide_model: Path
) -> None:
    pool = WorkerPool(settings(tiny_model, type_k="f16", type_v="q8_0"))
    with pytest.raises(ValueError, match=r"type_v=q8_0 .* head size \(16\) .*: use type_v=f16"):
        await pool.start()  # heads of 16: no flash attention, so no q8_0 V cache
    assert pool.workers == []
    pool = WorkerPool(settings(wide_model, type_k="q8_0", type_v="q8_0"))
    await pool.start()
    try:
        assert isinstance(generate(pool)[-1], Finished)
    finally:
        await pool.stop()


# On a CUDA build


@pytest.mark.gpu
@needs_gpu
async def test_gpu_full_offload_is_logged_and_generates(
    tiny_model: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="llamastream")
    assert len(gpu_devices()) >= 1
    pool = WorkerPool(settings(tiny_model, n_gpu_layers=-1, num_of_concurrent_executions=4))
    await pool.start()
    try:
        assert "worker 0 on GPU 0" in caplog.text
        assert "3/3 layers on GPU" in caplog.text
        assert pool.placements[0].host_bytes == 0
        events = generate(pool, n=16)
        assert events[-1] == Finished("length", events[-1].prompt_tokens, 16)  # type: ignore[union-attr]
    finally:
        await pool.stop()


@pytest.mark.gpu
@needs_gpu
async def test_gpu_quantized_kv_with_flash_attention(gpu_model: Path) -> None:
    pool = WorkerPool(settings(gpu_model, n_gpu_layers=-1, type_k="q8_0", type_v="q8_0"))
    await pool.start()
    try:
        assert isinstance(generate(pool)[-1], Finished)
    finally:
        await pool.stop()


@pytest.mark.gpu
@needs_gpu
async def test_gpu_auto_workers_pin_one_per_gpu(tiny_model: Path) -> None:
    count = len(gpu_devices())
    pool = WorkerPool(
        settings(tiny_model, n_gpu_layers=-1, workers="auto", num_of_concurrent_executions=8)
    )
    await pool.start()
    try:
        assert len(pool.workers) == min(count, 8)
        if count > 1:
            assert [w.offload.main_gpu for w in pool.workers] == list(range(min(count, 8)))
            assert {w.offload.split_mode for w in pool.workers} == {llama_cpp.LLAMA_SPLIT_MODE_NONE}
        for slot in range(0, 8, 8 // len(pool.workers)):
            assert isinstance(generate(pool, slot)[-1], Finished)
    finally:
        await pool.stop()


@pytest.mark.gpu
@needs_gpu
@pytest.mark.timeout(60)
def test_gpu_chat_streams_through_a_real_server_with_batched_slots(
    settings_kwargs: dict[str, Any],
) -> None:
    app = create_app(**{**settings_kwargs, "n_gpu_layers": -1, "num_of_concurrent_executions": 4})
    results: list[tuple[int, bytes]] = []
    lock = threading.Lock()
    with LiveServer(app) as live:

        def chat() -> None:
            with live.client() as client:  # its own session
                with client.stream("POST", "/chat_stream", json={"user_input": "hello"}) as r:
                    body = b"".join(r.iter_raw())
                with lock:
                    results.append((r.status_code, body))

        threads = [threading.Thread(target=chat) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert [status for status, _ in results] == [200] * 4
        assert all(body for _, body in results)
        with live.client() as probe:
            wait_idle(probe)
            assert httpx.get(f"{live.url}/health", timeout=5).status_code == 200
