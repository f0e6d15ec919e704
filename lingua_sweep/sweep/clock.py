"""The sweep controller's clock: the wall clock, or virtual time for a sweep on simulated
clusters that asks for it (`simulated: {clock: virtual}` on every cluster).

On virtual time, calls to a cluster take no time and run on the main loop's thread, in one
order, and the loop's sleeps jump the clock forward. On the wall clock, a benchmark's simulated
day ran at 60x, so a moment of CPU contention in the launcher was a simulated minute, and two
runs of the same code gave makespans 5% apart; on virtual time a run takes seconds of CPU and
repeats itself.
"""

import threading
import time
from collections.abc import Callable


class WallClock:
    virtual = False

    def now(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)


class VirtualClock:
    virtual = True

    def __init__(self, start: float):
        self._t = start

    def now(self) -> float:
        return self._t

    def monotonic(self) -> float:
        return self._t

    def sleep(self, seconds: float) -> None:
        self._t += max(seconds, 0.0)


_clock: WallClock | VirtualClock = WallClock()


def use(clock: WallClock | VirtualClock) -> None:
    global _clock
    _clock = clock


def virtual() -> bool:
    return _clock.virtual


def now() -> float:
    """Epoch seconds (journal times are these)."""
    return _clock.now()


def monotonic() -> float:
    return _clock.monotonic()


def sleep(seconds: float) -> None:
    _clock.sleep(seconds)


def start_thread(target: Callable[..., object], *args: object, name: str) -> None:
    """A daemon thread for work beside the main loop. On virtual time the work runs at once on
    this thread: on threads, an answer came before or after the placement that read it, and
    one seed's makespan came out 6,115 or 6,620 s."""
    if _clock.virtual:
        target(*args)
        return
    threading.Thread(target=target, args=args, name=name, daemon=True).start()
