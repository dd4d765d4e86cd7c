"""The shared usage object as a compare-and-swap store, without the Kubernetes client.

Fleet-wide budgets (:mod:`capgate.sidecar.usage`) and single-use receipts
(:mod:`capgate.sidecar.consumption`) both read and write one ``AgentCapabilityUsage`` status through
this interface; a standalone sidecar uses an in-memory store and so never loads the Kubernetes client.
"""

from __future__ import annotations

import asyncio
import random
from typing import Any, Protocol

RETRY_SECONDS = 1.0
"""After the state could not be reached, how long refusals rest on that before asking again."""
MAX_ATTEMPTS = 12
"""Conflicts in a row before giving up (each one means another writer made progress)."""
CONFLICT_BACKOFF_SECONDS = 0.004, 0.1
"""The first and the largest bound of the jittered wait after a conflict (it doubles each time)."""


async def after_conflict(attempt: int) -> None:
    """Wait a random moment before the next attempt after the ``attempt``-th conflict in a row.

    Near a budget's end every call needs a write, and sidecars that lost to each other would retry in
    step: three replicas hammering one budget once saw a sidecar lose eight times running and refuse
    a call ``usage_unavailable``. A jittered, doubling wait (at most ~0.8 s over all attempts) lets
    one writer through at a time."""
    first, largest = CONFLICT_BACKOFF_SECONDS
    await asyncio.sleep(random.uniform(0, min(largest, first * 2 ** attempt)))  # noqa: S311 - not a secret


class StateUnavailable(Exception):
    """The usage object could not be read or written; the message names why (never a credential)."""


class Conflict(Exception):
    """The object changed since it was read (HTTP 409)."""


class UsageStore(Protocol):
    """Read and compare-and-swap the status of one usage object."""

    async def read(self) -> tuple[str, dict[str, Any]]: ...

    async def write(self, version: str, status: dict[str, Any]) -> tuple[str, dict[str, Any]]: ...

    async def close(self) -> None: ...
