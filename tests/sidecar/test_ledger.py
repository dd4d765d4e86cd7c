"""The audit ledger: what a record holds, the hash chain, signed checkpoints, tamper detection."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from capgate import cli, ledger
from capgate.capabilities import keys, receipts
from capgate.sidecar.audit import AuditLog
from tests.sidecar.conftest import MakeSidecar, Sidecar


async def busy_ledger(sidecar: MakeSidecar, **settings: object) -> Sidecar:
    sc = await sidecar(checkpoint_every=4, **settings)
    for _ in range(5):
        await sc.client.get("/flights/search")
    await sc.client.delete("/flights/search")
    await sc.client.post("/payments/v1/charges", json={"amount": 30000})
    sc.gate.audit.checkpoint()
    return sc


async def test_one_record_per_decision_with_the_fields_an_auditor_needs(sidecar: MakeSidecar) -> None:
    sc = await sidecar()
    response = await sc.client.delete("/flights/search?secret=1")
    record = sc.decisions()[-1]
    assert record["decision_id"] == response.headers["X-Capgate-Decision-Id"]
    assert record["capability"] == "travel/booking-agent"
    assert (record["upstream"], record["method"], record["path"]) == ("flights", "DELETE", "/search")
    assert (record["outcome"], record["reason"], record["rule"], record["status"]) == (
        "denied", "deny_rule", "no-deletes", 403)
    assert len(record["credential"]) == 16
    assert record["latency_ms"] >= 0
    assert {"time", "seq", "prev", "hash"} <= set(record)


async def test_a_cleanly_closed_ledger_is_verified_and_fully_covered(sidecar: MakeSidecar,
                                                                     keyset: keys.KeySet) -> None:
    sc = await busy_ledger(sidecar)
    sc.gate.audit.close()
    report = ledger.verify(sc.audit_path, keyset.trust_bundle())
    assert report.verdict() == "VERIFIED", report.summary()
    assert report.records == report.covered == len(sc.audit_records())
    assert report.checkpoints >= 3
    assert report.unsigned == 0
    assert report.closed
    assert report.summary().startswith(f"VERIFIED: {report.records} of {report.records} records covered")


async def test_a_closing_checkpoint_is_written_even_when_nothing_is_new(sidecar: MakeSidecar,
                                                                       keyset: keys.KeySet) -> None:
    sc = await busy_ledger(sidecar)  # ends with a checkpoint already
    sc.gate.audit.close()
    assert sc.audit_records()[-1]["closing"] is True
    assert ledger.verify(sc.audit_path, keyset.trust_bundle()).verdict() == "VERIFIED"


async def test_a_live_ledger_is_unverified_unless_declared_open(sidecar: MakeSidecar, keyset: keys.KeySet) -> None:
    sc = await busy_ledger(sidecar)
    report = ledger.verify(sc.audit_path, keyset.trust_bundle())
    assert report.ok
    assert report.verdict() == "UNVERIFIED"
    assert "does not end with a closing checkpoint" in report.summary()
    assert report.verdict(open_ok=True) == "VERIFIED"


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines(keepends=True)


async def test_an_edited_record_is_detected(sidecar: MakeSidecar, keyset: keys.KeySet) -> None:
    sc = await busy_ledger(sidecar)
    content = lines(sc.audit_path)
    record = json.loads(content[5])
    record["outcome"] = "allowed" if record.get("outcome") != "allowed" else "denied"
    content[5] = json.dumps(record, sort_keys=True, separators=(",", ":")) + "\n"
    sc.audit_path.write_text("".join(content))
    report = ledger.verify(sc.audit_path, keyset.trust_bundle())
    assert not report.ok
    assert any("edited" in p for p in report.problems)


async def test_a_rehashed_edit_is_still_caught_by_the_chain_and_checkpoints(sidecar: MakeSidecar,
                                                                             keyset: keys.KeySet) -> None:
    sc = await busy_ledger(sidecar)
    content = lines(sc.audit_path)
    record = json.loads(content[1])
    record["outcome"] = "forged"
    record["hash"] = ledger.record_hash(record)
    content[1] = json.dumps(record) + "\n"
    sc.audit_path.write_text("".join(content))
    assert not ledger.verify(sc.audit_path, keyset.trust_bundle()).ok


async def test_a_deleted_record_is_detected(sidecar: MakeSidecar, keyset: keys.KeySet) -> None:
    sc = await busy_ledger(sidecar)
    content = lines(sc.audit_path)
    del content[2]
    sc.audit_path.write_text("".join(content))
    report = ledger.verify(sc.audit_path, keyset.trust_bundle())
    assert not report.ok
    assert any("deleted" in p for p in report.problems)


async def test_reordered_records_are_detected(sidecar: MakeSidecar, keyset: keys.KeySet) -> None:
    sc = await busy_ledger(sidecar)
    content = lines(sc.audit_path)
    content[1], content[2] = content[2], content[1]
    sc.audit_path.write_text("".join(content))
    report = ledger.verify(sc.audit_path, keyset.trust_bundle())
    assert not report.ok
    assert any("reordered" in p for p in report.problems)


async def test_records_after_the_last_checkpoint_are_reported_as_not_covered(sidecar: MakeSidecar,
                                                                             keyset: keys.KeySet) -> None:
    sc = await busy_ledger(sidecar)
    await sc.client.get("/flights/search")
    report = ledger.verify(sc.audit_path, keyset.trust_bundle())
    assert report.ok
    assert report.unsigned == 1
    assert report.verdict(open_ok=True) == "UNVERIFIED"  # live or not, an unsigned record is unproven
    assert "1 records after seq" in report.summary()


async def closed_ledger(sidecar: MakeSidecar) -> list[str]:
    sc = await busy_ledger(sidecar)
    await sc.client.get("/flights/search")
    sc.gate.audit.close()
    return lines(sc.audit_path)


async def test_a_truncated_tail_is_unverified(sidecar: MakeSidecar, keyset: keys.KeySet, tmp_path: Path) -> None:
    content = await closed_ledger(sidecar)
    cut = tmp_path / "cut.jsonl"
    cut.write_text("".join(content[:-1]))  # the closing checkpoint is gone
    report = ledger.verify(cut, keyset.trust_bundle())
    assert report.ok  # nothing is edited: only a signature can tell, and it is missing
    assert report.verdict() == "UNVERIFIED"
    assert (report.unsigned, report.closed) == (1, False)
    assert "UNVERIFIED: 1 records after seq" in report.summary()


async def test_a_tail_cut_back_to_a_checkpoint_is_unverified(sidecar: MakeSidecar, keyset: keys.KeySet,
                                                             tmp_path: Path) -> None:
    content = await closed_ledger(sidecar)
    last_plain = max(i for i, line in enumerate(content[:-1]) if '"checkpoint"' in line)
    cut = tmp_path / "cut.jsonl"
    cut.write_text("".join(content[:last_plain + 1]))  # every line left is signed, but the run never closed
    report = ledger.verify(cut, keyset.trust_bundle())
    assert (report.unsigned, report.closed) == (0, False)
    assert report.verdict() == "UNVERIFIED"
    assert "the end was cut off" in report.summary()


async def test_a_cut_that_a_restarted_sidecar_continued_is_reported(sidecar: MakeSidecar, keyset: keys.KeySet,
                                                                    tmp_path: Path) -> None:
    content = await closed_ledger(sidecar)
    path = tmp_path / "resumed.jsonl"
    path.write_text("".join(content[:-1]))
    second = await busy_ledger(sidecar, audit_log=str(path))
    second.gate.audit.close()
    report = ledger.verify(path, keyset.trust_bundle())
    assert report.ok
    assert report.verdict() == "UNVERIFIED"
    assert len(report.unclean_stops) == 1
    assert report.orphaned >= 1
    assert "stopped without a closing checkpoint" in report.summary()


async def test_a_rewritten_ledger_with_a_recomputed_chain_and_no_checkpoints_is_not_verified(
        sidecar: MakeSidecar, keyset: keys.KeySet, tmp_path: Path, root_key: Path) -> None:
    content = await closed_ledger(sidecar)
    chain = ledger.Chain()
    forged = []
    for line in content:
        record = json.loads(line)
        if record.get("type") == "checkpoint":
            continue
        body = {k: v for k, v in record.items() if k not in ("seq", "prev", "hash")}
        if body.get("outcome") == "denied":
            body["outcome"] = "allowed"
        forged.append(chain.seal(body))
    path = tmp_path / "forged.jsonl"
    path.write_text("".join(forged))
    report = ledger.verify(path, keyset.trust_bundle())
    assert report.ok  # the chain itself is consistent: that proves nothing
    assert (report.covered, report.checkpoints) == (0, 0)
    assert report.verdict() == "UNVERIFIED"
    trust = root_key.parent / "root.pub"
    assert cli.main(["audit", "verify", str(path), "--trust", str(trust)]) == cli.EXIT_UNVERIFIED
    assert cli.main(["audit", "verify", str(path)]) == cli.EXIT_UNVERIFIED
    assert cli.main(["audit", "verify", str(path), "--trust", str(trust), "--open"]) == cli.EXIT_UNVERIFIED


async def test_a_forged_checkpoint_signature_is_tampering(sidecar: MakeSidecar, keyset: keys.KeySet,
                                                          tmp_path: Path, root_key: Path) -> None:
    content = await closed_ledger(sidecar)
    closing = json.loads(content[-1])
    signature = closing["signature"]
    closing["signature"] = ("B" if signature[0] == "A" else "A") + signature[1:]
    closing["hash"] = ledger.record_hash(closing)
    path = tmp_path / "forged.jsonl"
    path.write_text("".join(content[:-1]) + json.dumps(closing) + "\n")
    report = ledger.verify(path, keyset.trust_bundle())
    assert report.verdict() == "TAMPERED"
    assert any("does not verify" in p for p in report.problems)
    assert cli.main(["audit", "verify", str(path), "--trust", str(root_key.parent / "root.pub")]) == cli.EXIT_DENIED


async def test_the_cli_exits_zero_only_for_a_verified_ledger(sidecar: MakeSidecar, root_key: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "closed.jsonl"
    path.write_text("".join(await closed_ledger(sidecar)))
    trust = str(root_key.parent / "root.pub")
    assert cli.main(["audit", "verify", str(path), "--trust", trust]) == cli.EXIT_OK
    assert capsys.readouterr().out.startswith("VERIFIED")
    assert cli.main(["audit", "verify", str(path)]) == cli.EXIT_UNVERIFIED  # no --trust: authorship unproven
    assert "NOT checked" in capsys.readouterr().out


async def test_a_checkpoint_from_another_root_does_not_verify(sidecar: MakeSidecar) -> None:
    sc = await busy_ledger(sidecar)
    report = ledger.verify(sc.audit_path, keys.KeySet.generate().trust_bundle())
    assert not report.ok
    assert any("not endorsed" in p for p in report.problems)


async def test_a_restarted_sidecar_continues_the_chain(sidecar: MakeSidecar, keyset: keys.KeySet,
                                                       tmp_path: Path) -> None:
    path = tmp_path / "shared-audit.jsonl"
    first = await busy_ledger(sidecar, audit_log=str(path))
    first.gate.audit.close()
    second = await busy_ledger(sidecar, audit_log=str(path))
    second.gate.audit.close()
    report = ledger.verify(path, keyset.trust_bundle())
    assert report.verdict() == "VERIFIED", report.summary()
    assert report.unsigned == 0
    assert report.unclean_stops == []


def test_without_a_trust_bundle_the_chain_is_checked_and_checkpoints_are_noted(tmp_path: Path) -> None:
    chain = ledger.Chain()
    path = tmp_path / "l.jsonl"
    path.write_text(chain.seal({"a": 1}) + chain.checkpoint(time=ledger.now_iso(), session_key_id="k",
                                                             endorsement="x.y", sign=lambda m: b"s"))
    report = ledger.verify(path, None)
    assert report.ok
    assert report.unverified_checkpoints == 1
    assert "--trust" in report.summary()


def test_an_expired_session_key_signs_nothing_rather_than_a_checkpoint_that_reads_as_forged(
        tmp_path: Path, keyset: keys.KeySet) -> None:
    stale = receipts.SessionKey.issue(keyset, capability="travel/booking-agent", credential="c1",
                                      now=datetime.now(UTC) - timedelta(hours=2))
    path = tmp_path / "audit.jsonl"
    log = AuditLog(str(path), session=lambda: stale)
    log.open()
    log.write({"outcome": "allowed"})
    assert log.checkpoint() is False
    log.close()
    report = ledger.verify(path, keyset.trust_bundle())
    assert report.ok  # nothing was forged ...
    assert report.verdict() == "UNVERIFIED"  # ... and nothing is proven
    assert report.unsigned == 2
