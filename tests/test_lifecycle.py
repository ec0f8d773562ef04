"""The router's lifecycle: phases move forward only, and listeners hear each move once."""

from __future__ import annotations

from router.lifecycle.state import Lifecycle, Phase


def test_phases_move_forward_once_each() -> None:
    lifecycle = Lifecycle()
    heard: list[Phase] = []
    lifecycle.add_listener(heard.append)
    assert (lifecycle.phase, lifecycle.draining, lifecycle.abandoned) == (
        Phase.SERVING, False, False)

    lifecycle.start_drain()
    lifecycle.start_drain()  # a second signal: no second move
    assert (lifecycle.draining, lifecycle.abandoned) == (True, False)
    lifecycle.abandon()
    lifecycle.start_drain()  # never back
    assert (lifecycle.phase, lifecycle.draining, lifecycle.abandoned) == (
        Phase.ABANDONED, True, True)
    assert heard == [Phase.DRAINING, Phase.ABANDONED]
    assert repr(lifecycle) == "Lifecycle(abandoned)"


def test_abandon_from_serving_skips_nothing_it_needs() -> None:
    lifecycle = Lifecycle()
    lifecycle.abandon()
    assert lifecycle.draining and lifecycle.abandoned
