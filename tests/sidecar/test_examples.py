"""examples/agent_demo.py against examples/upstream_demo.py through a real sidecar."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import yaml
from aiohttp.test_utils import TestServer

from tests.sidecar.conftest import API_KEY, MakeSidecar

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def load_example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


async def test_agent_demo_walks_through_allowed_and_denied_steps(sidecar: MakeSidecar,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    upstream_demo, agent_demo = load_example("upstream_demo"), load_example("agent_demo")
    server = TestServer(upstream_demo.build_app())
    await server.start_server()
    try:
        url = str(server.make_url("")).rstrip("/")
        example = yaml.safe_load((EXAMPLES / "booking-agent.yaml").read_text())["spec"]
        example.pop("datalog")  # its calendar check would make this test expire on 2027-01-01
        sc = await sidecar(example, upstream_urls={"flights": url, "payments": url})
        assert await agent_demo.run(str(sc.client.make_url(""))) == 0
    finally:
        await server.close()
    out = capsys.readouterr().out
    assert "limit_exceeded" in out
    assert "deny_rule (rule no-deletes)" in out
    assert f'"Authorization": "Bearer {API_KEY}"' in out  # the upstream saw the injected key
    assert "agent-made-this-up" not in out
    assert "capgate-headers=none" in out
    assert "capgate-headers=['" not in out
