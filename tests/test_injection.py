"""Sidecar injection: what the webhook does to an agent pod, and which pods it refuses."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest

from capgate import injection, resources
from capgate.capabilities.spec import Capability, load_capability_file
from capgate.injection import InjectionError, SidecarSettings, apply_patch, inject, mutated, validate

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "booking-agent.yaml"
SECRET = "booking-agent" + resources.CREDENTIAL_SECRET_SUFFIX
SETTINGS = SidecarSettings()


@pytest.fixture(scope="module")
def cap() -> Capability:
    return load_capability_file(EXAMPLE)


def make_pod(**spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "agent-1", "namespace": "travel", "uid": "uid-1",
                     "labels": {resources.CAPABILITY_LABEL: "booking-agent"}},
        "spec": {"serviceAccountName": "booking-agent", "nodeName": "node-a",
                 "securityContext": {"runAsUser": 1000},  # enforce mode needs a known UID (not the sidecar's)
                 "containers": [{"name": "agent", "image": "agent:1", "env": [{"name": "MODEL", "value": "m"}]}],
                 **spec},
    }


def run(pod: dict[str, Any], cap: Capability, **kwargs: Any) -> dict[str, Any]:
    return mutated(pod, cap, kwargs.pop("settings", SETTINGS), credential_secret=SECRET, **kwargs)


def refusal(pod: dict[str, Any], cap: Capability, **kwargs: Any) -> str:
    with pytest.raises(InjectionError) as info:
        inject(pod, cap, SETTINGS, credential_secret=SECRET, **kwargs)
    return str(info.value)


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value") for e in container["env"]}


def sidecar_of(pod: dict[str, Any]) -> dict[str, Any]:
    return next(c for c in pod["spec"]["initContainers"] if c["name"] == "capgate-sidecar")


# --- what an injected pod looks like --------------------------------------------------------------

def test_injects_capgate_init_then_the_native_sidecar_first_among_init_containers(cap: Capability) -> None:
    pod = run(make_pod(initContainers=[{"name": "setup", "image": "busybox"}]), cap)
    names = [c["name"] for c in pod["spec"]["initContainers"]]
    assert names == ["capgate-init", "capgate-sidecar", "setup"]
    assert sidecar_of(pod)["restartPolicy"] == "Always"
    assert "restartPolicy" not in pod["spec"]["initContainers"][0]  # runs to completion before the sidecar starts
    assert "restartPolicy" not in pod["spec"]["initContainers"][2]
    assert [c["name"] for c in pod["spec"]["containers"]] == ["agent"]


def test_sidecar_runs_with_the_mounted_directories_and_ports(cap: Capability) -> None:
    sidecar = sidecar_of(run(make_pod(), cap, settings=dataclasses.replace(SETTINGS, extra_args=("--log-level",
                                                                                                  "debug"))))
    assert sidecar["command"] == ["capgate-sidecar"]
    assert sidecar["args"] == [
        "--credential-dir", "/var/run/capgate/credential",
        "--upstream-credentials-dir", "/var/run/capgate/upstreams",
        "--listen", "127.0.0.1:15080", "--admin-listen", "0.0.0.0:15090",
        "--outbound-listen", "127.0.0.1:15001", "--ca-dir", "/var/run/capgate/ca",
        "--log-level", "debug",
    ]
    assert sidecar["ports"] == [{"name": "capgate-admin", "containerPort": 15090, "protocol": "TCP"}]


def test_sidecar_learns_its_identity_from_the_downward_api(cap: Capability) -> None:
    sidecar = sidecar_of(run(make_pod(), cap))
    refs = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in sidecar["env"]}
    assert refs == {"CAPGATE_NAMESPACE": "metadata.namespace", "CAPGATE_SERVICE_ACCOUNT": "spec.serviceAccountName",
                    "CAPGATE_POD_NAME": "metadata.name", "CAPGATE_POD_UID": "metadata.uid",
                    "CAPGATE_NODE_NAME": "spec.nodeName"}


def test_sidecar_has_probes_resources_and_a_locked_down_security_context(cap: Capability) -> None:
    sidecar = sidecar_of(run(make_pod(), cap))
    assert sidecar["startupProbe"]["httpGet"] == {"path": "/readyz", "port": "capgate-admin", "scheme": "HTTP"}
    assert sidecar["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert sidecar["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert sidecar["resources"] == {"requests": {"cpu": "50m", "memory": "64Mi"},
                                    "limits": {"cpu": "500m", "memory": "128Mi"}}
    assert sidecar["securityContext"] == {
        "runAsNonRoot": True, "runAsUser": 65532, "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True, "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def test_agent_gets_the_proxy_and_one_base_url_per_upstream(cap: Capability) -> None:
    env = env_of(run(make_pod(), cap)["spec"]["containers"][0])
    assert env["HTTP_PROXY"] == env["http_proxy"] == env["CAPGATE_URL"] == "http://127.0.0.1:15080"
    assert env["CAPGATE_UPSTREAM_FLIGHTS_URL"] == "http://127.0.0.1:15080/flights"
    assert env["CAPGATE_UPSTREAM_PAYMENTS_URL"] == "http://127.0.0.1:15080/payments"
    assert env["MODEL"] == "m"
    assert "HTTPS_PROXY" not in env
    assert "https_proxy" not in env


def test_no_proxy_bypasses_only_loopback_so_cluster_upstreams_still_go_through_the_sidecar(cap: Capability) -> None:
    env = env_of(run(make_pod(), cap)["spec"]["containers"][0])
    assert env["NO_PROXY"] == env["no_proxy"] == "localhost,127.0.0.1,::1"
    assert ".svc" not in env["NO_PROXY"]


def test_every_agent_and_init_container_gets_the_variables(cap: Capability) -> None:
    pod = run(make_pod(containers=[{"name": "a", "image": "x"}, {"name": "b", "image": "y"}],
                       initContainers=[{"name": "setup", "image": "busybox"}]), cap)
    for container in [*pod["spec"]["containers"], pod["spec"]["initContainers"][2]]:
        assert env_of(container)["CAPGATE_URL"] == "http://127.0.0.1:15080", container["name"]


def test_existing_user_variable_with_the_same_name_is_replaced_not_duplicated(cap: Capability) -> None:
    pod = make_pod()
    pod["spec"]["containers"][0]["env"] += [{"name": "HTTP_PROXY", "value": "http://evil:3128"},
                                            {"name": "CAPGATE_URL", "value": "http://elsewhere"}]
    names = [e["name"] for e in run(pod, cap)["spec"]["containers"][0]["env"]]
    assert names.count("HTTP_PROXY") == 1
    assert names.count("CAPGATE_URL") == 1
    assert env_of(run(pod, cap)["spec"]["containers"][0])["HTTP_PROXY"] == "http://127.0.0.1:15080"


def test_user_variables_come_after_ours_so_they_can_reference_them(cap: Capability) -> None:
    pod = make_pod()
    pod["spec"]["containers"][0]["env"] = [{"name": "FLIGHTS", "value": "$(CAPGATE_UPSTREAM_FLIGHTS_URL)/v2"}]
    names = [e["name"] for e in run(pod, cap)["spec"]["containers"][0]["env"]]
    assert names.index("FLIGHTS") > names.index("CAPGATE_UPSTREAM_FLIGHTS_URL")


def test_secrets_are_mounted_into_the_sidecar_only(cap: Capability) -> None:
    pod = run(make_pod(volumes=[{"name": "data", "emptyDir": {}}]), cap)
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["capgate-credential"]["secret"] == {"secretName": SECRET, "defaultMode": 0o444, "optional": False}
    assert volumes["capgate-upstreams"]["projected"]["sources"] == [
        {"secret": {"name": "payments-api-key", "items": [{"key": "token", "path": "payments"}], "optional": False}}]
    assert "data" in volumes
    mounts = {m["name"]: m for m in sidecar_of(pod)["volumeMounts"]}
    assert set(mounts) == {"capgate-credential", "capgate-upstreams", "capgate-api-token", "capgate-ca"}
    assert all(m["readOnly"] for name, m in mounts.items() if name != "capgate-ca")  # the sidecar writes ca.crt
    assert all("subPath" not in m for m in mounts.values())  # rotations must reach the sidecar
    assert pod["spec"]["containers"][0]["volumeMounts"] == [
        {"name": "capgate-ca", "mountPath": "/var/run/capgate/ca", "readOnly": True}]


def test_pod_is_annotated_with_the_capability_it_was_injected_for(cap: Capability) -> None:
    assert run(make_pod(), cap)["metadata"]["annotations"] == {"capgate.dev/injected": "booking-agent"}


def test_capability_without_injected_keys_gets_no_upstream_volume_or_flag(cap: Capability) -> None:
    keyless = dataclasses.replace(cap, upstreams=tuple(dataclasses.replace(u, inject=None) for u in cap.upstreams))
    pod = run(make_pod(), keyless)
    assert [v["name"] for v in pod["spec"]["volumes"]] == ["capgate-credential", "capgate-api-token", "capgate-ca"]
    assert "--upstream-credentials-dir" not in sidecar_of(pod)["args"]


# --- idempotence ------------------------------------------------------------------------------------

def test_reinjecting_an_injected_pod_is_a_no_op(cap: Capability) -> None:
    once = run(make_pod(initContainers=[{"name": "setup", "image": "busybox"}]), cap)
    assert inject(once, cap, SETTINGS, credential_secret=SECRET) == []


def test_changed_settings_replace_only_the_sidecar_definition(cap: Capability) -> None:
    once = run(make_pod(), cap)
    ops = inject(once, cap, dataclasses.replace(SETTINGS, image="ghcr.io/capgate/capgate:0.2.0"),
                 credential_secret=SECRET)
    assert [(op["op"], op["path"]) for op in ops] == [("replace", "/spec/initContainers")]
    assert ops[0]["value"][0]["image"] == "ghcr.io/capgate/capgate:0.2.0"


def test_look_alike_sidecar_with_extra_fields_is_overwritten(cap: Capability) -> None:
    fake = copy.deepcopy(sidecar_of(run(make_pod(), cap)))
    fake["lifecycle"] = {"postStart": {"exec": {"command": ["sh", "-c", "cat /var/run/capgate/credential/token"]}}}
    pod = run(make_pod(initContainers=[{"name": "setup", "image": "busybox"}, fake]), cap)
    assert [c["name"] for c in pod["spec"]["initContainers"]] == ["capgate-init", "capgate-sidecar", "setup"]
    assert "lifecycle" not in sidecar_of(pod)


def test_injection_does_not_modify_its_input(cap: Capability) -> None:
    pod = make_pod()
    before = copy.deepcopy(pod)
    run(pod, cap)
    assert pod == before


# --- refusals ---------------------------------------------------------------------------------------

def test_refuses_a_pod_running_as_another_service_account_naming_both(cap: Capability) -> None:
    message = refusal(make_pod(serviceAccountName="intruder"), cap)
    assert "'intruder'" in message
    assert "'booking-agent'" in message
    assert "travel/booking-agent" in message


def test_pod_without_a_service_account_runs_as_default_and_is_refused(cap: Capability) -> None:
    pod = make_pod()
    del pod["spec"]["serviceAccountName"]
    assert "'default'" in refusal(pod, cap)


def test_refuses_a_pod_in_another_namespace(cap: Capability) -> None:
    pod = make_pod()
    pod["metadata"]["namespace"] = "other"
    assert "'other'" in refusal(pod, cap)
    assert "'travel'" in refusal(pod, cap)


def test_admission_namespace_is_used_when_the_pod_carries_none(cap: Capability) -> None:
    pod = make_pod()
    del pod["metadata"]["namespace"]
    assert inject(pod, cap, SETTINGS, credential_secret=SECRET, namespace="travel")
    assert "'elsewhere'" in refusal(pod, cap, namespace="elsewhere")
    assert "namespace" in refusal(pod, cap)


@pytest.mark.parametrize("flag", ["shareProcessNamespace", "hostNetwork", "hostPID"])
def test_refuses_pods_that_let_the_agent_reach_into_the_sidecar(cap: Capability, flag: str) -> None:
    assert f"spec.{flag}: true" in refusal(make_pod(**{flag: True}), cap)


def test_host_flags_set_to_false_are_fine(cap: Capability) -> None:
    assert inject(make_pod(shareProcessNamespace=False, hostNetwork=False, hostPID=False), cap, SETTINGS,
                  credential_secret=SECRET)


SECRET_USES: dict[str, tuple[dict[str, Any], list[dict[str, Any]]]] = {
    "secret volume": ({"volumeMounts": [{"name": "c", "mountPath": "/c"}]},
                      [{"name": "c", "secret": {"secretName": SECRET}}]),
    "projected volume": ({"volumeMounts": [{"name": "p", "mountPath": "/p"}]},
                         [{"name": "p", "projected": {"sources": [{"configMap": {"name": "cm"}},
                                                                  {"secret": {"name": "payments-api-key"}}]}}]),
    "the injected volume": ({"volumeMounts": [{"name": "capgate-credential", "mountPath": "/steal"}]}, []),
    "env secretKeyRef": ({"env": [{"name": "K", "valueFrom": {"secretKeyRef": {"name": "payments-api-key",
                                                                               "key": "token"}}}]}, []),
    "envFrom": ({"envFrom": [{"secretRef": {"name": SECRET}}]}, []),
}


@pytest.mark.parametrize("use", SECRET_USES, ids=list(SECRET_USES))
@pytest.mark.parametrize("kind", ["containers", "initContainers"])
def test_refuses_an_agent_container_that_reads_a_protected_secret(cap: Capability, use: str, kind: str) -> None:
    fields, volumes = SECRET_USES[use]
    pod = make_pod(volumes=volumes)
    pod["spec"].setdefault(kind, []).append({"name": "thief", "image": "x", **fields})
    message = refusal(pod, cap)
    assert "'thief'" in message
    assert "only the capgate sidecar may read it" in message


def test_agent_may_use_unrelated_secrets(cap: Capability) -> None:
    pod = make_pod(volumes=[{"name": "cfg", "secret": {"secretName": "agent-config"}}])
    pod["spec"]["containers"][0]["volumeMounts"] = [{"name": "cfg", "mountPath": "/cfg"}]
    pod["spec"]["containers"][0]["envFrom"] = [{"secretRef": {"name": "model-api-key"}}]
    assert inject(pod, cap, SETTINGS, credential_secret=SECRET)


def test_refuses_an_agent_container_using_the_sidecar_name_or_ports(cap: Capability) -> None:
    assert "reserved" in refusal(make_pod(containers=[{"name": "capgate-sidecar", "image": "x"}]), cap)
    ported = make_pod(containers=[{"name": "agent", "image": "x", "ports": [{"containerPort": 15080}]}])
    assert "15080" in refusal(ported, cap)


def test_ephemeral_container_targeting_the_sidecar_is_refused(cap: Capability) -> None:
    pod = run(make_pod(), cap)
    pod["spec"]["ephemeralContainers"] = [{"name": "debug", "image": "busybox",
                                           "targetContainerName": "capgate-sidecar"}]
    with pytest.raises(InjectionError, match="'debug'"):
        validate(pod, cap, SETTINGS, credential_secret=SECRET)


# --- the patch itself -------------------------------------------------------------------------------

def test_annotation_key_slash_is_escaped_in_the_pointer(cap: Capability) -> None:
    pod = make_pod()
    pod["metadata"]["annotations"] = {"team": "travel"}
    ops = inject(pod, cap, SETTINGS, credential_secret=SECRET)
    assert {"op": "add", "path": "/metadata/annotations/capgate.dev~1injected", "value": "booking-agent"} in ops
    annotations = apply_patch(pod, ops)["metadata"]["annotations"]
    assert annotations == {"team": "travel", "capgate.dev/injected": "booking-agent"}


def test_patch_adds_whole_arrays_to_a_bare_pod(cap: Capability) -> None:
    pod = {"metadata": {"generateName": "agent-"},
           "spec": {"serviceAccountName": "booking-agent", "securityContext": {"runAsUser": 1000},
                    "containers": [{"name": "agent", "image": "x"}]}}
    ops = inject(pod, cap, SETTINGS, credential_secret=SECRET, namespace="travel")
    assert {(op["op"], op["path"]) for op in ops} == {
        ("add", "/metadata/annotations"), ("add", "/spec/initContainers"),
        ("add", "/spec/containers/0/env"), ("add", "/spec/containers/0/securityContext"),
        ("add", "/spec/containers/0/volumeMounts"), ("add", "/spec/volumes")}
    json.dumps(ops)  # the webhook sends it as JSON
    after = apply_patch(pod, ops)
    assert after["spec"]["initContainers"][1]["name"] == "capgate-sidecar"
    assert env_of(after["spec"]["containers"][0])["CAPGATE_URL"] == "http://127.0.0.1:15080"


def test_apply_patch_follows_rfc6902_for_escapes_arrays_and_removal() -> None:
    doc = {"a/b": {"m~n": 1}, "list": [1, 3]}
    out = apply_patch(doc, [
        {"op": "replace", "path": "/a~1b/m~0n", "value": 2},
        {"op": "add", "path": "/list/1", "value": 2},
        {"op": "add", "path": "/list/-", "value": 4},
        {"op": "remove", "path": "/list/0"},
    ])
    assert out == {"a/b": {"m~n": 2}, "list": [2, 3, 4]}
    assert doc == {"a/b": {"m~n": 1}, "list": [1, 3]}


@pytest.mark.parametrize("op", [
    {"op": "replace", "path": "/missing", "value": 1},
    {"op": "remove", "path": "/list/5"},
    {"op": "add", "path": "/list/01", "value": 1},
    {"op": "move", "path": "/x"},
    {"op": "add", "path": "no-slash", "value": 1},
])
def test_apply_patch_refuses_ops_it_cannot_apply_exactly(op: dict[str, Any]) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - the message varies by op
        apply_patch({"list": [1], "x": 1}, [op])


# --- running the sidecar the way the pod would ------------------------------------------------------

def test_sidecar_invocation_resolves_downward_api_env_and_mounts(cap: Capability) -> None:
    args, env, mounts = injection.sidecar_invocation(run(make_pod(), cap))
    assert args[:2] == ["--credential-dir", "/var/run/capgate/credential"]
    assert env == {"CAPGATE_NAMESPACE": "travel", "CAPGATE_SERVICE_ACCOUNT": "booking-agent",
                   "CAPGATE_POD_NAME": "agent-1", "CAPGATE_POD_UID": "uid-1", "CAPGATE_NODE_NAME": "node-a"}
    assert mounts.pop("capgate-api-token") == "/var/run/secrets/kubernetes.io/serviceaccount"
    assert mounts == {"capgate-credential": "/var/run/capgate/credential",
                      "capgate-upstreams": "/var/run/capgate/upstreams", "capgate-ca": "/var/run/capgate/ca"}


def test_sidecar_invocation_takes_fields_an_unscheduled_pod_lacks(cap: Capability) -> None:
    pod = run(make_pod(), cap)
    del pod["spec"]["nodeName"]
    env = injection.sidecar_invocation(pod, field_values={"spec.nodeName": "laptop"}).env
    assert env["CAPGATE_NODE_NAME"] == "laptop"


def test_sidecar_secret_files_say_which_keys_become_which_files(cap: Capability) -> None:
    files = injection.sidecar_secret_files(run(make_pod(), cap))
    assert files == [
        injection.SecretFile("capgate-credential", "/var/run/capgate/credential", SECRET, None, None),
        injection.SecretFile("capgate-upstreams", "/var/run/capgate/upstreams", "payments-api-key", "token",
                             "payments"),
    ]


def test_the_sidecar_accepts_the_injected_args_and_env(cap: Capability, tmp_path: Path) -> None:
    from capgate.sidecar import config

    args, env, mounts = injection.sidecar_invocation(run(make_pod(), cap))
    for mount in mounts.values():
        local = tmp_path / mount.strip("/").replace("/", "_")
        local.mkdir()
        args = [str(local) if a == mount else a for a in args]
    settings = config.load(args, env)
    assert settings.credential_dir is not None
    assert not settings.standalone
    assert str(settings.listen) == "127.0.0.1:15080"
    assert str(settings.admin_listen) == "0.0.0.0:15090"
    assert str(settings.outbound_listen) == "127.0.0.1:15001" and settings.ca_dir is not None
    assert (settings.namespace, settings.service_account) == ("travel", "booking-agent")


def test_the_sidecar_gets_its_own_api_token_even_when_the_pod_opts_out(cap: Capability) -> None:
    pod = make_pod()
    pod["spec"]["automountServiceAccountToken"] = False
    injected = run(pod, cap)
    volume = next(v for v in injected["spec"]["volumes"] if v["name"] == "capgate-api-token")
    assert volume["projected"]["sources"][0]["serviceAccountToken"]["path"] == "token"
    mount = next(m for m in sidecar_of(injected)["volumeMounts"] if m["name"] == "capgate-api-token")
    assert (mount["mountPath"], mount["readOnly"]) == ("/var/run/secrets/kubernetes.io/serviceaccount", True)
    assert not any(m["name"] == "capgate-api-token" for c in injected["spec"]["containers"]
                   for m in c.get("volumeMounts") or [])



# --- egress: complete mediation (capgate-init) and what agent containers may not do -------------------

def cooperative(cap: Capability) -> Capability:
    return dataclasses.replace(cap, egress_mode="cooperative")


def test_capgate_init_runs_as_root_with_only_net_admin_and_net_raw(cap: Capability) -> None:
    init = run(make_pod(), cap)["spec"]["initContainers"][0]
    assert init["name"] == "capgate-init" and init["command"] == ["capgate-init"]
    assert init["image"] == SETTINGS.image
    assert init["args"] == ["--proxy-uid", "65532", "--outbound-port", "15001", "--sidecar-ports", "15080,15090"]
    assert init["securityContext"] == {
        "runAsUser": 0, "runAsGroup": 0, "runAsNonRoot": False, "privileged": False,
        "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
        "capabilities": {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"}}
    assert "volumeMounts" not in init  # it needs no Secret and no file of the pod


def test_agents_trust_the_pod_ca_through_a_read_only_mount_and_env(cap: Capability) -> None:
    pod = run(make_pod(), cap)
    env = env_of(pod["spec"]["containers"][0])
    for name in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "NODE_EXTRA_CA_CERTS"):
        assert env[name] == "/var/run/capgate/ca/ca.crt"
    assert {"name": "capgate-ca", "mountPath": "/var/run/capgate/ca", "readOnly": True} in \
        pod["spec"]["containers"][0]["volumeMounts"]
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert volumes["capgate-ca"] == {"name": "capgate-ca", "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}}


def test_agent_containers_lose_the_capabilities_that_undo_or_sniff_the_capture(cap: Capability) -> None:
    pod = make_pod()
    pod["spec"]["containers"][0]["securityContext"] = {"capabilities": {"drop": ["MKNOD"]}, "runAsUser": 1001}
    context = run(pod, cap)["spec"]["containers"][0]["securityContext"]
    assert context == {"capabilities": {"drop": ["MKNOD", "NET_ADMIN", "NET_RAW", "SETUID", "SETGID"]},
                       "runAsUser": 1001, "allowPrivilegeEscalation": False}


def test_a_container_that_already_drops_all_is_left_alone(cap: Capability) -> None:
    pod = make_pod()
    pod["spec"]["containers"][0]["securityContext"] = {"capabilities": {"drop": ["ALL"]},
                                                       "allowPrivilegeEscalation": False}
    assert run(pod, cap)["spec"]["containers"][0]["securityContext"] == pod["spec"]["containers"][0][
        "securityContext"]


@pytest.mark.parametrize(("where", "uid"), [("container", 65532), ("pod", 65532), ("pod", None)])
def test_refuses_an_agent_that_runs_or_may_run_as_the_sidecar_uid(cap: Capability, where: str,
                                                                   uid: int | None) -> None:
    pod = make_pod()
    if where == "container":
        pod["spec"]["containers"][0]["securityContext"] = {"runAsUser": uid}
    else:
        pod["spec"]["securityContext"] = {} if uid is None else {"runAsUser": uid}
    message = refusal(pod, cap)
    assert "'agent'" in message and "65532" in message


def test_a_container_level_uid_overrides_the_pod_level_sidecar_uid(cap: Capability) -> None:
    pod = make_pod(securityContext={"runAsUser": 65532})
    pod["spec"]["containers"][0]["securityContext"] = {"runAsUser": 1000}
    run(pod, cap)


@pytest.mark.parametrize("added", ["NET_ADMIN", "net_raw", "CAP_SETUID", "SETGID", "ALL"])
def test_refuses_an_agent_that_adds_a_capability_that_undoes_the_capture(cap: Capability, added: str) -> None:
    pod = make_pod()
    pod["spec"]["containers"][0]["securityContext"] = {"capabilities": {"add": [added]}}
    assert "adds capabilities" in refusal(pod, cap)


@pytest.mark.parametrize(("context", "says"), [({"privileged": True}, "privileged"),
                                               ({"allowPrivilegeEscalation": True}, "allowPrivilegeEscalation"),
                                               ({"capabilities": {"add": ["SYS_ADMIN"]}}, "SYS_ADMIN")])
def test_refuses_privileged_or_escalating_agents(cap: Capability, context: dict[str, Any], says: str) -> None:
    pod = make_pod()
    pod["spec"]["containers"][0]["securityContext"] = context
    assert says in refusal(pod, cap)


def test_refuses_a_writable_mount_of_the_pod_ca(cap: Capability) -> None:
    injected = run(make_pod(), cap)
    injected["spec"]["ephemeralContainers"] = [{
        "name": "debug", "image": "busybox", "volumeMounts": [{"name": "capgate-ca", "mountPath": "/ca"}],
        "securityContext": {"capabilities": {"drop": ["ALL"]}, "allowPrivilegeEscalation": False}}]
    with pytest.raises(InjectionError, match="pod CA volume writable"):
        validate(injected, cap, SETTINGS, credential_secret=SECRET)


def test_a_legacy_debug_container_is_refused_and_a_restricted_one_allowed(cap: Capability) -> None:
    injected = run(make_pod(), cap)
    injected["spec"]["ephemeralContainers"] = [{"name": "debug", "image": "busybox", "targetContainerName": "agent"}]
    with pytest.raises(InjectionError, match="--profile=restricted"):
        validate(injected, cap, SETTINGS, credential_secret=SECRET)
    injected["spec"]["ephemeralContainers"][0]["securityContext"] = {  # what kubectl debug --profile=restricted sets
        "runAsNonRoot": True, "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"}}
    validate(injected, cap, SETTINGS, credential_secret=SECRET)


def test_refuses_a_user_container_named_like_capgate_init(cap: Capability) -> None:
    injected = run(make_pod(), cap)
    injected["spec"]["containers"].append({"name": "capgate-init", "image": "x"})
    with pytest.raises(InjectionError, match="reserved"):
        validate(injected, cap, SETTINGS, credential_secret=SECRET)


def test_a_look_alike_capgate_init_is_replaced_by_ours(cap: Capability) -> None:
    fake = {"name": "capgate-init", "image": "evil", "command": ["sh"], "securityContext": {"privileged": True}}
    pod = run(make_pod(initContainers=[fake]), cap)
    assert pod["spec"]["initContainers"][0] == injection.init_container(SETTINGS)
    assert [c["name"] for c in pod["spec"]["initContainers"]] == ["capgate-init", "capgate-sidecar"]


def test_cooperative_mode_has_no_init_container_no_pod_ca_and_no_uid_requirement(cap: Capability) -> None:
    pod = make_pod(securityContext={})
    injected = run(pod, cooperative(cap))
    assert [c["name"] for c in injected["spec"]["initContainers"]] == ["capgate-sidecar"]
    assert "--outbound-listen" not in sidecar_of(injected)["args"]
    assert "capgate-ca" not in {v["name"] for v in injected["spec"]["volumes"]}
    agent = injected["spec"]["containers"][0]
    assert "SSL_CERT_FILE" not in env_of(agent) and "volumeMounts" not in agent
    # NET_RAW would still sniff the sidecar's cleartext calls to http:// upstreams.
    assert agent["securityContext"] == {"capabilities": {"drop": ["NET_ADMIN", "NET_RAW"]}}
    assert inject(injected, cooperative(cap), SETTINGS, credential_secret=SECRET) == []


def test_switching_a_pod_from_cooperative_to_enforce_adds_capgate_init(cap: Capability) -> None:
    once = run(make_pod(), cooperative(cap))
    again = mutated(once, cap, SETTINGS, credential_secret=SECRET)
    assert [c["name"] for c in again["spec"]["initContainers"]] == ["capgate-init", "capgate-sidecar"]


def test_the_outbound_port_is_reserved(cap: Capability) -> None:
    pod = make_pod()
    pod["spec"]["containers"][0]["ports"] = [{"containerPort": 15001}]
    assert "15001" in refusal(pod, cap)
