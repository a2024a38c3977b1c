"""SlotController: N generation slots in front of the workers, and a bounded FIFO wait queue.

Every method runs on the event loop; nothing here blocks or touches a thread.
"""

from __future__ import annotations

import asyncio
import collections
import math
import time
from dataclasses import dataclass

from llamastream.errors import InvalidRequestError, QueueFullError

# A slot its request left this recently keeps its KV cache while another slot as good for
# packing is free: a conversation's next turn (an agent's after a tool call, a client resending
# the history) finds its prefix there.
RECENT_S = 2.0


def packing_rank(busy_neighbours: int, recent: bool) -> tuple[bool, bool, int]:
    """How good a free slot is for a new conversation, the higher the better: next to a busy
    slot (no new run of busy slots: a worker's step computes each run apart, a pass over the
    weights each), not freed recently (its cache kept for its conversation's next turn), next
    to more busy slots."""
    return (busy_neighbours > 0, not recent, busy_neighbours)


@dataclass(frozen=True)
class Load:
    """A snapshot of the controller, as `/get_load` reports it."""

    processing: int
    waiting: int
    max_processing: int
    max_waiting: int


class Ticket:
    """A place in line for ``count`` slots, granted all at once (a request with several
    candidates runs whole or waits whole). ``await ticket.wait()`` returns the first slot
    index once they are granted; ``slots`` holds them all.

    Cancelling the wait (a client that left) takes the ticket out of the queue, or gives slots
    granted in the meantime straight back. ``release()`` is idempotent.
    """

    def __init__(self, controller: SlotController, count: int = 1) -> None:
        self.controller = controller
        self.count = count
        self._future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.enqueued_at = time.monotonic()
        self.slots: list[int] = []  # held so far; all ``count`` of them once granted
        self._released = False

    @property
    def granted(self) -> bool:
        return len(self.slots) == self.count

    @property
    def slot(self) -> int | None:
        """The first slot, once the ticket is granted."""
        return self.slots[0] if self.granted else None

    def _take(self, slot: int) -> None:
        self.slots.append(slot)
        if self.granted and not self._future.done():
            self._future.set_result(self.slots[0])

    async def wait(self) -> int:
        try:
            return await self._future
        except asyncio.CancelledError:
            self.release()
            raise

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        self._future.cancel()
        self.controller._leave(self)


class SlotController:
    """Hands out ``n_slots`` slots in FIFO order to at most ``max_queue`` waiting tickets."""

    def __init__(self, n_slots: int, max_queue: int) -> None:
        self.n_slots = n_slots
        self.max_queue = max_queue
        self._free: collections.deque[int] = collections.deque(range(n_slots))
        self._waiting: collections.deque[Ticket] = collections.deque()
        self._durations: collections.deque[float] = collections.deque(maxlen=32)
        self._held_since: dict[int, float] = {}
        self._freed_at: dict[int, float] = {}  # when each slot's last request left it

    def reserve(self, prefer: int | None = None, count: int = 1) -> Ticket:
        """A ticket that holds ``count`` slots or a place in line; `QueueFullError` when
        neither is left (``count`` above the slots there are: `InvalidRequestError`).

        A free ``prefer`` slot (the one that served the conversation last, whose KV cache still
        holds its history) is taken first; otherwise `_pick`'s: next to busy ones, of those
        not one freed in the last `RECENT_S` (a conversation's next turn finds its cache), of
        those the one free the longest. Slots go to tickets in the order they came: a ticket
        waiting for several holds those freed until it has them all.
        """
        if count > self.n_slots:
            raise InvalidRequestError(
                f"n: at most {self.n_slots} candidates (the server's slots)", field="n"
            )
        ticket = Ticket(self, count)
        if not self._waiting and len(self._free) >= count:
            if prefer is not None and prefer in self._free:
                self._free.remove(prefer)
                self._give(ticket, prefer)
            while not ticket.granted:
                self._give(ticket, self._pick())
        elif len(self._waiting) < self.max_queue:
            self._waiting.append(ticket)
            self._hand_out()
        else:
            raise QueueFullError(retry_after=self.retry_after())
        return ticket

    def free_slots(self) -> list[int]:
        """The free slots, free the longest first."""
        return list(self._free)

    def recently_freed(self) -> set[int]:
        """Free slots whose last request left them under `RECENT_S` ago: their caches are
        kept for the conversations' next turns while other slots are free."""
        now = time.monotonic()
        return {s for s in self._free if now - self._freed_at.get(s, -math.inf) < RECENT_S}

    def load(self) -> Load:
        return Load(
            processing=self.n_slots - len(self._free),  # held by a waiting ticket too
            waiting=len(self._waiting),
            max_processing=self.n_slots,
            max_waiting=self.max_queue,
        )

    def retry_after(self) -> int:
        """Seconds until a slot is likely free for a new request: recent durations x queue depth."""
        typical = sorted(self._durations)[len(self._durations) // 2] if self._durations else 1.0
        rounds = (len(self._waiting) + 1) / self.n_slots
        return max(1, math.ceil(typical * rounds))

    def _pick(self) -> int:
        """Take the free slot that adds no run of busy slots (one next to a busy slot), of
        those one not freed recently (`recently_freed`: its cache may serve its conversation's
        next turn), then the one next to the most busy ones; among equals, the one free the
        longest.

        A worker's step computes each run of consecutive busy slots apart (llama.cpp's
        sequences kept apart), one pass over the weights each: a new run costs every step a
        pass, more than a conversation reading its history again once, so packing comes first.
        """
        free = set(self._free)
        recent = self.recently_freed()

        def rank(slot: int) -> tuple[bool, bool, int]:
            busy = sum(0 <= s < self.n_slots and s not in free for s in (slot - 1, slot + 1))
            return packing_rank(busy, slot in recent)

        best = max(self._free, key=rank)  # the first of the best: free the longest
        self._free.remove(best)
        return best

    def _give(self, ticket: Ticket, slot: int) -> None:
        self._held_since[slot] = time.monotonic()
        ticket._take(slot)

    def _hand_out(self) -> None:
        """Free slots to the waiting tickets, first come first served."""
        while self._waiting and self._free:
            head = self._waiting[0]
            self._give(head, self._pick())
            if head.granted:
                self._waiting.popleft()

    def _leave(self, ticket: Ticket) -> None:
        if not ticket.granted:
            try:
                self._waiting.remove(ticket)
            except ValueError:
                pass
        now = time.monotonic()
        for slot in ticket.slots:  # granted, or held while waiting for more
            held = self._held_since.pop(slot)
            if ticket.granted:  # (a slot only held while waiting keeps its earlier cache)
                self._durations.append(now - held)
                self._freed_at[slot] = now
            self._free.append(slot)
        ticket.slots = []
        self._hand_out()
