"""How long each fuzz target runs: a smoke budget in ``make test``, a long run in ``make fuzz``.

``ROUTER_FUZZ`` picks the profile:

* unset or ``smoke``: each target runs once with its own small ``max_examples`` (the smoke
  budget, chosen so that all of tests/fuzz takes ~10 s on 2 shared cores);
* ``fuzz``: each target runs hypothesis again and again, ``ROUTER_FUZZ_EXAMPLES`` examples per
  run (default 500), each run with a fresh random seed, until ``ROUTER_FUZZ_SECONDS`` (per
  target, default 60) have passed. Hypothesis has no time budget of its own; repeated runs give
  one while keeping shrinking and the example database (a failure found in one run is tried
  first in every later one, and printed with its ``@reproduce_failure`` blob).

A failure the long run finds becomes an ``@example`` on the target, so ``make test`` keeps it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from hypothesis import HealthCheck, settings

PROFILE = os.environ.get("ROUTER_FUZZ", "smoke")
if PROFILE not in ("smoke", "fuzz"):
    raise ValueError(f"ROUTER_FUZZ must be 'smoke' or 'fuzz', not {PROFILE!r}")
FUZZ_SECONDS = float(os.environ.get("ROUTER_FUZZ_SECONDS", "60"))
FUZZ_EXAMPLES = int(os.environ.get("ROUTER_FUZZ_EXAMPLES", "500"))
# Bounds the number of runs as well as their time, should a run ever take no time at all.
MAX_RUNS = 10_000

settings.register_profile(
    "router-fuzz-smoke", deadline=None, print_blob=True, stateful_step_count=40,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "router-fuzz-long", settings.get_profile("router-fuzz-smoke"), max_examples=FUZZ_EXAMPLES,
    stateful_step_count=100,
)

TestFunction = Callable[..., None]


def budget(smoke_examples: int, **overrides: Any) -> settings:
    """The hypothesis settings of one run of a target under the current profile.

    ``overrides`` apply to both profiles (``stateful_step_count``, ...).
    """
    if PROFILE == "smoke":
        return settings(
            settings.get_profile("router-fuzz-smoke"), max_examples=smoke_examples, **overrides
        )
    return settings(settings.get_profile("router-fuzz-long"), **overrides)


def run_for_budget(run: Callable[[], None]) -> None:
    """``run()`` once (smoke), or again and again until ``ROUTER_FUZZ_SECONDS`` (fuzz)."""
    if PROFILE == "smoke":
        run()
        return
    deadline = time.monotonic() + FUZZ_SECONDS
    for _ in range(MAX_RUNS):
        run()
        if time.monotonic() >= deadline:
            return


def fuzz_target(smoke_examples: int, **overrides: Any) -> Callable[[TestFunction], TestFunction]:
    """Decorate a ``@given`` test with its budget (see ``budget`` and ``run_for_budget``)."""

    def decorate(test: TestFunction) -> TestFunction:
        hypothesis_test = budget(smoke_examples, **overrides)(test)
        if PROFILE == "smoke":
            return hypothesis_test

        def run_until_the_budget_is_spent() -> None:
            run_for_budget(hypothesis_test)

        # Not functools.wraps: pytest would follow __wrapped__ to the @given signature.
        run_until_the_budget_is_spent.__name__ = test.__name__
        run_until_the_budget_is_spent.__qualname__ = test.__qualname__
        run_until_the_budget_is_spent.__doc__ = test.__doc__
        run_until_the_budget_is_spent.__module__ = test.__module__
        return run_until_the_budget_is_spent

    return decorate
