"""The sweep controller's clock: the wall clock, or virtual time for a sweep on simulated
clusters that asks for it (`simulated: {clock: virtual}` on every cluster).

Virtual time stands still while the launcher works and jumps over the main loop's sleeps once
every call it started in the background (a cluster's thread, a start estimate) has returned.
On the wall clock, a benchmark's simulated day ran at 60x on a real clock, so a launcher's
moment of CPU contention was a minute of simulated time, and two runs of the same code gave
makespans 5% apart; on virtual time the same run takes seconds of CPU and repeats itself.
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

    def begun(self) -> Callable[[], None]:
        return _nothing


class VirtualClock:
    virtual = True
    # Real seconds a sleep waits for the background calls to return: a simulated cluster
    # answers in milliseconds, so this is only a guard against a call that never returns.
    SETTLE_S = 30.0

    def __init__(self, start: float):
        self._t = start
        self._busy = 0
        self._changed = threading.Condition()

    def now(self) -> float:
        return self._t

    def monotonic(self) -> float:
        return self._t

    def sleep(self, seconds: float) -> None:
        # Only the main loop moves time: a retry's pause on a cluster's thread is no pause.
        if threading.current_thread() is not threading.main_thread():
            return
        with self._changed:
            self._changed.wait_for(lambda: self._busy == 0, timeout=self.SETTLE_S)
            self._t += max(seconds, 0.0)

    def begun(self) -> Callable[[], None]:
        """A call handed to another thread: time waits until the function returned is called
        (when the call has returned)."""
        with self._changed:
            self._busy += 1
        ended = threading.Event()

        def done() -> None:
            if not ended.is_set():
                ended.set()
                with self._changed:
                    self._busy -= 1
                    self._changed.notify_all()

        return done


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


def begun() -> Callable[[], None]:
    """Call when handing work to another thread; call what it returns once that work returned."""
    return _clock.begun()


def start_thread(target: Callable[..., object], *args: object, name: str) -> None:
    """A daemon thread for work beside the main loop (on virtual time, time waits for it)."""
    done = begun()

    def run() -> None:
        try:
            target(*args)
        finally:
            done()

    threading.Thread(target=run, name=name, daemon=True).start()


def _nothing() -> None:
    pass
