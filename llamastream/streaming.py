"""Streaming a generation: thread → event-loop bridge, disconnect watch, and the run lifecycle.

The wire format belongs to a `Framing` (plain text, SSE, JSON); the lifecycle here is the same
for every route: wait for a slot, run the job, send pieces, settle, call back, exactly once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import logging
import math
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, Literal, Protocol, TypeVar

import anyio
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from llamastream.engine.sampling import SamplingParams
from llamastream.engine.slots import Ticket
from llamastream.engine.worker import (
    Event,
    Finished,
    Job,
    SavedState,
    TextChunk,
    TokenLogprob,
)
from llamastream.errors import GenerationError, LlamaStreamError, QueueTimeoutError
from llamastream.metrics import Metrics, route_of

if TYPE_CHECKING:
    from llamastream.engine.pool import WorkerPool

logger = logging.getLogger(__name__)

CallbackMessage = Literal[
    "success",
    "client_disconnected_while_streaming",
    "client_disconnected_before_streaming",
    "unknown_error_occurred",
]
Callback = Callable[[Request, CallbackMessage], Any]

T = TypeVar("T")


class EventBridge(Generic[T]):
    """``put()`` from any thread; ``await get()`` on the loop that created the bridge.

    Counts the items taken and the seconds each waited between ``put()`` and being taken (the
    event loop's lag behind the worker, and a slow reader's).
    """

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[tuple[float, T]] = asyncio.Queue()
        self.taken = 0
        self.waited = 0.0

    def put(self, item: T) -> None:
        self._loop.call_soon_threadsafe(self._queue.put_nowait, (time.perf_counter(), item))

    async def get(self) -> T:
        return self._take(await self._queue.get())

    async def get_all(self) -> list[T]:
        """Wait for one item, then take every item already waiting too."""
        items = [self._take(await self._queue.get())]
        while not self._queue.empty():
            items.append(self._take(self._queue.get_nowait()))
        return items

    def _take(self, entry: tuple[float, T]) -> T:
        self.taken += 1
        self.waited += time.perf_counter() - entry[0]
        return entry[1]


class WatchedStreamResponse(Response):
    """Runs ``producer(send)`` while listening for ``http.disconnect``.

    The producer sends the response itself (it may choose its status late, after queueing).
    If the client leaves before the last body message is sent, the producer is cancelled and
    ``disconnected`` is True. ``on_close()`` always runs afterwards, shielded, whatever
    happened. The producer handles its own errors; whatever ``on_close`` raises ends the
    response (and the connection).
    """

    def __init__(
        self,
        producer: Callable[[Send], Awaitable[None]],
        on_close: Callable[[WatchedStreamResponse], Awaitable[None]],
    ) -> None:
        self.producer = producer
        self.on_close = on_close
        self.disconnected = False
        self.completed = False
        self.status_code = 200
        self.background = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as tg:

                async def watch() -> None:
                    while (await receive())["type"] != "http.disconnect":
                        pass
                    # Servers also report a disconnect once the response is complete.
                    self.disconnected = not self.completed
                    tg.cancel_scope.cancel()

                async def tracked_send(message: Message) -> None:
                    if message["type"] == "http.response.body" and not message.get("more_body"):
                        self.completed = True
                    await send(message)

                tg.start_soon(watch)
                await self.producer(tracked_send)
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await self.on_close(self)


class Framing(Protocol):
    """How one run's text goes on the wire (plain text, SSE, or one JSON body at the end)."""

    streaming: bool

    def head(self, run: Run) -> tuple[int, list[tuple[bytes, bytes]]]:
        """Status and headers, sent with the first piece (or with the tail)."""
        ...

    def piece(self, run: Run, text: str, index: int = 0) -> bytes:
        """One chunk of newly generated text of candidate ``index`` (streaming framings)."""
        ...

    def tail(self, run: Run) -> bytes:
        """The last body bytes after a successful run (the whole body when not streaming)."""
        ...

    def error_tail(self, run: Run, exc: LlamaStreamError) -> bytes | None:
        """What ends a stream that fails after it started; None aborts the connection."""
        ...

    def error_response(self, exc: LlamaStreamError) -> Response:
        """The answer to a run that fails before anything was sent."""
        ...


@dataclass
class Candidate:
    """One reply a run generates on a slot of its own (a request asking for ``n`` replies,
    or for the completion of several prompts, has several)."""

    index: int
    tokens: list[int]
    params: SamplingParams
    # Another candidate of the same prompt (``n``), started once it has read the prompt so
    # that this one copies its cache.
    source: int | None = None
    text: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)  # when the params ask for them
    finished: Finished | None = None
    job: Job | None = None

    @property
    def reply(self) -> str:
        return "".join(self.text)


@dataclass
class Run:
    """One accepted generation request, from its place in line to its callback."""

    request: Request
    tokens: list[int]
    params: SamplingParams
    ticket: Ticket
    framing: Framing
    callback: Callback | None = None
    on_settle: Callable[[Run], Awaitable[None]] | None = None
    cache_key: str | None = None  # the conversation (session) whose KV cache this extends
    # The candidates after the first (whose prompt and parameters are the two above).
    more: Sequence[tuple[list[int], SamplingParams]] = ()
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    started: bool = False
    error: BaseException | None = None
    outcome: CallbackMessage | None = None
    error_sent: bool = False
    bridge: EventBridge[tuple[int, Event]] = field(default_factory=EventBridge)
    accepted_at: float = field(default_factory=time.monotonic)
    first_text_at: float | None = None
    time_limited: bool = False
    stop_error: LlamaStreamError | None = None  # why the server ended the run (shutdown)
    stopped: asyncio.Event = field(default_factory=asyncio.Event)
    candidates: list[Candidate] = field(init=False)

    def __post_init__(self) -> None:
        prompts = [self.tokens, *(tokens for tokens, _ in self.more)]
        params = [self.params, *(p for _, p in self.more)]
        # Copies of one prompt (the same list: ``n`` candidates) share it; equal prompts given
        # apart (several prompts) are read and counted apart, as OpenAI counts them.
        first = {id(tokens): i for i, tokens in reversed(list(enumerate(prompts)))}
        self.candidates = [
            Candidate(i, tokens, p, source=None if first[id(tokens)] == i else first[id(tokens)])
            for i, (tokens, p) in enumerate(zip(prompts, params, strict=True))
        ]

    @property
    def reply(self) -> str:
        """The (first candidate's) reply so far."""
        return self.candidates[0].reply

    @property
    def logprobs(self) -> list[TokenLogprob]:
        return self.candidates[0].logprobs

    @property
    def finished(self) -> Finished | None:
        """How the run ended, once every candidate has: the first's reason (cancelled if any
        was), every prompt counted once, every candidate's generated tokens."""
        ends = [c.finished for c in self.candidates]
        if len(ends) == 1 or any(end is None for end in ends):
            return ends[0] if len(ends) == 1 else None
        done = [end for end in ends if end is not None]
        firsts = [end for c, end in zip(self.candidates, done, strict=True) if c.source is None]
        cancelled = any(end.reason == "cancelled" for end in done)
        return Finished(
            "cancelled" if cancelled else done[0].reason,
            sum(end.prompt_tokens for end in firsts),
            sum(end.completion_tokens for end in done),
            sum(end.cached_tokens for end in firsts),
        )

    @property
    def prompt_tokens(self) -> int:
        """Prompt tokens of the run, each prompt counted once."""
        return sum(len(c.tokens) for c in self.candidates if c.source is None)

    @property
    def done(self) -> bool:
        return self.error is not None or all(c.finished is not None for c in self.candidates)

    def take(self, item: tuple[int, Event]) -> None:
        index, event = item
        candidate = self.candidates[index]
        if isinstance(event, TextChunk):
            candidate.text.append(event.text)
            candidate.logprobs.extend(event.logprobs)
            if self.first_text_at is None:
                self.first_text_at = time.monotonic()
        elif isinstance(event, Finished):
            if event.reason == "cancelled" and self.time_limited:
                event = dataclasses.replace(event, reason="length")
            candidate.finished = event
        else:
            candidate.finished = Finished("cancelled", len(candidate.tokens), 0)
            if self.error is None:
                self.error = event.error

    def jobs(self) -> list[Job]:
        return [c.job for c in self.candidates if c.job is not None]


class Runner:
    """Runs accepted requests through the workers, whatever their framing.

    Enforces the queue-wait and generation-time limits, keeps the runs in flight (for
    `drain`), and records their metrics.
    """

    def __init__(
        self,
        pool: WorkerPool,
        *,
        max_queue_wait_s: float = math.inf,
        max_generation_s: float = math.inf,
        metrics: Metrics | None = None,
        model: str = "",
    ) -> None:
        self.pool = pool
        self.model = model  # the metrics' model label
        self.max_queue_wait_s = max_queue_wait_s
        self.max_generation_s = max_generation_s
        self.metrics = metrics
        self.active: dict[str, Run] = {}
        self._draining: Callable[[], LlamaStreamError] | None = None

    def response(self, run: Run) -> WatchedStreamResponse:
        """The response that runs ``run`` when the server calls it."""
        self.active[run.id] = run
        if self._draining is not None:
            self.stop(run, self._draining())  # accepted while the server began to drain
        return WatchedStreamResponse(
            lambda send: self._produce(run, send), lambda r: self._close(run, r)
        )

    def stop(self, run: Run, error: LlamaStreamError) -> None:
        """End ``run`` early on the server's behalf: it fails with ``error``, its reply kept."""
        if run.stop_error is None:
            run.stop_error = error
        run.stopped.set()
        for job in run.jobs():
            job.cancel.set()

    async def drain(self, grace_s: float, error: Callable[[], LlamaStreamError]) -> None:
        """Fail the queued runs now, give the running ones ``grace_s`` to finish, stop the rest.

        Runs accepted from now on are stopped at once. Returns once every run has settled and
        called back (or, should one never settle, after a bounded wait, with a warning).
        """
        self._draining = error
        for run in list(self.active.values()):
            if not run.ticket.granted:
                self.stop(run, error())
        deadline = time.monotonic() + grace_s
        while self.active and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for run in list(self.active.values()):
            logger.warning("generation %s: stopped by shutdown", run.id[:8])
            self.stop(run, error())
        deadline = time.monotonic() + 30
        while self.active and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if self.active:
            logger.warning("%d generation(s) did not settle at shutdown", len(self.active))

    def resume(self) -> None:
        """Take runs again after a drain (a model unloaded by force, to be loaded again)."""
        self._draining = None

    async def _produce(self, run: Run, send: Send) -> None:
        """Wait for a slot, run the job, and send its text as it comes.

        The run is settled (slot freed, ``on_settle`` done) before the last body message, so
        a client that has read the whole reply finds its effects in place.
        """
        timer: asyncio.TimerHandle | None = None
        try:
            timer = await self._start_job(run)
            await self._stream(run, send)
            if run.error is None and run.stop_error is not None and _cut_short(run):
                run.error = run.stop_error
            if run.error is None:
                await self._settle(run, "success")
                if run.outcome != "success":
                    run.error = GenerationError("the reply could not be stored")
            if run.error is not None:
                await self._send_error(run, send)
                return
            if not run.started:
                await send(_start(run.framing.head(run)))
            await send(_body(run.framing.tail(run), more=False))
        except LlamaStreamError as exc:  # refused while queued: nothing was sent yet
            run.error = exc
            await self._send_error(run, send)
        except Exception as exc:  # a fault of ours mid-run: this request ends, the server goes on
            logger.exception("generation %s failed", run.id[:8])
            run.error = exc
        finally:
            if timer is not None:
                timer.cancel()

    async def _start_job(self, run: Run) -> asyncio.TimerHandle | None:
        """Wait for the run's slots and hand its jobs to the workers; the time limit's timer.

        Candidates that share another's prompt start once it has read the prompt, so that
        they copy its cache instead of reading the prompt again.
        """
        slot = await self._wait_for_slot(run)
        if self.metrics is not None:
            self.metrics.queue_wait.labels(self.model).observe(time.monotonic() - run.accepted_at)
        restore = None
        if run.cache_key is not None:
            restore = await self.pool.saved_state(slot, run.tokens, run.cache_key)
        slots = run.ticket.slots
        self._submit(run, run.candidates[0], slots[0], restore)
        for candidate in run.candidates[1:]:
            if candidate.source is None:
                self._submit(run, candidate, slots[candidate.index])
        if not math.isfinite(self.max_generation_s):
            return None
        return asyncio.get_running_loop().call_later(self.max_generation_s, self._time_up, run)

    def _submit(
        self, run: Run, candidate: Candidate, slot: int, restore: SavedState | None = None
    ) -> None:
        index = candidate.index
        candidate.job = Job(
            candidate.tokens,
            candidate.params,
            lambda event: run.bridge.put((index, event)),
            cache_key=run.cache_key if index == 0 else None,
            restore=restore,
        )
        if run.stop_error is not None or run.time_limited:
            candidate.job.cancel.set()
        self.pool.submit(slot, candidate.job)

    def _submit_sharing(self, run: Run) -> None:
        """Start the candidates waiting for another one's prompt, once it is read."""
        for candidate in run.candidates:
            if candidate.source is None or candidate.job is not None or candidate.finished:
                continue
            source = run.candidates[candidate.source]
            if source.text or source.logprobs or source.finished:
                self._submit(run, candidate, run.ticket.slots[candidate.index])

    async def _stream(self, run: Run, send: Send) -> None:
        """Take the job's events until it ends, sending its text (streaming framings)."""
        framing = run.framing
        while not run.done:
            # Text that piled up while the last piece was being sent goes out as one piece
            # (one per candidate).
            events = await run.bridge.get_all()
            for item in events:
                run.take(item)
            if len(run.candidates) > 1:
                self._submit_sharing(run)
            texts: dict[int, str] = {}
            for index, event in events:
                if isinstance(event, TextChunk) and event.text:
                    texts[index] = texts.get(index, "") + event.text
            if texts and framing.streaming:
                if not run.started:
                    await send(_start(framing.head(run)))
                body = b"".join(framing.piece(run, text, i) for i, text in texts.items())
                await send(_body(body, more=True))
                run.started = True

    async def _wait_for_slot(self, run: Run) -> int:
        """The run's slot; `QueueTimeoutError` past the wait limit, or the stop error."""
        if run.ticket.slot is not None:
            return run.ticket.slot
        granted: list[int] = []
        async with anyio.create_task_group() as tg:

            async def watch_stop() -> None:
                await run.stopped.wait()
                tg.cancel_scope.cancel()

            tg.start_soon(watch_stop)
            with anyio.move_on_after(self.max_queue_wait_s):
                granted.append(await run.ticket.wait())  # a cancelled wait leaves the queue
            tg.cancel_scope.cancel()
        if granted:
            return granted[0]
        if run.stop_error is not None:
            raise run.stop_error
        retry_after = run.ticket.controller.retry_after()
        raise QueueTimeoutError(
            f"no generation slot became free within {self.max_queue_wait_s:g} s",
            retry_after=retry_after,
        )

    def _time_up(self, run: Run) -> None:
        logger.warning(
            "generation %s: stopped at the %g s time limit", run.id[:8], self.max_generation_s
        )
        run.time_limited = True
        for job in run.jobs():
            job.cancel.set()

    async def _send_error(self, run: Run, send: Send) -> None:
        exc = run.error
        if not isinstance(exc, LlamaStreamError):
            exc = GenerationError("generation failed")
        if not run.started:
            response = run.framing.error_response(exc)
            await response({"type": "http"}, _disconnected, send)
            run.error_sent = True
            return
        tail = run.framing.error_tail(run, exc)
        if tail is not None:
            await send(_body(tail, more=False))
            run.error_sent = True

    async def _settle(self, run: Run, outcome: CallbackMessage) -> None:
        """Stop the job, free the slot, and run ``on_settle``; once per run."""
        if run.outcome is not None:
            return
        run.outcome = outcome
        # Shielded: a client leaving (or the server cancelling) meanwhile must not cut the
        # history save or the session unlock in half.
        with anyio.CancelScope(shield=True):
            for candidate in run.candidates:
                if candidate.job is None and candidate.finished is None:  # never started
                    candidate.finished = Finished("cancelled", len(candidate.tokens), 0)
            for job in run.jobs():
                job.cancel.set()
            while not all(c.finished is not None for c in run.candidates):
                run.take(await run.bridge.get())
            run.ticket.release()
            if self.metrics is not None:
                self.metrics.events.labels(self.model).inc(run.bridge.taken)
                self.metrics.event_wait.labels(self.model).inc(run.bridge.waited)
            if run.on_settle is not None:
                try:
                    await run.on_settle(run)
                except Exception:
                    logger.exception("generation %s: settling failed", run.id[:8])
                    run.outcome = "unknown_error_occurred"

    async def _close(self, run: Run, response: WatchedStreamResponse) -> None:
        """Every path ends here once: settle the run if the stream did not, then call back."""
        try:
            await self._finish(run, response)
        finally:
            self.active.pop(run.id, None)
        if run.error is not None and not run.error_sent:
            raise GenerationError("generation failed mid-stream") from run.error

    async def _finish(self, run: Run, response: WatchedStreamResponse) -> None:
        if run.error is not None:
            outcome: CallbackMessage = "unknown_error_occurred"
        elif response.disconnected:
            outcome = (
                "client_disconnected_while_streaming"
                if run.started
                else "client_disconnected_before_streaming"
            )
        elif run.outcome is None and not (run.finished is not None and response.completed):
            # Cancelled by the server (its graceful-shutdown timeout): not a whole reply.
            run.error = GenerationError("the response was cut short by the server")
            outcome = "unknown_error_occurred"
        else:
            outcome = "success"
        await self._settle(run, outcome)
        if run.error is not None:
            run.outcome = "unknown_error_occurred"
        assert run.outcome is not None
        logger.info(
            "generation %s: %s, %d prompt + %d generated tokens",
            run.id[:8],
            run.outcome,
            run.prompt_tokens,
            run.finished.completion_tokens if run.finished else 0,
        )
        self._record(run)
        await fire_callback(run.callback, run.request, run.outcome)

    def _record(self, run: Run) -> None:
        if self.metrics is None:
            return
        m = self.metrics
        model = self.model
        m.generations.labels(route_of(run.request.scope), model, run.outcome).inc()
        m.prompt_tokens.labels(model).inc(run.prompt_tokens)
        if run.first_text_at is not None:
            m.ttft.labels(model).observe(run.first_text_at - run.accepted_at)
        if run.finished is not None:
            m.generated_tokens.labels(model).inc(run.finished.completion_tokens)
            decoding = time.monotonic() - (run.first_text_at or run.accepted_at)
            if run.finished.completion_tokens > 1 and decoding > 0:
                m.tokens_per_second.labels(model).observe(run.finished.completion_tokens / decoding)


def _cut_short(run: Run) -> bool:
    """Whether the run ended without its whole reply (a stop may land just after the end)."""
    return run.finished is None or run.finished.reason == "cancelled"


async def fire_callback(
    callback: Callback | None, request: Request, message: CallbackMessage
) -> None:
    """Call a completion callback (plain or async); what it raises is logged, nothing more."""
    if callback is None:
        return
    try:
        result = callback(request, message)
        if inspect.isawaitable(result):
            await result
    except Exception:
        logger.exception("completion callback raised (message %s)", message)


def _start(head: tuple[int, list[tuple[bytes, bytes]]]) -> dict[str, Any]:
    status, headers = head
    return {"type": "http.response.start", "status": status, "headers": headers}


def _body(data: bytes, *, more: bool) -> dict[str, Any]:
    return {"type": "http.response.body", "body": data, "more_body": more}


async def _disconnected() -> dict[str, Any]:
    return {"type": "http.disconnect"}
