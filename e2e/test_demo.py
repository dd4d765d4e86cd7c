"""The README's first command tells a true story: the demo, on real pods, decides every step as expected.

``make demo`` brings up a cluster of its own; one node runs per machine, so this test plays the same
:func:`e2e.demo.run_on` on the session's cluster, with the chart's shared cluster objects set aside
and restored as the Helm tests do.
"""

from __future__ import annotations

import uuid

import pytest

from e2e import demo
from e2e.external import Cluster
from e2e.test_helm_install import Release


def test_the_demo_plays_the_whole_story_on_real_pods(cluster: Cluster, capsys: pytest.CaptureFixture[str]) -> None:
    release = Release(cluster, f"capgate-demo-{uuid.uuid4().hex[:6]}")
    release.prepare()
    try:
        code = demo.run_on(cluster, namespace=f"travel-demo-{uuid.uuid4().hex[:6]}",
                           operator_namespace=release.namespace)
    finally:
        release.restore()
    output = capsys.readouterr().out
    assert code == 0, output[-6000:]
    assert "capgate-init" in output and "Running" in output
    assert "ALLOWED" in output
    assert "denied: limit_exceeded (rule charge)" in output
    assert "denied: deny_rule (rule no-deletes)" in output
    assert "denied: undeclared_destination" in output or "NO ANSWER" in output
    assert "invalid_token: revoked" in output
    assert "authorization='Bearer sk_" in output  # the key the sidecar injected reached payments ...
    assert "agent-made-this-up" not in output  # ... and the agent's own Authorization never did
    assert "the undeclared ledger service received: 0 requests" in output
