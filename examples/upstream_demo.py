"""A fake flights + payments API for the README walkthrough: it prints what it receives.

    python examples/upstream_demo.py --port 9001

Point both upstreams of examples/booking-agent.yaml at it
(``--upstream-url flights=http://127.0.0.1:9001 --upstream-url payments=http://127.0.0.1:9001``)
and watch each line: the payments calls carry the ``Authorization`` the *sidecar* injected, and no
call carries the agent's own ``Authorization`` or any ``X-Capgate-*`` header.
"""

from __future__ import annotations

import argparse
import itertools
import json

from aiohttp import web

SHOWN_HEADERS = ("Authorization", "X-Agent-Note")
charge_ids = itertools.count(1)


def describe(request: web.Request, body: bytes) -> str:
    shown = {name: request.headers[name] for name in SHOWN_HEADERS if name in request.headers}
    capgate = sorted(h for h in request.headers if h.lower().startswith("x-capgate-"))
    line = f"{request.method:6} {request.raw_path:28} headers={json.dumps(shown)}"
    line += f" capgate-headers={capgate or 'none'}"
    if body:
        line += f" body={body.decode(errors='replace')[:80]}"
    return line


async def search(request: web.Request) -> web.Response:
    print(describe(request, b""), flush=True)
    return web.json_response({"flights": [{"id": "UA100", "from": request.query.get("from", "SFO"),
                                           "to": request.query.get("to", "JFK"), "price": 30000}]})


async def charge(request: web.Request) -> web.Response:
    body = await request.read()
    print(describe(request, body), flush=True)
    amount = json.loads(body or b"{}").get("amount")
    return web.json_response({"id": f"ch_{next(charge_ids)}", "amount": amount, "status": "succeeded"}, status=201)


async def anything(request: web.Request) -> web.Response:
    print(describe(request, await request.read()), flush=True)
    return web.json_response({"ok": True})


def build_app() -> web.Application:
    app = web.Application()
    app.router.add_get("/search", search)
    app.router.add_get("/search/{tail:.*}", search)
    app.router.add_post("/v1/charges", charge)
    app.router.add_route("*", "/{tail:.*}", anything)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description="fake flights + payments upstream for the capgate demo")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9001)
    args = parser.parse_args()
    print(f"demo upstream on http://{args.host}:{args.port} (flights: GET /search, payments: POST /v1/charges)",
          flush=True)
    web.run_app(build_app(), host=args.host, port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
