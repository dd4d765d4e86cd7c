"""Differential: whatever a Go ``encoding/json`` upstream would charge, the sidecar judged first — or refused.

For every class of body in issue 10 the sidecar either refuses the request (it never reaches Go)
or forwards it, and then the amount Go decodes equals the amount the sidecar's limit and budget
saw, and a form or query amount Go's ``r.FormValue`` would read does not exist.
"""

from __future__ import annotations

import copy
import gzip
import http.client
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from capgate.capabilities import bodies, spec
from tests.peers.conftest import PEER_SPEC, RealSidecar, run_sidecar

JSON = {"Content-Type": "application/json"}
FORM = {"Content-Type": "application/x-www-form-urlencoded"}


def send(sidecar: RealSidecar, method: str, target: str, body: bytes = b"",
         headers: dict[str, str | bytes] | None = None) -> tuple[int, dict[str, Any]]:
    """One request as raw as http.client allows: no Accept, no Accept-Encoding, no User-Agent."""
    conn = http.client.HTTPConnection("127.0.0.1", sidecar.port, timeout=30)
    try:
        conn.putrequest(method, target, skip_accept_encoding=True)
        for name, value in (headers or {}).items():
            conn.putheader(name, value)
        if body or method in ("POST", "PUT", "PATCH"):
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        answer = conn.getresponse()
        return answer.status, json.loads(answer.read() or b"{}")
    finally:
        conn.close()


def judged(body: bytes, headers: dict[str, str | bytes], query: str = "") -> int | None:
    """The amount the sidecar's limit and budget read from these bytes (its own reader)."""
    document = bodies.read(body, content_type=[str(v) for k, v in headers.items() if k.lower() == "content-type"],
                           content_encoding=[str(v) for k, v in headers.items() if k.lower() == "content-encoding"],
                           query=query, fields=("amount",))
    return spec.numeric_field(document, "amount")


BODY_CLASSES: list[tuple[str, bytes, dict[str, str | bytes], str]] = [
    ("plain", b'{"amount": 100}', JSON, ""),
    ("case collision", b'{"amount":100,"AMOUNT":5000000}', JSON, ""),
    ("other case only", b'{"AMOUNT":5000000}', JSON, ""),
    ("title case", b'{"Amount":5000000}', JSON, ""),
    ("duplicate, first wins elsewhere", b'{"amount":5000000,"amount":100}', JSON, ""),
    ("escaped duplicate", b'{"amount":100,"\\u0061mount":5000000}', JSON, ""),
    ("trailing document", b'{"amount":100}{"amount":5000000}', JSON, ""),
    ("trailing garbage", b'{"amount":100} x', JSON, ""),
    ("invalid utf-8 elsewhere", b'{"amount":100,"note":"\xff"}', JSON, ""),
    ("byte order mark", b'\xef\xbb\xbf{"amount":100}', JSON, ""),
    ("NaN", b'{"amount":NaN}', JSON, ""),
    ("form body", b"amount=5000000", FORM, ""),
    ("JSON labelled form, form in the query", b'{"amount":100}', FORM, "amount=5000000"),
    ("field in the query", b'{"amount":100}', JSON, "amount=5000000"),
    ("field in the query, other case", b'{"amount":100}', JSON, "AMOUNT=5000000"),
    ("field in the query, encoded", b'{"amount":100}', JSON, "%61mount=5000000"),
    ("no content type", b'{"amount":100}', {}, ""),
    ("text/plain", b'{"amount":100}', {"Content-Type": "text/plain"}, ""),
    ("utf-16 charset", b'{"amount":100}', {"Content-Type": "application/json; charset=utf-16"}, ""),
    ("gzip", gzip.compress(b'{"amount":5000000}'), {**JSON, "Content-Encoding": "gzip"}, ""),
    ("unknown encoding", b'{"amount":100}', {**JSON, "Content-Encoding": "x-zstd-ish"}, ""),
    ("json with charset", b'{"amount": 200}', {"Content-Type": "application/json; charset=utf-8"}, ""),
]


@pytest.mark.parametrize(("name", "body", "headers", "query"), BODY_CLASSES, ids=[c[0] for c in BODY_CLASSES])
def test_go_never_charges_an_amount_the_sidecar_did_not_judge(peer_sidecar: RealSidecar, name: str, body: bytes,
                                                              headers: dict[str, str | bytes], query: str) -> None:
    target = "/payments/v1/charges" + (f"?{query}" if query else "")
    status, answer = send(peer_sidecar, "POST", target, body, headers)
    if status != 200:
        assert status in (400, 403), answer
        assert "jsonAmount" not in answer  # the Go upstream never saw it
        return
    seen = answer
    assert seen["method"] == "POST"
    assert seen["formAmount"] == ""  # neither the query nor a form holds an amount
    assert seen["inflatedAmount"] is None
    charged = seen["jsonAmount"]
    assert charged is not None, seen["jsonError"]
    assert charged == judged(body, headers, query)
    assert charged <= 40000


@pytest.mark.parametrize("name", ["plain", "json with charset"])
def test_well_formed_charges_still_go_through(peer_sidecar: RealSidecar, name: str) -> None:
    _, body, headers, _ = next(c for c in BODY_CLASSES if c[0] == name)
    status, seen = send(peer_sidecar, "POST", "/payments/v1/charges", body, headers)
    assert status == 200
    assert seen["jsonAmount"] == judged(body, headers)


@pytest.mark.parametrize("header", ["X-HTTP-Method-Override", "X-HTTP-Method", "X-Method-Override"])
def test_go_sees_the_method_that_was_decided_and_no_override(peer_sidecar: RealSidecar, header: str) -> None:
    status, seen = send(peer_sidecar, "POST", "/payments/v1/charges", b'{"amount": 1}', {**JSON, header: "DELETE"})
    assert status == 200
    assert seen["method"] == "POST"
    assert not {name.lower() for name in seen["headers"]} & {"x-http-method-override", "x-http-method",
                                                             "x-method-override"}


def test_a_method_override_parameter_never_reaches_go(peer_sidecar: RealSidecar) -> None:
    status, answer = send(peer_sidecar, "POST", "/files/doc?_method=DELETE", b"x", {"Content-Type": "text/plain"})
    assert (status, answer["reason"]) == (400, "method_override")


def test_go_receives_no_header_the_agent_did_not_send(peer_sidecar: RealSidecar) -> None:
    status, seen = send(peer_sidecar, "POST", "/files/upload", b"raw bytes")
    assert status == 200
    assert {name.lower() for name in seen["headers"]}.isdisjoint({"accept", "accept-encoding", "content-type",
                                                                   "user-agent"}), seen["headers"]


def test_header_bytes_that_are_not_utf8_are_refused_before_go(peer_sidecar: RealSidecar) -> None:
    status, answer = send(peer_sidecar, "GET", "/files/doc", headers={"X-Note": b"caf\xe9"})
    assert (status, answer["reason"]) == (400, "bad_header")


def test_a_gzip_body_reaches_go_byte_for_byte_where_no_limit_reads_it(peer_sidecar: RealSidecar) -> None:
    payload = gzip.compress(b'{"amount": 5000000}' * 100)
    status, seen = send(peer_sidecar, "POST", "/files/upload", payload,
                        {"Content-Type": "application/json", "Content-Encoding": "gzip"})
    assert status == 200
    assert seen["bodyBytes"] == len(payload)  # compressed, as sent: the sidecar never inflates


def test_a_gzip_bomb_is_refused_at_once_and_the_sidecar_stays_responsive(peer_sidecar: RealSidecar) -> None:
    bomb = gzip.compress(b"{" + b" " * (512 * 1024 * 1024) + b"}", compresslevel=9)  # 512 MiB inflated
    status, answer = send(peer_sidecar, "POST", "/payments/v1/charges", bomb, {**JSON, "Content-Encoding": "gzip"})
    assert (status, answer["reason"]) == (400, "body_encoding")
    status, seen = send(peer_sidecar, "POST", "/files/upload", bomb, {"Content-Encoding": "gzip"})
    assert (status, seen["bodyBytes"]) == (200, len(bomb))
    status, _ = send(peer_sidecar, "GET", "/files/health")
    assert status == 200


def curl(sidecar: RealSidecar, *args: str) -> tuple[int, dict[str, Any]]:
    result = subprocess.run(["curl", "-sS", "-w", "\n%{http_code}", *args], capture_output=True, text=True,
                            check=True, timeout=30)
    body, _, code = result.stdout.rpartition("\n")
    return int(code), json.loads(body or "{}")


@pytest.mark.parametrize(("args", "reason"), [
    (["-d", "amount=5000000"], "body_content_type"),
    (["-H", "Content-Type: application/json", "-d", '{"amount":100,"AMOUNT":5000000}'], "ambiguous_body"),
    (["-H", "Content-Type: application/json", "-d", '{"amount":100}', "-G", "--data-urlencode", "amount=5000000"],
     "ambiguous_query"),
])
def test_curl_attacks_are_refused_and_a_curl_charge_passes(peer_sidecar: RealSidecar, args: list[str],
                                                          reason: str) -> None:
    method = ["-X", "POST"] if "-G" in args else []
    status, answer = curl(peer_sidecar, *method, *args, f"{peer_sidecar.url}/payments/v1/charges")
    assert (status, answer.get("reason")) == (400, reason), answer
    status, seen = curl(peer_sidecar, "--json", '{"amount": 300}', f"{peer_sidecar.url}/payments/v1/charges")
    assert (status, seen["jsonAmount"]) == (200, 300)


def test_a_budget_of_100000_lets_no_more_through_whatever_the_method_or_body(tmp_path: Path,
                                                                            go_upstream: str) -> None:
    capability = copy.deepcopy(PEER_SPEC)
    capability["budgets"] = [{"upstream": "payments", "field": "amount", "max": 100000, "per": "24h"}]
    charged = 0
    with run_sidecar(tmp_path, go_upstream, capability) as sidecar:
        attempts = [("GET", b'{"amount": 60000}', JSON), ("QUERY", b'{"amount": 60000}', JSON),
                    ("PROPFIND", b'{"amount": 60000}', JSON), ("POST", b"amount=60000", FORM),
                    ("POST", b'{"amount":1,"AMOUNT":60000}', JSON), ("POST", b'{"Amount":60000}', JSON),
                    ("POST", b'{"amount":1} {"amount":60000}', JSON),
                    ("POST", gzip.compress(b'{"amount":60000}'), {**JSON, "Content-Encoding": "gzip"})] * 3
        for method, body, headers in attempts:
            status, seen = send(sidecar, method, "/payments/v1/refunds", body, headers)
            if status == 200:
                inflated = seen["inflatedAmount"] or 0
                charged += max(seen["jsonAmount"] or 0, int(seen["formAmount"] or 0), inflated)
    assert charged <= 100000
