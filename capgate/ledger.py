"""The audit ledger format: hash-chained JSON lines with signed checkpoints. Pure: no I/O but files.

Every line is one JSON object with ``seq`` (1, 2, 3, … across the whole file), ``prev`` (the
``hash`` of the line before; 64 zeros for the first) and ``hash`` = SHA-256 of the canonical JSON
of the record without ``hash``. Editing a line breaks its own hash; deleting or reordering lines
breaks ``prev``/``seq``. A chain alone can be rebuilt by whoever rewrites the whole file, so every
N records or T seconds, and when it shuts down, the writer appends a **checkpoint**::

    {"type": "checkpoint", "seq": .., "prev": .., "head_seq": .., "session_key": "<id>",
     "endorsement": "<root-signed session key statement>", "signature": "<session key signature>",
     "closing": true}                      # only on the checkpoint written at a clean shutdown

signed with the sidecar's receipt session key, whose endorsement (the same one receipts carry)
verifies with the trust bundle. A checkpoint covers every line up to ``head_seq`` (its ``prev`` is
the hash of that line), so the lines it covers are provably what the sidecar wrote. A writer that
starts on a file appends a ``{"type": "start"}`` line first.

What :func:`verify` concludes — an auditor must not mistake "the chain is intact" for "proven":

* **TAMPERED**: a hash, link, ``seq`` or signature does not check out.
* **UNVERIFIED**: nothing is wrong, but not everything is proven: no trust bundle was given (a
  rewriter can recompute any chain), records follow the last valid checkpoint (a rewritten or
  forged tail looks exactly like this), the ledger does not end with a closing checkpoint (the
  sidecar is still running, was killed, *or the end was cut off* — a cut back to a checkpoint
  leaves no other trace), or a ``start`` line follows a run that did not close (killed, or its tail
  was cut and the file was resumed; its last unsigned records were signed only by its successor).
* **VERIFIED**: every record is covered by a valid signature and the ledger ends with a closing
  checkpoint. What cannot be detected: a whole later run deleted back to an earlier closing
  checkpoint, and a ledger replaced by an older genuine copy.

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
from typing import Any, Literal

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from capgate.capabilities.keys import TrustBundle

GENESIS = "0" * 64
SKEW = timedelta(seconds=30)
CHECKPOINT = "checkpoint"
START = "start"
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
                   sign: Callable[[bytes], bytes], closing: bool = False) -> str:
        """A signed checkpoint covering every line up to the current head (``closing``: the last one)."""
        record: dict[str, Any] = {"type": CHECKPOINT, "time": time, "head_seq": self.seq,
                                  "session_key": session_key_id, "endorsement": endorsement,
                                  "seq": self.seq + 1, "prev": self.head}
        if closing:
            record["closing"] = True
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


Verdict = Literal["VERIFIED", "UNVERIFIED", "TAMPERED"]


@dataclass
class LedgerReport:
    records: int = 0
    """Every line (decision records, ``start`` lines and checkpoints)."""
    checkpoints: int = 0
    """Checkpoints whose signature verified."""
    signed_through: int = 0
    """``seq`` of the last line covered by a valid checkpoint."""
    covered: int = 0
    """Lines the sidecar that wrote them also signed (a valid checkpoint of the same run covers them)."""
    unsigned: int = 0
    """Lines after the last valid checkpoint: cannot be told apart from a rewritten or forged tail."""
    orphaned: int = 0
    """Lines a run left unsigned when it stopped without closing; signed, if at all, by its successor."""
    unclean_stops: list[int] = field(default_factory=list)
    """``seq`` of each ``start`` line that follows a run which did not close."""
    closed: bool = False
    """The last line is a valid closing checkpoint."""
    trusted: bool = True
    """Signatures were checked (a trust bundle was given)."""
    problems: list[str] = field(default_factory=list)
    unverified_checkpoints: int = 0
    """Checkpoints seen without a trust bundle to check them against (``--trust`` not given)."""

    @property
    def ok(self) -> bool:
        """Nothing is tampered with (it may still be :attr:`verdict` UNVERIFIED)."""
        return not self.problems

    def problem(self, text: str) -> None:
        self.problems.append(text)

    def verdict(self, *, open_ok: bool = False) -> Verdict:
        """``open_ok``: the ledger is still being written, so its missing closing checkpoint is expected.

        An unsigned tail is never accepted, not even then: a forger who strips the checkpoints and
        claims the ledger is live would otherwise pass. A live ledger verifies right after a checkpoint.
        """
        if self.problems:
            return "TAMPERED"
        if not self.trusted or self.unsigned or self.orphaned or self.unclean_stops or self.records == 0:
            return "UNVERIFIED"
        if not open_ok and not self.closed:
            return "UNVERIFIED"
        return "VERIFIED"

    def as_dict(self, *, open_ok: bool = False) -> dict[str, Any]:
        return {"verdict": self.verdict(open_ok=open_ok), "ok": self.ok, "records": self.records,
                "covered": self.covered, "checkpoints": self.checkpoints, "signedThrough": self.signed_through,
                "unsigned": self.unsigned, "orphaned": self.orphaned, "uncleanStops": self.unclean_stops,
                "closed": self.closed, "problems": self.problems}

    def summary(self, *, open_ok: bool = False) -> str:
        verdict = self.verdict(open_ok=open_ok)
        signed = "checked" if self.trusted else "NOT checked (give --trust root.pub)"
        lines = [f"{verdict}: {self.covered} of {self.records} records covered by {self.checkpoints} valid signed "
                 f"checkpoints (signatures {signed})"]
        if not self.trusted:
            lines.append(f"  - {self.unverified_checkpoints} checkpoints not verified: without them the chain "
                         "proves order, not authorship — anyone can rewrite the file and recompute it")
        if self.unsigned:
            lines.append(f"  - UNVERIFIED: {self.unsigned} records after seq {self.signed_through} are not covered by "
                         "any signed checkpoint (a cut, rewritten or forged tail looks like this)")
        if self.orphaned or self.unclean_stops:
            where = ", ".join(f"seq {seq}" for seq in self.unclean_stops)
            lines.append(f"  - UNVERIFIED: a sidecar stopped without a closing checkpoint before {where} (killed, or "
                         f"its tail was cut and the file resumed); {self.orphaned} records it left unsigned")
        if self.records and not self.closed:
            lines.append("  - the ledger does not end with a closing checkpoint: the sidecar is still running, was "
                         "killed, or the end was cut off" + (" (accepted: --open)" if open_ok else ""))
        lines += [f"  - TAMPERED: {p}" for p in self.problems]
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
    report = LedgerReport(trusted=trust is not None)
    prev_hash: str | None = None
    prev_seq: int | None = None
    prev_closing = False
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
        if record.get("type") == START and report.records > 1 and not prev_closing:
            report.unclean_stops.append(seq if isinstance(seq, int) else number)
            report.orphaned += report.unsigned
            report.unsigned = 0
        prev_closing = False
        report.unsigned += 1
        if record.get("type") != CHECKPOINT:
            continue
        if trust is None:
            report.unverified_checkpoints += 1
            continue
        problem = check_checkpoint(record, trust)
        if problem:
            report.problem(f"line {number} (seq {seq}): {problem}")
            continue
        report.checkpoints += 1
        report.signed_through = int(record["seq"])
        report.covered += report.unsigned
        report.unsigned = 0
        prev_closing = record.get("closing") is True
    report.closed = prev_closing
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
