"""Pod mode: the credential comes from a mounted directory and is reloaded when it changes."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest

from capgate.capabilities import keys, receipts, spec, tokens
from capgate.sidecar.config import ConfigError, SecretRef, Settings
from capgate.sidecar.credentials import CredentialStore, UpstreamSecrets
from capgate.sidecar.limits import Limits
from capgate.sidecar.watch import RevocationState
from tests.sidecar.conftest import API_KEY, BASE_SPEC, MakeSidecar, capability_document


class HeardOnce:
    """A revocation source that answers once with an empty list: the control plane is reachable."""

    async def run(self, state: RevocationState) -> None:
        state.has_source = True
        state.apply({})


def write_credential_dir(folder: Path, keyset: keys.KeySet, spec_doc: dict[str, object] | None = None) -> str:
    folder.mkdir(exist_ok=True)
    cap = spec.parse_capability(capability_document(spec_doc))  # type: ignore[arg-type]
    token = tokens.mint(cap, keyset)
    session = receipts.SessionKey.issue(keyset, capability=cap.qualified_name,
                                        credential=tokens.inspect(token)["revocationIds"][0])
    for name, text in (("trust.json", keyset.trust_bundle().to_json()),
                       ("session.key", session.to_json()),
                       ("settings.json", json.dumps({"namespace": "travel", "serviceAccount": "booking-agent"})),
                       ("token", token + "\n")):
        tmp = folder / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, folder / name)  # atomic, like a Secret volume update
    return token


async def test_pod_mode_serves_from_the_credential_dir(sidecar: MakeSidecar, keyset: keys.KeySet,
                                                       tmp_path: Path) -> None:
    folder = tmp_path / "credential"
    write_credential_dir(folder, keyset)
    sc = await sidecar(capability=None, root_key=None, credential_dir=folder, revocation_source=HeardOnce(),
                       limits=Limits())
    assert (await sc.client.get("/flights/search")).status == 200
    await sc.client.post("/payments/v1/charges", json={"amount": 100})
    assert sc.upstream.seen[-1].headers["Authorization"] == f"Bearer {API_KEY}"


async def test_a_rotated_credential_is_picked_up_without_restart(sidecar: MakeSidecar, keyset: keys.KeySet,
                                                                 tmp_path: Path) -> None:
    folder = tmp_path / "credential"
    first = write_credential_dir(folder, keyset)
    sc = await sidecar(capability=None, root_key=None, credential_dir=folder, poll_seconds=0.02,
                       revocation_source=HeardOnce(), limits=Limits())
    assert (await sc.client.delete("/flights/search")).status == 403
    audit_spec = copy.deepcopy(BASE_SPEC)
    audit_spec["mode"] = "audit"
    changed = sc.gate.store.changed
    second = write_credential_dir(folder, keyset, audit_spec)
    assert second != first
    await changed.wait()
    assert sc.gate.store.current is not None
    assert sc.gate.store.current.credential.token == second
    assert (await sc.client.delete("/flights/search")).status == 200  # audit mode forwards


async def test_a_broken_update_keeps_the_last_good_credential(sidecar: MakeSidecar, keyset: keys.KeySet,
                                                              tmp_path: Path) -> None:
    folder = tmp_path / "credential"
    write_credential_dir(folder, keyset)
    sc = await sidecar(capability=None, root_key=None, credential_dir=folder, revocation_source=HeardOnce(),
                       limits=Limits())
    (folder / "token").write_text("garbage")
    sc.gate.store.refresh()
    assert sc.gate.store.error is not None
    assert (await sc.client.get("/flights/search")).status == 200


def test_an_unusable_credential_dir_fails_at_start(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("nope")
    store = CredentialStore(Settings(credential_dir=tmp_path))
    with pytest.raises(ConfigError) as caught:
        store.load_initial()
    assert caught.value.setting == "--credential-dir"


def test_standalone_remints_before_the_session_key_expires(tmp_path: Path, root_key: Path) -> None:
    from datetime import timedelta

    cap = tmp_path / "cap.json"
    cap.write_text(json.dumps(capability_document()))
    store = CredentialStore(Settings(capability=cap, root_key=root_key))
    store.load_initial()
    assert store.current is not None
    before = store.current.session.key_id
    store.refresh(now=store.current.session.not_after - timedelta(seconds=5))
    assert store.current.session.key_id != before


def test_upstream_secrets_come_from_env_files_and_a_directory(tmp_path: Path) -> None:
    (tmp_path / "payments").write_text("from-dir\n")
    (tmp_path / "key.txt").write_text("from-file\n")
    secrets = UpstreamSecrets({"a": SecretRef("env", "A_KEY"), "b": SecretRef("file", str(tmp_path / "key.txt"))},
                              tmp_path, env={"A_KEY": "from-env"})
    assert (secrets.get("a"), secrets.get("b"), secrets.get("payments")) == ("from-env", "from-file", "from-dir")
    (tmp_path / "payments").write_text("bad\r\nX-Injected: 1")
    assert secrets.get("payments") is None


async def test_a_pod_mode_sidecar_that_never_heard_from_the_control_plane_refuses_writes(
        sidecar: MakeSidecar, keyset: keys.KeySet, tmp_path: Path) -> None:
    folder = tmp_path / "credential"
    write_credential_dir(folder, keyset)
    sc = await sidecar(capability=None, root_key=None, credential_dir=folder,
                       env={"KUBECONFIG": str(tmp_path / "none")}, limits=Limits())  # reads: not rate limited here
    assert (await sc.client.get("/flights/search")).status == 200
    response = await sc.client.post("/payments/v1/charges", json={"amount": 100})
    assert response.status == 503
    assert (await response.json())["error"] == "lockdown"



async def test_a_pod_mode_sidecar_is_not_ready_until_it_has_read_the_revocation_list(
        sidecar: MakeSidecar, keyset: keys.KeySet, tmp_path: Path) -> None:
    folder = tmp_path / "credential"
    write_credential_dir(folder, keyset)
    silent = await sidecar(capability=None, root_key=None, credential_dir=folder,
                           env={"KUBECONFIG": str(tmp_path / "none")})
    response = await silent.admin.get("/readyz")
    assert response.status == 503
    assert "RevocationList" in (await response.json())["reason"]
    heard = await sidecar(capability=None, root_key=None, credential_dir=folder, revocation_source=HeardOnce(),
                       limits=Limits())
    assert (await heard.admin.get("/readyz")).status == 200
