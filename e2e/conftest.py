"""Fixtures for tests against capgate's real local control plane (see e2e/controlplane.py).

These tests never skip silently: if the binaries cannot be built or the cluster does not become
ready, every test using it errors with the reason and the tail of the logs. The first run builds the
binaries (10-20 minutes on 2 cores); later runs find them in the cache.

With ``CAPGATE_E2E_KUBECONFIG`` set, the real-pod suite (the ``cluster`` fixture) runs against that
cluster instead (see e2e/external.py), and ``control_plane`` and ``node`` fail with the reason.

The session's control plane has a real node (e2e/node.py): pods are scheduled and run. Tests that
play the kubelet themselves (e2e/cluster.py) name images the node does not hold and cannot pull, so
kubelet never starts those pods: their sidecar runs once, as the harness's local process.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

import pytest
from kubernetes import client as k8s

from e2e import external
from e2e.controlplane import ControlPlane, ControlPlaneError, Progress
from e2e.node import Node


def _terminal_progress(config: pytest.Config) -> Progress:
    """Progress lines shown on the terminal even while pytest captures output: a cold build is long."""
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    capture = config.pluginmanager.get_plugin("capturemanager")

    def progress(line: str) -> None:
        if reporter is None or capture is None:
            print(line, file=sys.stderr, flush=True)
            return
        with capture.global_and_fixture_disabled():
            reporter.write_line(line)

    return progress


@pytest.fixture(scope="session")
def external_cluster() -> Iterator[external.ExternalCluster | None]:
    """The cluster ``CAPGATE_E2E_KUBECONFIG`` names, checked ready; None when the suite runs its own."""
    try:
        target = external.from_env()
        if target is not None:
            target.check()
    except external.ExternalClusterError as error:
        pytest.fail(str(error), pytrace=False)
    try:
        yield target
    finally:
        if target is not None:
            target.stop()


@pytest.fixture(scope="session")
def cluster(external_cluster: external.ExternalCluster | None, request: pytest.FixtureRequest) -> external.Cluster:
    """Where the real-pod suite runs: the named cluster, or the local control plane with its node."""
    if external_cluster is not None:
        return external_cluster
    plane: ControlPlane = request.getfixturevalue("control_plane")
    return plane


@pytest.fixture(scope="session")
def control_plane(pytestconfig: pytest.Config,
                  external_cluster: external.ExternalCluster | None) -> Iterator[ControlPlane]:
    """etcd, kube-apiserver and a real node, shared by the whole session; stopped and deleted at the end."""
    if external_cluster is not None:
        pytest.fail(external.NEEDS_LOCAL, pytrace=False)
    plane = ControlPlane(progress=_terminal_progress(pytestconfig), node=True)
    try:
        plane.start()
    except ControlPlaneError as error:
        pytest.fail(f"the e2e control plane is not available:\n{error}", pytrace=False)
    try:
        yield plane
    finally:
        plane.stop()


@pytest.fixture(scope="session")
def node(control_plane: ControlPlane) -> Node:
    """The session cluster's node (kubelet, containerd, kube-proxy, controllers, CoreDNS)."""
    return control_plane.node


@pytest.fixture(scope="session")
def kube_api(control_plane: ControlPlane) -> Iterator[k8s.ApiClient]:
    """An admin ApiClient (client certificate in group system:masters) for the control plane."""
    api = control_plane.client()
    try:
        yield api
    finally:
        api.close()  # type: ignore[no-untyped-call]
