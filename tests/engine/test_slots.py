"""SlotController on its own: FIFO order, the bounded queue, cancellation, release."""

from __future__ import annotations

import asyncio

import pytest

from llamastream.engine import slots as slots_module
from llamastream.engine.slots import SlotController
from llamastream.errors import InvalidRequestError, QueueFullError


async def test_grants_free_slots_then_queues_then_refuses() -> None:
    slots = SlotController(n_slots=2, max_queue=1)
    a, b = slots.reserve(), slots.reserve()
    assert {await a.wait(), await b.wait()} == {0, 1}
    waiting = slots.reserve()
    assert not waiting.granted
    with pytest.raises(QueueFullError) as refused:
        slots.reserve()
    assert refused.value.retry_after >= 1
    load = slots.load()
    assert (load.processing, load.waiting, load.max_processing, load.max_waiting) == (2, 1, 2, 1)


async def test_release_hands_the_slot_to_the_first_waiter() -> None:
    slots = SlotController(n_slots=1, max_queue=3)
    holder = slots.reserve()
    slot = await holder.wait()
    first, second = slots.reserve(), slots.reserve()
    holder.release()
    assert await asyncio.wait_for(first.wait(), 1) == slot
    assert not second.granted
    first.release()
    assert await asyncio.wait_for(second.wait(), 1) == slot
    second.release()
    assert slots.load().processing == 0


async def test_a_cancelled_waiter_leaves_the_queue() -> None:
    slots = SlotController(n_slots=1, max_queue=2)
    holder = slots.reserve()
    await holder.wait()
    leaver = slots.reserve()
    task = asyncio.ensure_future(leaver.wait())
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert slots.load().waiting == 0
    holder.release()
    assert slots.load().processing == 0


async def test_release_is_idempotent() -> None:
    slots = SlotController(n_slots=1, max_queue=0)
    ticket = slots.reserve()
    await ticket.wait()
    ticket.release()
    ticket.release()
    assert slots.load().processing == 0
    again = slots.reserve()
    assert await again.wait() == 0
    assert slots.load().processing == 1


async def test_no_queue_means_immediate_refusal() -> None:
    slots = SlotController(n_slots=1, max_queue=0)
    slots.reserve()
    with pytest.raises(QueueFullError):
        slots.reserve()


async def test_prefers_the_conversations_slot_then_the_longest_free() -> None:
    slots = SlotController(n_slots=3, max_queue=0)
    tickets = [slots.reserve() for _ in range(3)]
    assert [t.slot for t in tickets] == [0, 1, 2]
    for t in (tickets[1], tickets[0], tickets[2]):
        t.release()
    assert slots.reserve(prefer=2).slot == 2
    assert slots.reserve().slot == 1  # free the longest
    assert slots.reserve(prefer=2).slot == 0  # the preferred slot is busy


async def test_a_ticket_for_several_slots_is_granted_whole_in_its_turn() -> None:
    slots = SlotController(n_slots=3, max_queue=4)
    one = slots.reserve()
    both = slots.reserve(count=2)
    assert both.granted and sorted(both.slots) == [1, 2]
    three = slots.reserve(count=3)  # waits for every slot
    later = slots.reserve()  # must not jump ahead of it
    both.release()
    assert not three.granted and len(three.slots) == 2 and not later.granted
    assert slots.load().processing == 3  # held for the waiting ticket
    one.release()
    assert three.granted and sorted(three.slots) == [0, 1, 2] and not later.granted
    assert await three.wait() in (0, 1, 2)
    three.release()
    assert later.granted
    later.release()
    assert slots.load().processing == 0


async def test_a_waiting_ticket_for_several_gives_back_what_it_held() -> None:
    slots = SlotController(n_slots=2, max_queue=2)
    holder = slots.reserve()
    pair = slots.reserve(count=2)
    assert len(pair.slots) == 1 and not pair.granted
    pair.release()  # its client left while it waited
    assert slots.load().processing == 1 and slots.load().waiting == 0
    holder.release()
    assert slots.load().processing == 0
    with pytest.raises(InvalidRequestError) as too_many:
        slots.reserve(count=3)
    assert too_many.value.field == "n"


async def test_new_tickets_take_free_slots_next_to_busy_ones(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Busy slots kept together: a worker's step computes each run of consecutive busy
    slots apart."""
    monkeypatch.setattr(slots_module, "RECENT_S", 0.0)  # no slot counts as freed recently
    slots = SlotController(n_slots=6, max_queue=0)
    tickets = [slots.reserve() for _ in range(6)]
    for i in (5, 4, 0, 2):
        tickets[i].release()  # free, the longest first: 5, 4, 0, 2; busy: 1 and 3
    assert slots.reserve().slot == 2  # between two busy slots: the two runs become one
    assert slots.reserve().slot == 4  # next to busy 3 (as 0 is next to 1): free longer
    assert slots.reserve().slot == 5
    assert slots.reserve().slot == 0
    idle = SlotController(n_slots=3, max_queue=0)
    first = [idle.reserve() for _ in range(3)]
    for i in (2, 0, 1):
        first[i].release()
    assert idle.reserve().slot == 2  # none busy: the slot free the longest


async def test_a_slot_freed_recently_goes_last_of_those_next_to_busy_ones() -> None:
    """A conversation's next turn finds its cache, unless keeping it would add a run of busy
    slots (a pass over the weights every step)."""
    slots = SlotController(n_slots=5, max_queue=0)
    tickets = [slots.reserve() for _ in range(5)]
    for i in (3, 4):
        tickets[i].release()
    for slot in (3, 4):  # free for a minute
        slots._freed_at[slot] -= 60
    tickets[1].release()  # slot 1, between busy 0 and 2: its conversation may come back
    assert slots.recently_freed() == {1}
    # 1 would join two runs into one, but 3 (next to busy 2) adds none and keeps 1's cache.
    assert [slots.reserve().slot for _ in range(2)] == [3, 4]
    assert slots.reserve().slot == 1

    alone = SlotController(n_slots=4, max_queue=0)
    busy, b, c, d = (alone.reserve() for _ in range(4))
    c.release()
    d.release()
    for slot in (2, 3):
        alone._freed_at[slot] -= 60
    b.release()  # slot 1, freed just now, is the only free slot next to busy 0
    assert alone.reserve().slot == 1  # taken: 2 or 3 would add a run
    assert busy.slot == 0
