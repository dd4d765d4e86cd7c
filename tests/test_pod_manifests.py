"""The objects e2e/test_pods.py deploys, checked without a cluster: the webhook would admit the agent.

A refusal here (say, an agent container the egress rules cannot tell from the sidecar) would only show
on the node as a Deployment without pods; this says why in a second.
"""

from __future__ import annotations

from cryptography import x509

from capgate import injection, resources
from capgate.capabilities.spec import UpstreamTLS, parse_capability
from e2e import pods

NAMESPACE = "travel-pods-test"


def test_the_capability_parses_and_trusts_the_private_ca_of_payments() -> None:
    cap = parse_capability(pods.capability(NAMESPACE))
    payments = cap.upstream("payments")
    assert payments is not None
    assert payments.url == f"https://payments.{NAMESPACE}.svc:{pods.TLS_PORT}"
    assert payments.tls == UpstreamTLS("payments-tls", "ca.crt")
    assert cap.namespace == NAMESPACE


def test_the_agent_replicas_are_admitted_with_the_sidecar_and_the_ca_mounted_into_it_only() -> None:
    cap = parse_capability(pods.capability(NAMESPACE))
    template = pods.with_image([pods.agent_deployment()], "capgate.local/capgate:test")[0]["spec"]["template"]
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {**template["metadata"], "namespace": NAMESPACE},
           "spec": template["spec"]}
    assert pod["metadata"]["labels"][resources.CAPABILITY_LABEL] == pods.CAPABILITY

    injected = injection.mutated(pod, cap, injection.SidecarSettings(image="capgate.local/capgate:test"),
                                 credential_secret=pods.CAPABILITY + resources.CREDENTIAL_SECRET_SUFFIX)

    sidecar = next(c for c in injected["spec"]["initContainers"] if c["name"] == injection.DEFAULT_CONTAINER_NAME)
    assert injection.UPSTREAM_CA_VOLUME in {m["name"] for m in sidecar["volumeMounts"]}
    (agent,) = injected["spec"]["containers"]
    assert injection.UPSTREAM_CA_VOLUME not in {m["name"] for m in agent.get("volumeMounts", [])}
    assert agent["securityContext"]["runAsUser"] not in (0, injection.SidecarSettings().run_as_user)


def test_the_payments_certificate_names_its_service_and_its_ca_sits_beside_it() -> None:
    secrets = {o["metadata"]["name"]: o for o in pods.upstream_objects(NAMESPACE) if o["kind"] == "Secret"}
    tls = secrets["payments-tls"]["stringData"]
    assert set(tls) == {"tls.crt", "tls.key", "ca.crt"}
    cert = x509.load_pem_x509_certificate(tls["tls.crt"].encode())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    assert f"payments.{NAMESPACE}.svc" in names
    assert cert.issuer == x509.load_pem_x509_certificate(tls["ca.crt"].encode()).subject
    assert secrets["payments-api-key"]["stringData"] == {"token": pods.API_KEY}
