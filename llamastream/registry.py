"""Several models in one server: each configured model with its own slots, queue and runner,
loaded when a request names it and unloaded when idle or when another needs its memory.

A `ServedModel` is one configured model: the per-model face the routes use (admission,
tokenizing, thinking, its settings) and its state (unloaded, loading, loaded, failed,
unloading). The `ModelRegistry` loads models on demand (one load at a time), makes room for
them under the memory budget by unloading idle models least recently used first, never unloads
a model with running, queued or arriving requests, and unloads idle models after their
``keep_alive_s``.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import anyio.to_thread

from llamastream.chat.reasoning import ReasoningBudget, Thinking, think_tags
from llamastream.config import Settings
from llamastream.engine.gpu import MIB, GpuMemoryError
from llamastream.engine.pool import WorkerPool
from llamastream.engine.sampling import SamplingParams
from llamastream.engine.slots import SlotController, Ticket
from llamastream.engine.states import StateStore, model_fingerprint
from llamastream.engine.worker import StepTimes
from llamastream.errors import (
    LlamaStreamError,
    ModelNotFoundError,
    ModelUnavailableError,
    QueueFullError,
)
from llamastream.metrics import Metrics
from llamastream.streaming import Run, Runner, WatchedStreamResponse

logger = logging.getLogger(__name__)

State = Literal["unloaded", "loading", "loaded", "failed", "unloading"]
_TICK_S = 0.25  # how often keep-alive expiry and memory waits are looked at
_RETRY_FAILED_S = 5.0  # a load that failed for good is not tried again for this long


@dataclass(frozen=True)
class ModelSpec:
    """A configured model: its id, the other names it answers to, and its settings."""

    name: str
    aliases: tuple[str, ...]
    settings: Settings
    preset: str | None = None  # fetched into models_dir on the first load


def model_specs(settings: Settings) -> list[ModelSpec]:
    """Every model ``settings`` configures, the default first: ``model_path``'s (when set),
    then ``models``, then the GGUF files of ``models_dir`` (``serve_models_dir``)."""
    specs: list[ModelSpec] = []
    if settings.model_path is not None:
        name = settings.model_alias or Path(settings.model_path).stem
        specs.append(ModelSpec(name, tuple(settings.model_aliases), settings))
    for model in settings.models:
        own = Settings.merged(
            settings,
            model_path=model.model_path,
            model_alias=model.name,
            model_aliases=model.aliases,
            models=[],
            **model.overrides(),
        )
        specs.append(ModelSpec(model.name, tuple(model.aliases), own, model.preset))
    if settings.serve_models_dir and settings.models_dir.is_dir():
        paths = {Path(s.settings.model_path or "").resolve() for s in specs}
        for path in sorted(settings.models_dir.glob("*.gguf")):
            if path.resolve() not in paths:
                own = Settings.merged(settings, model_path=path, model_alias=None, models=[])
                specs.append(ModelSpec(path.stem, (), own))
    names: set[str] = set()
    for spec in specs:
        taken = names & {spec.name, *spec.aliases}
        if taken:
            raise ValueError(f"models: the name {sorted(taken)[0]!r} is given to two models")
        names |= {spec.name, *spec.aliases}
    return specs


class ServedModel:
    """One configured model: its slots and queue (which exist while it is unloaded too), its
    worker pool and runner, its state, and what the routes ask of it."""

    def __init__(self, spec: ModelSpec, metrics: Metrics) -> None:
        self.spec = spec
        self.name = spec.name
        self.settings = spec.settings
        settings = spec.settings
        self.slots = SlotController(settings.num_of_concurrent_executions, settings.max_queue_size)
        self.pool = WorkerPool(settings)
        self.runner = Runner(
            self.pool,
            max_queue_wait_s=settings.max_queue_wait_s,
            max_generation_s=settings.max_generation_s,
            metrics=metrics,
            model=self.name,
        )
        metrics.add_model(
            self.name,
            self.slots,
            lambda: self.state == "loaded",
            steps=lambda: self.step_times(),
        )
        self.state: State = "unloaded"
        self.error: str | None = None  # why the last load failed
        self.leases = 0  # requests between naming the model and holding a slot ticket
        self.last_used = time.monotonic()
        self.keep_alive_s = settings.keep_alive_s  # the last request's, else the configured
        self.loaded_for_s: float | None = None  # how long the last load took
        self.memory: tuple[int, int] = (0, 0)  # (host, GPU) bytes planned while loaded
        self.transition: asyncio.Task[None] | None = None  # a load or unload under way
        self.failed_at = -math.inf  # when the last load failed
        self.retry_after: int | None = None  # the last failure's Retry-After (None: permanent)
        self._closing: dict[str, tuple[int, ...]] = {}  # reasoning tags' closing tokens
        self._times = StepTimes()  # the steps of the workers of earlier loads

    # what the routes use

    @property
    def model_id(self) -> str:
        """The id the APIs serve the model under."""
        return self.name

    @property
    def model_names(self) -> set[str]:
        """The names a request may give the model by: its id and its aliases."""
        return {self.name, *self.spec.aliases}

    @property
    def loaded(self) -> bool:
        return self.state == "loaded"

    def admit(self, tokens: list[int], count: int = 1) -> Ticket:
        """A place for a prompt (``count`` slots for as many candidates): preferably the free
        slot whose cache holds most of it, else a place in the queue, else `QueueFullError`
        (429)."""
        prefer = self.pool.best_slot(tokens, self.slots.free_slots(), self.slots.recently_freed())
        return self.slots.reserve(prefer=prefer, count=count)

    def respond(self, run: Run) -> WatchedStreamResponse:
        """The response that runs an admitted request and streams it in its framing."""
        return self.runner.response(run)

    @property
    def fingerprint(self) -> str:
        """OpenAI's ``system_fingerprint``: the model file and the llama.cpp build."""
        return f"fp_{self.pool.fingerprint[:12]}"

    def default_params(self) -> SamplingParams:
        """The model's default sampling parameters."""
        return SamplingParams.from_settings(self.settings)

    def thinking(self, prompt: str, budget: int | None = None) -> Thinking | None:
        """How the model thinks in its reply to ``prompt`` (None: its template does not
        think); ``budget`` in tokens over the ``reasoning_budget`` setting (-1: none)."""
        tags = think_tags(self.pool.template.source)
        if tags is None:
            return None
        limit = self.settings.reasoning_budget if budget is None else budget
        inside = tags.opened_by(prompt)
        held = None
        if limit >= 0:
            close = self._closing.get(tags.close)
            if close is None:
                close = tuple(self.pool.tokenize_piece(f"\n{tags.close}\n\n"))
                self._closing[tags.close] = close
            held = ReasoningBudget(tags, limit, close, inside)
        return Thinking(tags, inside, self.pool.is_control(tags.open), held)

    async def tokenize(self, text: str) -> list[int]:
        """Prompt text → tokens, off the event loop."""
        return await anyio.to_thread.run_sync(self.pool.tokenize, text)

    def load(self) -> dict[str, int]:
        """Busy and waiting requests, and their limits."""
        load = self.slots.load()
        return {
            "processing": load.processing,
            "waiting": load.waiting,
            "max_processing": load.max_processing,
            "max_waiting": load.max_waiting,
        }

    def step_times(self) -> StepTimes:
        """What the decode steps took and drafted since the server started."""
        return self._times + self.pool.step_times()

    # use and state

    def busy(self) -> bool:
        """Whether requests run on it, wait for it, or are on their way to its queue."""
        load = self.slots.load()
        return bool(self.leases or load.processing or load.waiting or self.runner.active)

    def describe(self) -> dict[str, Any]:
        """The admin listing's entry: state, memory, slots, queue, placement."""
        host, gpu = self.memory
        load = self.load()
        entry: dict[str, Any] = {
            "id": self.name,
            "aliases": list(self.spec.aliases),
            "state": self.state,
            "model_path": str(self.settings.model_path or ""),
            "n_ctx": self.settings.n_ctx,
            "slots": load["max_processing"],
            "processing": load["processing"],
            "waiting": load["waiting"] + (self.leases if not self.loaded else 0),
            "max_waiting": load["max_waiting"],
            "keep_alive_s": self.keep_alive_s,
            "idle_s": None if self.busy() else round(time.monotonic() - self.last_used, 3),
            "memory_mib": {"host": round(host / MIB, 1), "gpu": round(gpu / MIB, 1)},
            "n_gpu_layers": self.settings.n_gpu_layers,
            "placement": [p.describe() for p in self.pool.placements],
            "load_seconds": self.loaded_for_s,
        }
        if self.pool.layer_fit is not None:
            entry["gpu_layers_chosen"] = self.pool.layer_fit.layers
            entry["gpu_layers_advice"] = list(self.pool.layer_fit.advice)
        if self.error is not None:
            entry["error"] = self.error
        return entry

    async def _prepare(self, reserved: dict[int, int]) -> None:
        """Resolve a preset's file (downloading it once) and plan the pool beside the GPU
        bytes other models hold (``reserved``): nothing loaded."""
        if self.settings.model_path is None and self.spec.preset is not None:
            from llamastream.download import fetch

            path = await anyio.to_thread.run_sync(fetch, self.spec.preset, self.settings.models_dir)
            self.settings = self.settings.model_copy(update={"model_path": path})
            self.pool = self.runner.pool = WorkerPool(self.settings)
        path = Path(self.settings.model_path or "")
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such model file")
        await self.pool.plan(reserved)
        self.memory = self.pool.memory()

    def gpu_short(self) -> bool:
        """Planned with fewer layers on the GPU than the model has (n_gpu_layers auto)."""
        fit = self.pool.layer_fit
        return fit is not None and fit.layers < fit.units

    def discard_saved(self, key: str) -> None:
        """Drop the conversation's KV cache saved on disk for this model while it is not
        loaded (blocking: call it from a thread)."""
        path = self.settings.model_path
        if self.settings.kv_state_bytes <= 0 or path is None or not path.is_file():
            return
        fingerprint = model_fingerprint(path, self.settings.type_k, self.settings.type_v)
        store = StateStore(self.settings.session_dir / "kv-states", fingerprint, ram_bytes=0)
        try:
            store.discard(key)
        finally:
            store.close()

    async def _launch(self) -> None:
        try:
            await self.pool.launch()
            await anyio.to_thread.run_sync(self.thinking, "")  # the closing tag's tokens, once
        except BaseException:
            await self.pool.stop()
            raise

    async def _unload(self) -> None:
        self._closing.clear()
        workers = list(self.pool.workers)
        try:
            await self.pool.stop()
        finally:
            # Counted here once the pool has let them go (until then it counts them): the
            # counters never go back, nor count twice.
            if not self.pool.workers:
                self._times = sum((w.times for w in workers), self._times)
        self.memory = (0, 0)


class ModelRegistry:
    """The configured models, the default first; loads on demand, room under the memory
    budget, keep-alive expiry."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.models = [ServedModel(spec, metrics) for spec in model_specs(settings)]
        if not self.models:
            raise ValueError("no model is configured (model_path, models or serve_models_dir)")
        self.by_name = {n: m for m in self.models for n in m.model_names}
        self._load_lock = asyncio.Lock()
        self._reaper: asyncio.Task[None] | None = None
        self.closing = False  # set by stop(): no more loads

    @property
    def default(self) -> ServedModel:
        return self.models[0]

    def get(self, name: str | None) -> ServedModel:
        """The model a request names (None: the default); 404 naming ``model`` otherwise."""
        if name is None:
            return self.default
        model = self.by_name.get(name)
        if model is None:
            known = ", ".join(repr(m.name) for m in self.models)
            raise ModelNotFoundError(
                f"the model {name!r} does not exist; this server serves {known}", field="model"
            )
        return model

    @asynccontextmanager
    async def use(
        self, name: str | None, keep_alive_s: float | None = None
    ) -> AsyncIterator[ServedModel]:
        """The named model, loaded (waiting in its own bounded queue while it loads: 429
        when that is full, 503 when the load fails); it is not unloaded while the block runs,
        nor afterwards while the slot ticket taken in it lives."""
        model = self.get(name)
        if not model.loaded:
            cap = model.settings.num_of_concurrent_executions + model.settings.max_queue_size
            if model.leases >= cap:
                raise QueueFullError(
                    5,
                    f"the model {model.name!r} is loading and its wait queue is full",
                )
        model.leases += 1
        model.keep_alive_s = model.settings.keep_alive_s if keep_alive_s is None else keep_alive_s
        try:
            await self.ensure_loaded(model)
            yield model
        finally:
            model.leases -= 1
            model.last_used = time.monotonic()

    async def ensure_loaded(self, model: ServedModel, *, original: bool = False) -> None:
        """Load ``model`` unless it is; `ModelUnavailableError` (503) naming it when that
        fails (``original``: the load's own exception, as at start-up)."""
        while not model.loaded:
            if self.closing:
                raise ModelUnavailableError(
                    "the server is shutting down", field="model", retry_after=5
                )
            recent = time.monotonic() - model.failed_at < _RETRY_FAILED_S
            permanent = model.retry_after is None
            if model.transition is None and model.state == "failed" and recent and permanent:
                raise self._unavailable(model)  # failed for good just now: not tried at once
            if model.transition is None:
                model.transition = asyncio.ensure_future(self._load(model))
            task = model.transition
            try:
                await asyncio.shield(task)
            except Exception:
                if original:
                    raise
            if model.state == "failed":
                raise self._unavailable(model)

    def _unavailable(self, model: ServedModel) -> ModelUnavailableError:
        """The 503 of a failed load; Retry-After only when waiting can help (busy models
        held the memory), not for a missing file or a model too big even alone."""
        return ModelUnavailableError(
            f"the model {model.name!r} could not be loaded: {model.error}",
            field="model",
            retry_after=model.retry_after,
        )

    async def forget(self, key: str) -> None:
        """Drop a conversation's saved KV caches, of every model, loaded or not."""
        for model in self.models:
            if model.loaded:
                model.leases += 1  # not unloaded meanwhile
                try:
                    await model.pool.forget(key)
                finally:
                    model.leases -= 1
            elif model.state in ("unloaded", "failed"):
                await anyio.to_thread.run_sync(model.discard_saved, key)

    async def unload(self, model: ServedModel, *, force: bool = False) -> bool:
        """Unload ``model`` if it is loaded and idle (``force``: wait for no one, for shutdown);
        whether it was unloaded."""
        if model.transition is not None:
            with suppress(Exception):
                await asyncio.shield(model.transition)
        if model.state != "loaded" or (model.busy() and not force):
            return False
        model.state = "unloading"  # from here on a request for it waits for a new load
        model.transition = asyncio.ensure_future(self._unload(model))
        await asyncio.shield(model.transition)
        return True

    async def _unload(self, model: ServedModel) -> None:
        try:
            await model._unload()
            logger.info("model %s unloaded", model.name)
            self.metrics.loads.labels(model.name, "unloaded").inc()
        finally:
            model.state = "unloaded"
            model.transition = None

    async def _load(self, model: ServedModel) -> None:
        started = time.monotonic()
        deadline = started + model.settings.max_queue_wait_s
        model.state = "loading"
        model.error = None
        try:
            while True:
                async with self._load_lock:  # one load at a time; released while waiting
                    if self.closing:
                        raise ModelUnavailableError("the server is shutting down", retry_after=5)
                    await self._plan_on_gpu(model)
                    try:
                        if await self._make_room(model):
                            await model._launch()
                            break
                    except BaseException:
                        await model.pool.stop()
                        raise
                    await model.pool.stop()  # busy models hold the memory: plan again later
                if time.monotonic() >= deadline:
                    raise self._held_by_busy(model)
                await asyncio.sleep(_TICK_S)
        except Exception as exc:
            model.state = "failed"
            model.failed_at = time.monotonic()
            model.memory = (0, 0)
            model.error = _reason(exc)
            model.retry_after = exc.retry_after if isinstance(exc, LlamaStreamError) else None
            self.metrics.loads.labels(model.name, "failed").inc()
            logger.error("model %s could not be loaded: %s", model.name, model.error)
            raise
        except BaseException:
            model.state = "unloaded"
            raise
        else:
            model.state = "loaded"
            model.last_used = time.monotonic()
            model.loaded_for_s = round(time.monotonic() - started, 3)
            self.metrics.loads.labels(model.name, "loaded").inc()
            self.metrics.load_seconds.labels(model.name).observe(model.loaded_for_s)
            host, gpu = model.memory
            logger.info(
                "model %s loaded in %.2f s (%.1f MiB host, %.1f MiB GPU)",
                model.name,
                model.loaded_for_s,
                host / MIB,
                gpu / MIB,
            )
        finally:
            model.transition = None

    # memory

    async def _plan_on_gpu(self, model: ServedModel) -> None:
        """Plan ``model``; while it would not fit on the GPU whole (auto: fewer layers than it
        has; a fixed layer count: `GpuMemoryError`) and idle models hold GPU memory, unload
        the least recently used of them and plan again."""
        checked = False
        while True:
            error: GpuMemoryError | None = None
            try:
                await model._prepare(self.gpu_reserved(but=model))
            except GpuMemoryError as exc:
                error = exc
            if error is None and not checked:
                try:
                    self._check_alone(model)  # before anything is unloaded for it
                except BaseException:
                    await model.pool.stop()
                    raise
                checked = True
            if error is None and not model.gpu_short():
                return
            holders = sorted(
                (
                    m
                    for m in self.models
                    if m is not model and m.loaded and not m.busy() and m.memory[1] > 0
                ),
                key=lambda m: m.last_used,
            )
            if not holders:
                if error is not None:
                    raise error
                return  # as many layers as fit beside the busy models
            logger.info(
                "unloading idle model %s (least recently used) to put %s on the GPU",
                holders[0].name,
                model.name,
            )
            if error is None:
                await model.pool.stop()
            await self.unload(holders[0])

    def gpu_reserved(self, but: ServedModel | None = None) -> dict[int, int]:
        """GPU bytes per device the loaded models (other than ``but``) were planned to take."""
        per: dict[int, int] = {}
        for m in self.models:
            if m is not but and m.state in ("loaded", "loading", "unloading"):
                for device, size in m.pool.gpu_bytes().items():
                    per[device] = per.get(device, 0) + size
        return per

    def budget_bytes(self) -> float:
        """What the loaded models may take together: ``memory_budget_mib``, else unbounded
        (the host's and GPUs' free memory decide alone)."""
        mib = self.settings.memory_budget_mib
        return math.inf if mib is None else mib * MIB

    def used_bytes(self, but: ServedModel | None = None) -> int:
        """The planned memory of the loaded models (other than ``but``)."""
        return sum(
            sum(m.memory)
            for m in self.models
            if m is not but and m.state in ("loaded", "loading", "unloading")
        )

    def _check_alone(self, model: ServedModel) -> None:
        """Refuse a model that cannot fit even with every other model unloaded."""
        need = sum(model.memory)
        budget = self.budget_bytes()
        others_host = sum(m.memory[0] for m in self.models if m is not model)
        host_short = _host_shortfall(model.memory[0]) - others_host
        if need <= budget and host_short <= 0:
            return
        limit = (
            f"more than memory_budget_mib ({budget / MIB:,.0f})"
            if need > budget
            else f"{host_short / MIB:,.0f} MiB more than the host's available memory"
        )
        raise ModelUnavailableError(
            f"the model {model.name!r} needs about {need / MIB:,.0f} MiB (weights and the KV "
            f"cache of {model.settings.num_of_concurrent_executions} slot(s) of "
            f"{model.settings.n_ctx} tokens), {limit} even alone: give it fewer slots, a "
            "shorter n_ctx, a quantized KV cache (type_k/type_v q8_0)"
            + (" or a larger budget" if need > budget else ""),
            field="model",
        )

    async def _make_room(self, model: ServedModel) -> bool:
        """Whether ``model`` fits beside the other models once idle ones are unloaded, least
        recently used first; False while busy models hold what it needs (the caller waits,
        without the load lock, and tries again)."""
        need = sum(model.memory)
        budget = self.budget_bytes()
        while True:
            host_short = _host_shortfall(model.memory[0])
            if self.used_bytes(but=model) + need <= budget and host_short <= 0:
                return True
            idle = sorted(
                (m for m in self.models if m is not model and m.loaded and not m.busy()),
                key=lambda m: m.last_used,
            )
            if not idle:
                return False
            logger.info(
                "unloading idle model %s (least recently used) to make room for %s",
                idle[0].name,
                model.name,
            )
            await self.unload(idle[0])

    def _held_by_busy(self, model: ServedModel) -> ModelUnavailableError:
        busy = [m.name for m in self.models if m is not model and m.loaded]
        budget = self.budget_bytes()
        return ModelUnavailableError(
            f"the model {model.name!r} needs about {sum(model.memory) / MIB:,.0f} MiB and the "
            f"busy model(s) {', '.join(busy) or '(none)'} hold the memory "
            + (
                f"(memory_budget_mib {budget / MIB:,.0f})"
                if budget < math.inf
                else "(the host's available memory)"
            ),
            field="model",
            retry_after=5,
        )

    # keep-alive

    def start(self) -> None:
        self.closing = False
        if self._reaper is None:
            self._reaper = asyncio.ensure_future(self._reap())

    async def stop(self) -> None:
        self.closing = True
        if self._reaper is not None:
            self._reaper.cancel()
            with suppress(asyncio.CancelledError):
                await self._reaper
            self._reaper = None
        for model in self.models:
            if model.transition is not None:
                with suppress(BaseException):
                    await model.transition
            if model.loaded:
                await self.unload(model, force=True)

    async def _reap(self) -> None:
        """Unload the idle models whose keep-alive has run out."""
        while True:
            await asyncio.sleep(_TICK_S)
            now = time.monotonic()
            for model in self.models:
                if not model.loaded:
                    continue
                if model.busy():
                    model.last_used = now
                elif 0 <= model.keep_alive_s <= now - model.last_used:
                    logger.info(
                        "model %s idle for %.1f s (keep_alive_s %g): unloading",
                        model.name,
                        now - model.last_used,
                        model.keep_alive_s,
                    )
                    try:
                        await self.unload(model)
                    except Exception:
                        logger.exception("unloading model %s failed", model.name)


def _reason(exc: BaseException) -> str:
    """A load failure in words for the client."""
    if isinstance(exc, ModelUnavailableError):
        return exc.message
    if isinstance(exc, GpuMemoryError):
        return str(exc)
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0] if "\n" in text else text


def _host_shortfall(need: int) -> int:
    """How many bytes of ``need`` the host's available memory lacks (0 or less: none)."""
    available = mem_available()
    return 0 if available is None else need - available


def mem_available() -> int | None:
    """``MemAvailable`` of /proc/meminfo (None where there is none)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None
