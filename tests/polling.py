"""Waiting for the real cluster: poll a condition instead of sleeping a guessed time."""

from __future__ import annotations

import time
from typing import Any, Callable


def wait_for(predicate: Callable[[], Any], timeout: float = 90.0, what: str = "condition",
             every: float = 0.5) -> Any:
    """Return the first truthy value of `predicate()`; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"{what}: not met within {timeout:.0f}s")
