"""The sidecar's audit ledger: one hash-chained JSON line per decision, signed checkpoints.

The format and its verification live in :mod:`capgate.ledger` (pure, shared with
``capgate audit verify``); this module is the writer. A record names what was decided and why —
time, decision id, capability, principal, upstream, method, normalized path (never the query
string, which may carry keys), rule, outcome, reason, status, latency and the credential's
revocation-id prefix. It never holds a token, a receipt, a header value or an injected secret: the
fields are chosen here, from typed values, never copied from the request wholesale.

Writes are small synchronous appends (line-buffered, a few microseconds): cheaper than a thread
hop, and a record must be on its way before the response is.

A run begins with a ``start`` line and, on a graceful stop (SIGTERM, the app's cleanup), ends with a
*closing* checkpoint, even when nothing is new since the last one: that is what lets ``capgate audit
verify`` tell a cleanly stopped ledger from one whose end was cut off or whose writer was killed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, TextIO

from capgate import ledger
from capgate.capabilities import receipts

log = logging.getLogger("capgate.sidecar.audit")

Outcome = Literal["allowed", "denied", "would_deny", "error"]


class AuditLog:
    """Append-only ledger writer; ``path == "-"`` writes to stdout."""

    def __init__(self, path: str, *, checkpoint_every: int = 1000,
                 session: Callable[[], receipts.SessionKey | None] = lambda: None) -> None:
        self.path = path
        self.checkpoint_every = checkpoint_every
        self.session = session
        self._since_checkpoint = 0
        self._stream: TextIO | None = None
        self.chain = ledger.Chain()
        self.records = 0

    def open(self) -> None:
        if self.path == "-":
            self._stream = sys.stdout
        else:
            target = Path(self.path)
            self.chain = ledger.Chain.resume(target) if target.exists() else ledger.Chain()
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            self._stream = os.fdopen(fd, "a", encoding="ascii", buffering=1)
        self._seal({"type": ledger.START, "time": ledger.now_iso()})

    def close(self) -> None:
        """Sign everything with a closing checkpoint, then close: a clean shutdown leaves the whole run covered."""
        if self._stream is None:
            return
        if not self.checkpoint(closing=True):
            log.error("audit ledger closed without a signed closing checkpoint (no usable session key): "
                      "`capgate audit verify` will report its end as unverified")
        if self._stream is not sys.stdout:
            self._stream.close()
        self._stream = None

    def write(self, record: dict[str, Any]) -> None:
        """Seal and append one decision record (the caller builds it from safe fields only)."""
        if self._stream is None:
            return
        self._seal({"time": ledger.now_iso(), **record})
        self.records += 1
        if self._since_checkpoint >= self.checkpoint_every:
            self.checkpoint()

    def _seal(self, record: dict[str, Any]) -> None:
        self._emit(self.chain.seal(record))
        self._since_checkpoint += 1

    def checkpoint(self, *, closing: bool = False) -> bool:
        """Append a signed checkpoint if there is anything new (or this is the closing one) and a usable key."""
        session = self.session()
        if self._stream is None or session is None or (self._since_checkpoint == 0 and not closing):
            return False
        if datetime.now(UTC) > session.not_after:
            # Its endorsement no longer covers signing: such a checkpoint would read as forged. Leave the
            # records unsigned (verify says UNVERIFIED, which is the truth) until a fresh key arrives.
            log.warning("audit checkpoint skipped: session key %s expired", session.key_id)
            return False
        line = self.chain.checkpoint(time=ledger.now_iso(), session_key_id=session.key_id,
                                     endorsement=session.endorsement, sign=session.sign, closing=closing)
        self._emit(line)
        self._since_checkpoint = 0
        return True

    def _emit(self, line: str) -> None:
        assert self._stream is not None
        try:
            self._stream.write(line)
            self._stream.flush()
        except (OSError, ValueError) as exc:
            # The chain has advanced; the verifier will report the gap. Never take the proxy down.
            log.error("audit ledger write failed: %s", type(exc).__name__)

    async def run(self, interval: float) -> None:
        """Time-based checkpoints, so a quiet sidecar's last records get signed too."""
        while True:
            await asyncio.sleep(interval)
            try:
                self.checkpoint()
            except Exception as exc:  # noqa: BLE001 - any failure here fails closed and is logged
                log.error("audit checkpoint failed: %s", type(exc).__name__)
