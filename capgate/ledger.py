"""The audit ledger format: hash-chained JSON lines with signed checkpoints. Pure: no I/O but files.

Every line is one JSON object with ``seq`` (1, 2, 3, … across the whole file), ``prev`` (the
``hash`` of the line before; 64 zeros for the first) and ``hash`` = SHA-256 of the canonical JSON
of the record without ``hash``. Editing a line breaks its own hash; deleting or reordering lines
breaks ``prev``/``seq``. A chain alone can be rebuilt by whoever rewrites the whole file, so every
N records or T seconds the writer appends a **checkpoint**::

    {"type": "checkpoint", "seq": .., "prev": .., "head_seq": .., "session_key": "<id>",
     "endorsement": "<root-signed session key statement>", "signature": "<session key signature>"}

signed with the sidecar's receipt session key, whose endorsement (the same one receipts carry)
verifies with the trust bundle. Lines before the last valid checkpoint are therefore provably what
the sidecar wrote; lines after it are reported as *unsigned* — the only way to notice a file cut
short at the end is that its tail is not covered by a checkpoint.

``capgate audit verify FILE --trust root.pub`` prints :func:`verify`'s report.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from capgate.capabilities.keys import TrustBundle

GENESIS = "0" * 64
SKEW = timedelta(seconds=30)
CHECKPOINT = "checkpoint"
MAX_LINE_BYTES = 64 * 1024


def canonical(record: dict[str, Any]) -> bytes:
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def record_hash(record: dict[str, Any]) -> str:
    """SHA-256 over the record without its own ``hash`` field."""
    body = {k: v for k, v in record.items() if k != "hash"}
    return hashlib.sha256(canonical(body)).hexdigest()


def checkpoint_message(record: dict[str, Any]) -> bytes:
    """What a checkpoint signature covers: the record minus ``signature`` and ``hash``."""
    return canonical({k: v for k, v in record.items() if k not in ("signature", "hash")})


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass
class Chain:
    """Write side: seals records into lines, continuing from ``head`` (``seq``, ``hash``)."""

    seq: int = 0
    head: str = GENESIS

    def seal(self, record: dict[str, Any]) -> str:
        """Return the line (with newline) for ``record``, advancing the chain.

        The canonical bytes are serialised once and hashed; ``hash`` is appended as the last key
        (lines need not be key-sorted: verification re-serialises canonically).
        """
        body = canonical({**record, "seq": self.seq + 1, "prev": self.head})
        digest = hashlib.sha256(body).hexdigest()
        self.seq += 1
        self.head = digest
        return body[:-1].decode("ascii") + ',"hash":"' + digest + '"}\n'

    def checkpoint(self, *, time: str, session_key_id: str, endorsement: str,
                   sign: Callable[[bytes], bytes]) -> str:
        """A signed checkpoint covering every line up to the current head."""
        record: dict[str, Any] = {"type": CHECKPOINT, "time": time, "head_seq": self.seq,
                                  "session_key": session_key_id, "endorsement": endorsement,
                                  "seq": self.seq + 1, "prev": self.head}
        record["signature"] = _b64(sign(checkpoint_message(record)))
        record["hash"] = record_hash(record)
        self.seq += 1
        self.head = record["hash"]
        return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=True) + "\n"

    @classmethod
    def resume(cls, path: Path) -> Chain:
        """Continue the chain of an existing file from its last line (a fresh chain if unreadable)."""
        try:
            with path.open("rb") as handle:
                handle.seek(0, 2)
                size = handle.tell()
                handle.seek(max(0, size - MAX_LINE_BYTES))
                tail = handle.read().splitlines()
        except OSError:
            return cls()
        for line in reversed(tail):
            try:
                last = json.loads(line)
                return cls(seq=int(last["seq"]), head=str(last["hash"]))
            except (ValueError, KeyError, TypeError):
                return cls()
        return cls()


@dataclass
class LedgerReport:
    ok: bool = True
    records: int = 0
    checkpoints: int = 0
    signed_through: int = 0
    """``seq`` of the last line covered by a valid checkpoint."""
    unsigned: int = 0
    """Lines after the last valid checkpoint: cannot be told apart from a truncated or rewritten tail."""
    problems: list[str] = field(default_factory=list)
    unverified_checkpoints: int = 0
    """Checkpoints seen without a trust bundle to check them against (``--trust`` not given)."""

    def problem(self, text: str) -> None:
        self.ok = False
        self.problems.append(text)

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "records": self.records, "checkpoints": self.checkpoints,
                "signedThrough": self.signed_through, "unsigned": self.unsigned, "problems": self.problems}

    def summary(self) -> str:
        status = "OK" if self.ok else "TAMPERED"
        lines = [f"{status}: {self.records} records, {self.checkpoints} valid checkpoints, "
                 f"signed through seq {self.signed_through}, {self.unsigned} unsigned at the end"]
        if self.unverified_checkpoints:
            lines.append(f"  note: {self.unverified_checkpoints} checkpoints not verified (give --trust root.pub); "
                         "without them the chain proves order, not authorship")
        lines += [f"  - {p}" for p in self.problems]
        return "\n".join(lines)


def verify(path: str | Path, trust: TrustBundle | None) -> LedgerReport:
    """Check every line's hash and link, and every checkpoint's signature against ``trust``."""
    try:
        with Path(path).open("rb") as handle:
            return verify_lines(handle, trust)
    except OSError as exc:
        report = LedgerReport()
        report.problem(f"cannot read {path}: {exc.strerror}")
        return report


def verify_lines(lines: Iterable[bytes], trust: TrustBundle | None) -> LedgerReport:
    report = LedgerReport()
    prev_hash: str | None = None
    prev_seq: int | None = None
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        record = _parse(raw, number, report)
        if record is None:
            prev_hash = prev_seq = None
            continue
        report.records += 1
        seq, link = record.get("seq"), record.get("prev")
        if record_hash(record) != record.get("hash"):
            report.problem(f"line {number} (seq {seq}): content does not match its hash (edited)")
        if prev_hash is not None and link != prev_hash:
            report.problem(f"line {number} (seq {seq}): does not follow the line before "
                           f"({_gap(prev_seq, seq)})")
        elif report.records == 1 and (link != GENESIS or seq != 1):
            report.problem(f"line {number} (seq {seq}): the ledger does not start at seq 1 (head deleted)")
        prev_hash, prev_seq = str(record.get("hash")), seq if isinstance(seq, int) else None
        if record.get("type") != CHECKPOINT:
            report.unsigned += 1
            continue
        if trust is None:
            report.unverified_checkpoints += 1
            continue
        problem = check_checkpoint(record, trust)
        if problem:
            report.problem(f"line {number} (seq {seq}): {problem}")
            continue
        report.checkpoints += 1
        report.signed_through = int(record["head_seq"])
        report.unsigned = 0
    return report


def _gap(prev_seq: int | None, seq: object) -> str:
    if not isinstance(seq, int) or prev_seq is None:
        return "chain broken"
    if seq > prev_seq + 1:
        return f"seq {prev_seq + 1}..{seq - 1} deleted"
    if seq <= prev_seq:
        return "lines reordered or duplicated"
    return "the line before was edited or replaced"


def _parse(raw: bytes, number: int, report: LedgerReport) -> dict[str, Any] | None:
    try:
        record = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        report.problem(f"line {number}: not JSON (corrupted or cut)")
        return None
    if not isinstance(record, dict):
        report.problem(f"line {number}: not a JSON object")
        return None
    return record


def check_checkpoint(record: dict[str, Any], trust: TrustBundle) -> str | None:
    """Why a checkpoint does not verify, or None when its signature chains to a trusted root."""
    try:
        statement_b64, statement_sig_b64 = str(record["endorsement"]).split(".")
        statement_raw = _unb64(statement_b64)
        statement = json.loads(statement_raw)
        moment = datetime.fromisoformat(str(record["time"]).replace("Z", "+00:00"))
        root_id = statement["rk"]
        signature = _unb64(str(record["signature"]))
        if not isinstance(root_id, int) or not isinstance(record.get("head_seq"), int):
            return "checkpoint is malformed"
        if not trust.verify_signature(root_id, _unb64(statement_sig_b64), statement_raw, moment):
            return "checkpoint's session key is not endorsed by a trusted root key"
        if statement.get("sid") != record.get("session_key"):
            return "checkpoint names another session key than its endorsement"
        if moment.timestamp() > int(statement["signUntil"]) + SKEW.total_seconds():
            return "checkpoint signed after its session key expired"
        Ed25519PublicKey.from_public_bytes(bytes.fromhex(str(statement["pub"]))).verify(
            signature, checkpoint_message(record))
    except (KeyError, ValueError, TypeError, binascii.Error):
        return "checkpoint is malformed"
    except Exception:  # noqa: BLE001 - any failure here fails closed and is logged
        return "checkpoint signature does not verify (edited)"
    return None


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
