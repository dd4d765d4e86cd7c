"""The audit ledger: what a record holds, the hash chain, signed checkpoints, tamper detection."""

from __future__ import annotations

import json
from pathlib import Path

from capgate import ledger
from capgate.capabilities import keys
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


async def test_an_untouched_ledger_verifies(sidecar: MakeSidecar, keyset: keys.KeySet) -> None:
    sc = await busy_ledger(sidecar)
    report = ledger.verify(sc.audit_path, keyset.trust_bundle())
    assert report.ok, report.summary()
    assert report.records == len(sc.audit_records())
    assert report.checkpoints >= 2
    assert report.unsigned == 0


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


async def test_a_cut_tail_shows_as_unsigned_records(sidecar: MakeSidecar, keyset: keys.KeySet) -> None:
    sc = await busy_ledger(sidecar)
    await sc.client.get("/flights/search")
    report = ledger.verify(sc.audit_path, keyset.trust_bundle())
    assert report.ok
    assert report.unsigned == 1


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
    assert report.ok, report.summary()
    assert report.unsigned == 0


def test_without_a_trust_bundle_the_chain_is_checked_and_checkpoints_are_noted(tmp_path: Path) -> None:
    chain = ledger.Chain()
    path = tmp_path / "l.jsonl"
    path.write_text(chain.seal({"a": 1}) + chain.checkpoint(time=ledger.now_iso(), session_key_id="k",
                                                             endorsement="x.y", sign=lambda m: b"s"))
    report = ledger.verify(path, None)
    assert report.ok
    assert report.unverified_checkpoints == 1
    assert "--trust" in report.summary()
