"""RFC 3339 timestamps as capgate writes and reads them: UTC, whole seconds, a ``Z`` suffix.

Kubernetes status fields, Secret settings, key files, RevocationList entries and token specs all
carry times; one writer and one reader keep them comparable byte for byte.
"""

from __future__ import annotations

from datetime import UTC, datetime


def iso(moment: datetime) -> str:
    """``2026-11-22T05:39:40Z``: UTC, truncated to the second (the precision Kubernetes keeps)."""
    return moment.astimezone(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def parse(text: object) -> datetime | None:
    """The time ``text`` names, timezone-aware (naive means UTC); None when it is not a timestamp."""
    if not isinstance(text, str):
        return None
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
