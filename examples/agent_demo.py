"""An "agent" driving a capgate sidecar: search → charge $300 → charge $5,000 → DELETE.

    python examples/agent_demo.py --sidecar http://127.0.0.1:15080

Like an unmodified agent it sends no capgate headers at all (the sidecar holds the search receipt
for the pod session), and like a prompt-injected one it also sends an ``Authorization`` header of
its own, which never reaches the upstream. Amounts are in cents, as in examples/booking-agent.yaml.
Exit code 0 when every step got the expected answer.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from dataclasses import dataclass

import aiohttp


@dataclass(frozen=True)
class Step:
    title: str
    method: str
    path: str
    body: dict[str, object] | None
    expect: int


STEPS = (
    Step("search flights SFO→JFK", "GET", "/flights/search?from=SFO&to=JFK", None, 200),
    Step("charge $300 (after search)", "POST", "/payments/v1/charges", {"amount": 30000, "currency": "usd"}, 200),
    Step("charge $5,000 (over limit)", "POST", "/payments/v1/charges", {"amount": 500000, "currency": "usd"}, 403),
    Step("delete a charge", "DELETE", "/payments/v1/charges/ch_1", None, 403),
)


def verdict(status: int, body: dict[str, object]) -> str:
    if status < 400:
        return "allowed"
    return f"{body.get('error')}: {body.get('reason')}" + (f" (rule {body['rule']})" if body.get("rule") else "")


async def run(sidecar: str) -> int:
    failures = 0
    rows = []
    async with aiohttp.ClientSession(headers={"Authorization": "Bearer agent-made-this-up"}) as session:
        for step in STEPS:
            async with session.request(step.method, sidecar.rstrip("/") + step.path, json=step.body) as response:
                try:
                    body = await response.json(content_type=None)
                except json.JSONDecodeError:
                    body = {}
                receipt = "yes" if "X-Capgate-Receipt" in response.headers else "-"
                ok = (response.status < 300) if step.expect == 200 else response.status == step.expect
                failures += not ok
                rows.append((step.title, response.status, verdict(response.status, body), receipt,
                             response.headers.get("X-Capgate-Decision-Id", "?")[:12], "ok" if ok else "UNEXPECTED"))
    widths = [max(len(str(r[i])) for r in [*rows, HEADER]) for i in range(len(HEADER))]
    for row in (HEADER, tuple("-" * w for w in widths), *rows):
        print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)))
    return 1 if failures else 0


HEADER = ("step", "status", "sidecar said", "receipt", "decision", "check")


def main() -> None:
    parser = argparse.ArgumentParser(description="drive a capgate sidecar like a booking agent would")
    parser.add_argument("--sidecar", default="http://127.0.0.1:15080", help="the sidecar's agent port URL")
    args = parser.parse_args()
    sys.exit(asyncio.run(run(args.sidecar)))


if __name__ == "__main__":
    main()
