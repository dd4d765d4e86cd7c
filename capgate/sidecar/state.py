"""The shared usage object as a compare-and-swap store, without the Kubernetes client.

Fleet-wide budgets (:mod:`capgate.sidecar.usage`) and single-use receipts
(:mod:`capgate.sidecar.consumption`) both read and write one ``AgentCapabilityUsage`` status through
this interface; a standalone sidecar uses an in-memory store and so never loads the Kubernetes client.
"""

from __future__ import annotations

from typing import Any, Protocol

RETRY_SECONDS = 1.0
"""After the state could not be reached, how long refusals rest on that before asking again."""
MAX_ATTEMPTS = 8
"""Conflicts in a row before giving up (each one means another writer made progress)."""


class StateUnavailable(Exception):
    """The usage object could not be read or written; the message names why (never a credential)."""


class Conflict(Exception):
    """The object changed since it was read (HTTP 409)."""


class UsageStore(Protocol):
    """Read and compare-and-swap the status of one usage object."""

    async def read(self) -> tuple[str, dict[str, Any]]: ...

    async def write(self, version: str, status: dict[str, Any]) -> tuple[str, dict[str, Any]]: ...

    async def close(self) -> None: ...
