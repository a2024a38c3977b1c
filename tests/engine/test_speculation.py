"""Speculative decoding by prompt lookup on the real tiny model: the same replies as without
it (greedy and sampled, penalties, bias, logprobs, stops, grammars), alone and batched with
slots that draft nothing; drafts really made and accepted; the rejected tail leaves no trace."""

from __future__ import annotations

import dataclasses
import queue
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from llamastream.engine.sampling import SamplingParams
from llamastream.engine.worker import (
    Event,
    Finished,
    Job,
    Speculation,
    TextChunk,
    Worker,
    load_llama,
    lookup_draft,
)


def _worker(model: Path, speculation: Speculation | None) -> Worker:
    w = Worker(
        0, str(model), n_slots=3, n_ctx=1024, n_batch=64, n_threads=1, speculation=speculation
    )
    w.start().result(30)
    return w


@pytest.fixture(scope="module")
def workers(tiny_model: Path) -> Iterator[tuple[Worker, Worker]]:
    plain, speculative = _worker(tiny_model, None), _worker(tiny_model, Speculation(draft_max=6))
    yield plain, speculative
    plain.stop()
    speculative.stop()


@pytest.fixture(scope="module")
def prompts(tiny_model: Path) -> list[list[int]]:
    """Prompts that repeat themselves (prompt lookup finds drafts in them) and one that
    does not."""
    vocab = load_llama(str(tiny_model), vocab_only=True)
    texts = [
        "<|im_start|>user\nrepeat: the cat sat on the mat, the cat sat on the mat, the cat "
        "sat on<|im_end|>\n<|im_start|>assistant\n",
        "<|im_start|>user\n日本語 日本語 日本語 テキスト 日本語<|im_end|>\n<|im_start|>assistant\n",
        "<|im_start|>user\nq<|im_end|>\n",
    ]
    tokens = [vocab.tokenize(t.encode(), special=True) for t in texts]
    vocab.close()
    return tokens


def run_all(worker: Worker, jobs: list[tuple[list[int], SamplingParams]]) -> list[list[Event]]:
    """The jobs on slots 0, 1, 2... together (joining the same first step)."""
    queues: list[queue.Queue[Event]] = [queue.Queue() for _ in jobs]
    submitted = [Job(t, p, q.put) for (t, p), q in zip(jobs, queues, strict=True)]
    gate = threading.Event()
    worker.call(gate.wait)
    for seq, job in enumerate(submitted):
        worker.submit(job, seq)
    gate.set()
    for job in submitted:
        assert job.done.wait(60)
    return [list(q.queue) for q in queues]


def comparable(events: list[Event]) -> list[object]:
    """The events with each token's log probabilities reduced to the token (`logprobs_of`
    has its value): a drafted token's logits come from a decode of several positions at
    once, whose float sums may differ in the last bits from one position at a time, as those
    after a cached prompt prefix do; the order of near-tied unlikely alternatives may then
    differ too (the tokens sampled never differed in these tests)."""
    out: list[object] = []
    for e in events:
        if isinstance(e, Finished):
            out.append(dataclasses.replace(e, cached_tokens=0))
        elif isinstance(e, TextChunk):
            out.append((e.text, [(lp.token, len(lp.top)) for lp in e.logprobs]))
        else:
            out.append(e)
    return out


def same_until_a_tie(got: list[Event], want: list[Event]) -> bool:
    """``got`` equals ``want`` (as `comparable`), or differs first where ``want`` sampled
    between two tokens whose log probabilities are within float noise of each other (a decode
    of several positions at once sums in another order: a near-tie may then tip either way;
    the rest of the reply follows from that token)."""
    a, b = comparable(got), comparable(want)
    if a == b:
        return True
    first = next(i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y)
    event = want[first]
    if not isinstance(event, TextChunk) or not event.logprobs:
        return False
    top = event.logprobs[0].top
    return len(top) >= 2 and top[0][2] - top[1][2] < 0.02


def logprobs_of(events: list[Event]) -> list[float]:
    return [lp.logprob for e in events if isinstance(e, TextChunk) for lp in e.logprobs]


def test_lookup_drafts_the_continuation_of_the_last_ngram() -> None:
    spec = Speculation(draft_max=4, ngram_max=3, ngram_min=2)
    assert lookup_draft([1, 2, 3, 4, 5, 1, 2, 3], spec, 4) == [4, 5, 1, 2]
    assert lookup_draft([9, 1, 2, 7, 7, 1, 2], spec, 2) == [7, 7]  # the latest occurrence
    assert lookup_draft([1, 2, 3, 4], spec, 4) == []  # no earlier occurrence
    assert lookup_draft([1, 2, 3, 1, 2], spec, 0) == []  # no room
    assert lookup_draft([1, 2, 3, 1, 2], Speculation(draft_min=3), 4) == [3, 1, 2]
    assert lookup_draft([1, 2, 1, 2], Speculation(draft_min=3), 4) == []  # too short a draft


PARAMS = [
    SamplingParams(temperature=0.0, max_new_tokens=60, repeat_penalty=1.0),
    SamplingParams(temperature=0.9, max_new_tokens=50, seed=7, repeat_penalty=1.0),
    SamplingParams(temperature=0.0, max_new_tokens=40, repeat_penalty=1.3, logprobs=3),
    SamplingParams(
        temperature=0.7,
        top_k=8,
        max_new_tokens=40,
        seed=3,
        frequency_penalty=0.5,
        logit_bias=((270, 5.0), (271, -100.0)),
    ),
    SamplingParams(temperature=0.0, max_new_tokens=60, stop=("mat", "日本")),
]


@pytest.mark.parametrize(
    "params", PARAMS, ids=["greedy", "sampled", "penalty-logprobs", "bias", "stops"]
)
def test_the_same_replies_with_and_without_speculation(
    workers: tuple[Worker, Worker], prompts: list[list[int]], params: SamplingParams
) -> None:
    plain, speculative = workers
    jobs = [(p, params) for p in prompts]
    # Batched: slots that find drafts beside one that finds none (its prompt never repeats).
    reference = run_all(plain, jobs)
    before = speculative.times.drafted
    events = run_all(speculative, jobs)
    assert isinstance(events[0][-1], Finished)
    for got, want in zip(events, reference, strict=True):
        assert same_until_a_tie(got, want)
        if comparable(got) == comparable(want):
            assert logprobs_of(got) == pytest.approx(logprobs_of(want), abs=1e-2)
    if params.stop == ():  # (the stop strings end these replies before any draft)
        assert speculative.times.drafted > before  # drafts were made and verified
    # Alone too, one after another (different batches, different drafts).
    for tokens, want in zip(prompts, reference, strict=True):
        assert same_until_a_tie(run_all(speculative, [(tokens, params)])[0], want)


def test_greedy_drafts_are_accepted_and_the_cache_holds_only_the_reply(
    workers: tuple[Worker, Worker], prompts: list[list[int]]
) -> None:
    plain, speculative = workers
    params = SamplingParams(temperature=0.0, max_new_tokens=120, repeat_penalty=1.0)
    drafted, accepted = speculative.times.drafted, speculative.times.accepted
    events = run_all(speculative, [(prompts[0], params)])[0]
    assert speculative.times.accepted - accepted > 0
    assert speculative.times.drafted - drafted >= speculative.times.accepted - accepted
    text = "".join(e.text for e in events if isinstance(e, TextChunk))
    # The next turn on the same slot reuses exactly the prompt and the reply (no drafted token
    # left behind in the cache): the same as the plain worker's cache after the same reply.
    plain_events = run_all(plain, [(prompts[0], params)])[0]
    assert "".join(e.text for e in plain_events if isinstance(e, TextChunk)) == text
    assert speculative._cached[0] == plain._cached[0]


def test_grammars_and_json_hold_under_speculation(
    workers: tuple[Worker, Worker], prompts: list[list[int]]
) -> None:
    plain, speculative = workers
    grammar = 'root ::= "{\\"a\\": [" item ("," item)* "]}"\nitem ::= [0-9]{1,3}'
    params = SamplingParams(temperature=0.8, seed=5, max_new_tokens=80, grammar=grammar)
    jobs = [(prompts[0], params), (prompts[1], params)]
    assert [comparable(e) for e in run_all(speculative, jobs)] == [
        comparable(e) for e in run_all(plain, jobs)
    ]


def test_cancellation_ends_a_speculating_slot(
    workers: tuple[Worker, Worker], prompts: list[list[int]]
) -> None:
    _, speculative = workers
    events: queue.Queue[Event] = queue.Queue()
    job = Job(prompts[0], SamplingParams(temperature=0.0, max_new_tokens=900), events.put)

    def cancel_on_text(event: Event) -> None:
        events.put(event)
        if isinstance(event, TextChunk):
            job.cancel.set()

    job.on_event = cancel_on_text
    speculative.submit(job, 0)
    assert job.done.wait(60)
    last = list(events.queue)[-1]
    assert isinstance(last, Finished) and last.reason == "cancelled"
    assert last.completion_tokens < 50


@pytest.fixture(scope="module")
def drafting(tiny_model: Path) -> Iterator[Worker]:
    """A worker drafting with a draft model that is the model itself: its greedy drafts are
    what the model samples greedily."""
    w = _worker(tiny_model, Speculation(draft_max=6, draft_model=str(tiny_model)))
    yield w
    w.stop()


@pytest.mark.parametrize(
    "params", PARAMS[:2] + PARAMS[3:], ids=["greedy", "sampled", "bias", "stops"]
)
def test_a_draft_model_gives_the_same_replies(
    workers: tuple[Worker, Worker],
    drafting: Worker,
    prompts: list[list[int]],
    params: SamplingParams,
) -> None:
    plain, _ = workers
    jobs = [(p, params) for p in prompts]
    reference = run_all(plain, jobs)
    before = drafting.times.drafted
    for got, want in zip(run_all(drafting, jobs), reference, strict=True):
        assert same_until_a_tie(got, want)
    if params.stop == ():
        assert drafting.times.drafted > before


def test_greedy_drafts_of_the_model_itself_are_all_accepted(
    workers: tuple[Worker, Worker], drafting: Worker, prompts: list[list[int]]
) -> None:
    plain, _ = workers
    params = SamplingParams(temperature=0.0, max_new_tokens=100, repeat_penalty=1.0)
    drafted, accepted = drafting.times.drafted, drafting.times.accepted
    events = run_all(drafting, [(prompts[1], params)])[0]
    made, taken = drafting.times.drafted - drafted, drafting.times.accepted - accepted
    assert made > 50
    assert taken >= 0.95 * made  # (a near-tie may tip the other way in a batched decode)
    assert same_until_a_tie(events, run_all(plain, [(prompts[1], params)])[0])
    # Drafts grow while they are taken whole: far fewer steps than tokens.
    assert made / 100 > 0.5


def test_a_draft_model_that_cannot_load_fails_the_start(tiny_model: Path, tmp_path: Path) -> None:
    w = Worker(
        0,
        str(tiny_model),
        n_slots=1,
        n_ctx=256,
        n_batch=32,
        n_threads=1,
        speculation=Speculation(draft_model=str(tmp_path / "missing.gguf")),
    )
    with pytest.raises(Exception, match=r"missing\.gguf|load"):
        w.start().result(30)
    w.stop()


def test_drafts_leave_room_for_the_other_slots(tiny_model: Path, prompts: list[list[int]]) -> None:
    """A batch of 8 rows and drafts that grow to 16: the slots still all move together (a
    drafting slot leaves a row for each other generating slot), and prompts are still read."""
    w = Worker(
        0,
        str(tiny_model),
        n_slots=3,
        n_ctx=1024,
        n_batch=8,
        n_threads=1,
        # The model drafting for itself: greedy drafts are all taken, so they grow to 16.
        speculation=Speculation(draft_max=16, draft_model=str(tiny_model)),
    )
    w.start().result(30)
    try:
        order: list[tuple[int, str]] = []
        lock = threading.Lock()
        params = SamplingParams(temperature=0.0, max_new_tokens=200, repeat_penalty=1.0)
        jobs = []
        for i, tokens in enumerate(prompts):

            def note(event: Event, i: int = i) -> None:
                with lock:
                    order.append((i, type(event).__name__))

            jobs.append(Job(tokens, params, note))
        gate = threading.Event()
        w.call(gate.wait)
        for seq, job in enumerate(jobs):
            w.submit(job, seq)
        gate.set()
        for job in jobs:
            assert job.done.wait(60)
        first_end = next(k for k, (_, kind) in enumerate(order) if kind == "Finished")
        started = {i for i, kind in order[:first_end] if kind == "TextChunk"}
        assert started == {0, 1, 2}  # every slot generated before the first one finished
        assert w.times.drafted > 0
    finally:
        w.stop()


def test_draft_settings_are_checked() -> None:
    from llamastream.config import Settings

    with pytest.raises(ValueError, match="draft_min"):
        Settings(model_path="m.gguf", draft_min=9, draft_max=8)
