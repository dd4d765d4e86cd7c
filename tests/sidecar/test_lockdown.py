"""Lockdown: the kill switch and a silent control plane both stop writes; reads go on by policy."""

from __future__ import annotations

import json
from pathlib import Path

from capgate.sidecar.watch import FileSource, RevocationState
from tests.sidecar.conftest import MakeSidecar


async def test_kill_switch_refuses_writes_with_503_but_allows_reads(sidecar: MakeSidecar, tmp_path: Path) -> None:
    revocations = tmp_path / "revocations.json"
    revocations.write_text(json.dumps({"lockdown": {"all": True}}))
    sc = await sidecar(revocations=revocations)
    assert FileSource(revocations).read(sc.gate.revocations)
    read = await sc.client.get("/flights/search")
    write = await sc.client.post("/payments/v1/charges", json={"amount": 1})
    body = await write.json()
    assert read.status == 200
    assert (write.status, body["error"]) == (503, "lockdown")
    assert "X-Capgate-Decision-Id" in write.headers


async def test_namespace_lockdown_only_hits_that_namespace(sidecar: MakeSidecar, tmp_path: Path) -> None:
    revocations = tmp_path / "revocations.json"
    revocations.write_text(json.dumps({"lockdown": {"namespaces": ["other"]}}))
    sc = await sidecar(revocations=revocations)
    FileSource(revocations).read(sc.gate.revocations)
    await sc.client.get("/flights/search")
    assert (await sc.client.post("/payments/v1/charges", json={"amount": 1})).status == 200


async def test_losing_the_control_plane_locks_down(sidecar: MakeSidecar, tmp_path: Path) -> None:
    sc = await sidecar(revocations=tmp_path / "never-written.json")
    assert sc.gate.revocations.has_source
    response = await sc.client.post("/flights/upload", data=b"x")
    assert response.status == 503
    assert (await sc.client.get("/flights/search")).status == 200


def test_stale_contact_is_lockdown_and_fresh_contact_is_not() -> None:
    from datetime import timedelta

    state = RevocationState(has_source=True)
    state.contact(now=100.0)
    assert state.lockdown_reason("travel", timedelta(seconds=60), now=150.0) is None
    assert "not heard" in (state.lockdown_reason("travel", timedelta(seconds=60), now=161.0) or "")


def test_no_source_means_no_staleness_lockdown() -> None:
    from datetime import timedelta

    assert RevocationState().lockdown_reason("travel", timedelta(seconds=1), now=1e9) is None


def test_malformed_revocation_file_keeps_the_previous_state(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"revokedIds": [{"id": "abcd", "expiresAt": "2099-01-01T00:00:00Z"}]}))
    state = RevocationState()
    assert FileSource(path).read(state)
    path.write_text("{not json")
    assert not FileSource(path).read(state)
    assert state.revoked_ids == frozenset({"abcd"})
    path.write_text(json.dumps({"revokedIds": ["not-hex!"]}))
    assert not FileSource(path).read(state)
