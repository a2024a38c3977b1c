"""Prometheus metrics of one server, in a registry of its own (no global collectors)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import Scope

from llamastream.engine.slots import SlotController
from llamastream.engine.worker import StepTimes

_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_RATES = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)


def route_of(scope: Scope) -> str:
    """A request's route label: the matched route's template (bounded label values), never
    the raw path."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    if not isinstance(path, str):
        return "unmatched"
    # A route of a router included in another has its own part of the path only; FastAPI
    # keeps the prefixes it was included under beside it.
    included = (scope.get("fastapi") or {}).get("included_router")
    prefix = getattr(getattr(included, "include_context", None), "prefix", "")
    return (prefix if isinstance(prefix, str) else "") + path


class Metrics:
    """What `/metrics` reports: requests, and per model its queue and slots, waits, TTFT,
    tokens and loads.

    >>> from llamastream.engine.slots import SlotController
    >>> metrics = Metrics()
    >>> metrics.add_model("tiny", SlotController(2, 4), loaded=lambda: True)
    >>> b'llamastream_busy_slots{model="tiny"} 0.0' in metrics.render()
    True
    """

    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry(auto_describe=True)
        self._steps: dict[str, Callable[[], StepTimes]] = {}
        registry.register(_Collector(self._collect_steps))
        self.http_requests = Counter(
            "llamastream_http_requests",
            "HTTP requests answered, by route template, method and status.",
            ["route", "method", "status"],
            registry=registry,
        )
        self.generations = Counter(
            "llamastream_generations",
            "Accepted generation requests by route, model and outcome (the callback's message).",
            ["route", "model", "outcome"],
            registry=registry,
        )
        self.queue_depth = Gauge(
            "llamastream_queue_depth", "Requests waiting for a slot.", ["model"], registry=registry
        )
        self.busy_slots = Gauge(
            "llamastream_busy_slots", "Slots generating or reserved.", ["model"], registry=registry
        )
        self.slots = Gauge("llamastream_slots", "Generation slots.", ["model"], registry=registry)
        self.loaded = Gauge(
            "llamastream_model_loaded", "1 while the model is loaded.", ["model"], registry=registry
        )
        self.loads = Counter(
            "llamastream_model_loads",
            "Model loads by outcome (loaded, failed) and unloads (unloaded).",
            ["model", "outcome"],
            registry=registry,
        )
        self.load_seconds = Histogram(
            "llamastream_model_load_seconds",
            "Time to load a model (making room included).",
            ["model"],
            buckets=_SECONDS,
            registry=registry,
        )
        self.queue_wait = Histogram(
            "llamastream_queue_wait_seconds",
            "Time from acceptance to a slot.",
            ["model"],
            buckets=_SECONDS,
            registry=registry,
        )
        self.ttft = Histogram(
            "llamastream_time_to_first_token_seconds",
            "Time from acceptance to the first generated text.",
            ["model"],
            buckets=_SECONDS,
            registry=registry,
        )
        self.prompt_tokens = Counter(
            "llamastream_prompt_tokens",
            "Prompt tokens of accepted requests.",
            ["model"],
            registry=registry,
        )
        self.generated_tokens = Counter(
            "llamastream_generated_tokens", "Tokens generated.", ["model"], registry=registry
        )
        self.events = Counter(
            "llamastream_stream_events",
            "Events (text, the end) the streams took from the workers, counted as each "
            "request ends.",
            ["model"],
            registry=registry,
        )
        self.event_wait = Counter(
            "llamastream_stream_event_wait_seconds",
            "Seconds the events waited between a worker handing them over and their stream "
            "taking them (the event loop's lag, and slow readers'): divided by the events, the "
            "mean wait.",
            ["model"],
            registry=registry,
        )
        self.tokens_per_second = Histogram(
            "llamastream_generation_tokens_per_second",
            "Decoding speed of each reply, from its first to its last token.",
            ["model"],
            buckets=_RATES,
            registry=registry,
        )

    def add_model(
        self,
        name: str,
        slots: SlotController,
        loaded: Callable[[], bool],
        steps: Callable[[], StepTimes] = StepTimes,
    ) -> None:
        """Report a configured model's slots, queue and state under its ``model`` label;
        ``steps``: what its decode steps took and drafted so far."""
        self._steps[name] = steps
        self.queue_depth.labels(name).set_function(lambda: slots.load().waiting)
        self.busy_slots.labels(name).set_function(lambda: slots.load().processing)
        self.slots.labels(name).set(slots.n_slots)
        self.loaded.labels(name).set_function(lambda: float(loaded()))

    def _collect_steps(self) -> Iterator[Metric]:
        steps = CounterMetricFamily(
            "llamastream_decode_steps",
            "Decode steps: each one llama_decode over every active slot.",
            labels=["model"],
        )
        tokens = CounterMetricFamily(
            "llamastream_decode_step_tokens",
            "Tokens the decode steps decoded (prompt chunks, generated and drafted tokens).",
            labels=["model"],
        )
        slots = CounterMetricFamily(
            "llamastream_decode_step_slots",
            "Active slots summed over the decode steps (divided by the steps: the batch width).",
            labels=["model"],
        )
        runs = CounterMetricFamily(
            "llamastream_decode_step_runs",
            "Runs of consecutive slots summed over the decode steps: llama.cpp computes each "
            "run of a step apart (a pass over the weights each), and a run in several parts when "
            "its slots bring unequal numbers of tokens (a prompt chunk, drafts).",
            labels=["model"],
        )
        seconds = CounterMetricFamily(
            "llamastream_decode_step_seconds",
            "Time of the decode steps by phase: build (starting jobs, filling the batch), "
            "draft (the draft model), decode (llama_decode), sample, emit (detokenizing, stop "
            "strings, handing text to the event loop).",
            labels=["model", "phase"],
        )
        drafted = CounterMetricFamily(
            "llamastream_draft_tokens",
            "Speculative tokens drafted and verified (prompt lookup or a draft model).",
            labels=["model"],
        )
        accepted = CounterMetricFamily(
            "llamastream_draft_accepted_tokens",
            "Speculative tokens drafted and accepted: generated without a step of their own.",
            labels=["model"],
        )
        for name, read in self._steps.items():
            times = read()
            drafted.add_metric([name], times.drafted)
            accepted.add_metric([name], times.accepted)
            steps.add_metric([name], times.steps)
            tokens.add_metric([name], times.tokens)
            slots.add_metric([name], times.slots)
            runs.add_metric([name], times.runs)
            for phase in StepTimes.PHASES:
                seconds.add_metric([name, phase], getattr(times, phase))
        yield from (drafted, accepted, steps, tokens, slots, runs, seconds)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)


class _Collector(Collector):
    """Metrics read when scraped, from a function."""

    def __init__(self, collect: Callable[[], Iterator[Metric]]) -> None:
        self._collect = collect

    def collect(self) -> Iterator[Metric]:
        return self._collect()
