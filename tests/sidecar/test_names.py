"""Paths through the real sidecar: deny rules catch what forgiving routers read alike, allow rules stay exact."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from tests.sidecar.conftest import BASE_SPEC, MakeSidecar
from tests.sidecar.test_routing import raw_request


def admin_spec() -> dict[str, Any]:
    spec = copy.deepcopy(BASE_SPEC)
    spec["rules"] += [
        {"name": "flights-all", "effect": "allow", "upstream": "flights", "methods": ["GET"], "paths": ["/**"]},
        {"name": "no-admin", "effect": "deny", "upstream": "flights", "paths": ["/admin/**"]},
    ]
    return spec


async def get(sc: Any, path: str) -> tuple[int, bytes]:
    return await raw_request(sc, f"GET {path} HTTP/1.1\r\nHost: sidecar\r\nConnection: close\r\n\r\n".encode())


@pytest.mark.parametrize("path", [
    "/flights/admin/x", "/flights/ADMIN/x", "/flights/Admin/x", "/flights/admin/", "/flights/admin",
    "/flights/admin./x", "/flights/admin%20/x", "/flights/admin%C2%A0/x", "/flights/admin.json",
    "/flights/%EF%BD%81%EF%BD%84%EF%BD%8D%EF%BD%89%EF%BD%8E/x", "/flights/ad%E2%80%8Bmin/x",
    "/flights/admin::$DATA/x",
])
async def test_a_deny_rule_catches_every_spelling_a_forgiving_router_routes_to_it(sidecar: MakeSidecar,
                                                                                  path: str) -> None:
    sc = await sidecar(admin_spec())
    status, data = await get(sc, path)
    assert status == 403, data
    assert b'"deny_rule"' in data and b'"no-admin"' in data
    assert sc.upstream.seen == []


@pytest.mark.parametrize("path", ["/flights/admin%09/x", "/flights/a/.../b", "/flights/%20/admin",
                                  "/flights/%EF%BC%8E%EF%BC%8E/admin", "/flights/a%EF%BC%8Fadmin",
                                  "/flights/a%C2%85b"])
async def test_a_path_a_router_could_read_another_way_is_400(sidecar: MakeSidecar, path: str) -> None:
    sc = await sidecar(admin_spec())
    status, data = await get(sc, path)
    assert status == 400, data
    assert sc.upstream.seen == []


async def test_look_alikes_of_an_allowed_path_are_not_allowed(sidecar: MakeSidecar) -> None:
    sc = await sidecar()
    assert (await get(sc, "/flights/search"))[0] == 200
    for path in ("/flights/SEARCH", "/flights/search.", "/flights/search%20"):
        status, data = await get(sc, path)
        assert status == 403, (path, data)
