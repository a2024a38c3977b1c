"""SlotController: N generation slots in front of the workers, and a bounded FIFO wait queue.

Every method runs on the event loop; nothing here blocks or touches a thread.
"""

from __future__ import annotations

import asyncio
import collections
import math
import time
from dataclasses import dataclass

from llamastream.errors import QueueFullError


@dataclass(frozen=True)
class Load:
    """A snapshot of the controller, as `/get_load` reports it."""

    processing: int
    waiting: int
    max_processing: int
    max_waiting: int


class Ticket:
    """A place in line. ``await ticket.wait()`` returns the slot index once it is granted.

    Cancelling the wait (a client that left) takes the ticket out of the queue, or gives a slot
    granted in the meantime straight back. ``release()`` is idempotent.
    """

    def __init__(self, controller: SlotController) -> None:
        self.controller = controller
        self._future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.enqueued_at = time.monotonic()
        self.slot: int | None = None
        self._released = False

    @property
    def granted(self) -> bool:
        return self.slot is not None

    def _grant(self, slot: int) -> None:
        self.slot = slot
        if not self._future.done():
            self._future.set_result(slot)

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

    def reserve(self, prefer: int | None = None) -> Ticket:
        """A ticket that holds a slot or a place in line; `QueueFullError` when neither is left.

        A free ``prefer`` slot (the one that served the conversation last, whose KV cache still
        holds its history) is taken first; otherwise the slot free the longest, which keeps
        other conversations' caches alive the longest.
        """
        ticket = Ticket(self)
        if prefer is not None and prefer in self._free:
            self._free.remove(prefer)
            self._give(ticket, prefer)
        elif self._free:
            self._give(ticket, self._free.popleft())
        elif len(self._waiting) < self.max_queue:
            self._waiting.append(ticket)
        else:
            raise QueueFullError(retry_after=self.retry_after())
        return ticket

    def free_slots(self) -> list[int]:
        return list(self._free)

    def load(self) -> Load:
        return Load(
            processing=self.n_slots - len(self._free),
            waiting=len(self._waiting),
            max_processing=self.n_slots,
            max_waiting=self.max_queue,
        )

    def retry_after(self) -> int:
        """Seconds until a slot is likely free for a new request: recent durations x queue depth."""
        typical = sorted(self._durations)[len(self._durations) // 2] if self._durations else 1.0
        rounds = (len(self._waiting) + 1) / self.n_slots
        return max(1, math.ceil(typical * rounds))

    def _give(self, ticket: Ticket, slot: int) -> None:
        self._held_since[slot] = time.monotonic()
        ticket._grant(slot)

    def _leave(self, ticket: Ticket) -> None:
        if ticket.slot is None:
            try:
                self._waiting.remove(ticket)
            except ValueError:
                pass
            return
        slot = ticket.slot
        self._durations.append(time.monotonic() - self._held_since.pop(slot))
        if self._waiting:
            self._give(self._waiting.popleft(), slot)
        else:
            self._free.append(slot)
