"""Drive a real in-process sidecar with adversarial requests and judge every answer with the oracle.

A :class:`Rig` owns a recording upstream and a root key; :meth:`Rig.campaign` runs one random
capability: it starts the real aiohttp sidecar app on loopback, sends raw HTTP/1.1 over a
keep-alive connection (reconnecting when the server closes it), and counts:

* **false allows** — the upstream saw a request the oracle refuses (or one no agent request
  explains: smuggled), or an agent header it must never see;
* **crashes** — a 500, a traceback in a response, a hang, or a connection dropped on a request
  that was well-formed HTTP;
* **disagreements** — a refusal with another status/error than the oracle's, or a false deny.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import random
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web

from capgate import ledger
from capgate.capabilities import keys, receipts, tokens
from capgate.sidecar import app as sidecar_app
from capgate.sidecar import server
from capgate.sidecar.config import SecretRef, Settings
from tests.adversarial import generate, oracle

CORRELATIONS = ("trip-1", "trip-2", "trip-3")
RESPONSE_TIMEOUT = 15.0
_HOSTILE_BLOCKS = (
    " ".join(f"f({i});" for i in range(100)) + " g($a, $b, $c) <- f($a), f($b), f($c);",
    'allow_match("r0");',
    'check if method("GET");',
)


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes


@dataclass
class Counts:
    tried: int = 0
    allowed: int = 0
    refused: int = 0
    parser_refusals: int = 0
    false_allows: int = 0
    header_leaks: int = 0
    crashes: int = 0
    false_denies: int = 0
    disagreements: int = 0
    mcp_tried: int = 0
    """Of ``tried``: JSON-RPC messages to an MCP endpoint."""
    mcp_forwarded: int = 0
    ledger_lies: int = 0
    """Records that contradict what the upstream saw (forwarded but not recorded so, or recorded denied),
    and ledgers that do not verify after the sidecars stopped cleanly."""
    examples: list[str] = field(default_factory=list)

    def add(self, other: Counts) -> None:
        for name in ("tried", "allowed", "refused", "parser_refusals", "false_allows", "header_leaks", "crashes",
                     "false_denies", "disagreements", "ledger_lies", "mcp_tried", "mcp_forwarded"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.examples += other.examples[: max(0, 20 - len(self.examples))]

    def note(self, kind: str, attempt: generate.Attempt, detail: str) -> None:
        if len(self.examples) < 20:
            self.examples.append(f"{kind}: {attempt.method} {attempt.target[:120]!r} "
                                 f"headers={[(n, v[:40]) for n, v in attempt.headers]} body={attempt.body[:60]!r}"
                                 f" -> {detail}")


class RawClient:
    """HTTP/1.1 over one keep-alive socket, bytes in and out, nothing "helped"."""

    def __init__(self, port: int) -> None:
        self.port = port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(OSError, ConnectionError):
                await self._writer.wait_closed()
        self._reader = self._writer = None

    async def send(self, data: bytes, *, head: bool, close: bool) -> Response | None:
        """One request; None when the server closed the connection without an answer."""
        if self._writer is None:
            self._reader, self._writer = await asyncio.open_connection("127.0.0.1", self.port, limit=2**20)
        assert self._reader is not None
        try:
            self._writer.write(data)
            await self._writer.drain()
            response = await asyncio.wait_for(self._read(self._reader, head), RESPONSE_TIMEOUT)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
            await self.close()
            return None
        if close or response.headers.get("connection", "").lower() == "close":
            await self.close()
        return response

    @staticmethod
    async def _read(reader: asyncio.StreamReader, head: bool) -> Response:
        while True:
            block = await reader.readuntil(b"\r\n\r\n")
            lines = block.decode("latin-1").split("\r\n")
            status = int(lines[0].split(" ")[1])
            headers: dict[str, str] = {}
            for line in lines[1:]:
                if ":" in line:
                    name, _, value = line.partition(":")
                    headers[name.strip().lower()] = value.strip()
            if status >= 200:
                break
        if head or status in (204, 304):
            return Response(status, headers, b"")
        if headers.get("transfer-encoding", "").lower() == "chunked":
            body = bytearray()
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    await reader.readuntil(b"\r\n")
                    break
                body += await reader.readexactly(size + 2)
                del body[-2:]
            return Response(status, headers, bytes(body))
        if "content-length" in headers:
            return Response(status, headers, await reader.readexactly(int(headers["content-length"])))
        return Response(status, headers, await reader.read())


class Upstream:
    """Records every request by the ``X-Fuzz-Id`` the runner stamps on it."""

    def __init__(self) -> None:
        self.seen: dict[int, dict[str, Any]] = {}
        self.unexplained: list[str] = []
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        ident = request.headers.get("X-Fuzz-Id", "")
        if not ident.isdigit():
            self.unexplained.append(f"{request.method} {request.raw_path}")
        else:
            self.seen[int(ident)] = {"path": request.raw_path, "headers": list(request.headers.items()),
                                     "body": body}
        answer: dict[str, Any] = {"ok": True}
        with contextlib.suppress(ValueError, RecursionError):
            message = json.loads(body)
            if isinstance(message, dict) and message.get("jsonrpc") == "2.0" and "method" in message \
                    and "id" in message:  # an MCP request: a successful result for its id (a tool call mints)
                answer = {"jsonrpc": "2.0", "id": message["id"], "result": {"content": []}}
        return web.json_response(answer, headers={"X-Fuzz-Upstream": ident or "none"})

    async def start(self) -> None:
        app = web.Application(client_max_size=8 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self.runner = web.AppRunner(app, access_log=None, auto_decompress=False)  # record bytes as forwarded
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = self.runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


class CrashLog(logging.Handler):
    """ERROR records from the sidecar (its middleware logs internal errors there): each is a crash."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record.getMessage()[:300])


class Rig:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.keyset = keys.KeySet.generate()
        self.root_key, _ = self.keyset.write(workdir / "keys")
        self.other_root = keys.KeySet.generate()
        self.upstream = Upstream()
        self.receipts: list[tuple[str, str, str]] = []
        self.tokens = generate.Tokens()
        self.crash_log = CrashLog()
        self._index = 0
        self._next_id = 0
        self.forwarded_ids: set[str] = set()
        """Decision ids of requests the upstream saw: their records must say ``forwarded``."""

    @property
    def audit_path(self) -> Path:
        return self.workdir / "audit.jsonl"

    async def __aenter__(self) -> Rig:
        # aiohttp logs every request its parser refuses, with a traceback: thousands here, by design.
        self._server_log_level = logging.getLogger("aiohttp.server").level
        logging.getLogger("aiohttp.server").setLevel(logging.CRITICAL)
        await self.upstream.start()
        logging.getLogger("capgate").addHandler(self.crash_log)
        return self

    async def __aexit__(self, *exc: object) -> None:
        logging.getLogger("capgate").removeHandler(self.crash_log)
        logging.getLogger("aiohttp.server").setLevel(self._server_log_level)
        await self.upstream.stop()

    @contextlib.asynccontextmanager
    async def sidecar(self, spec: dict[str, Any]) -> AsyncIterator[tuple[int, web.Application]]:
        self._index += 1
        cap_path = self.workdir / f"cap-{self._index}.yaml"
        cap_path.write_text(yaml.safe_dump(generate.document(spec)))
        names = [u["name"] for u in spec["upstreams"]]
        settings = Settings(capability=cap_path, root_key=self.root_key, audit_log=str(self.audit_path),
                            upstream_urls={n: self.upstream.url for n in names},
                            upstream_credentials={names[0]: SecretRef("env", "FUZZ_API_KEY")},
                            read_timeout=5, total_timeout=10, connect_timeout=2)
        agent, _admin = sidecar_app.create_apps(settings, env={"FUZZ_API_KEY": generate.API_KEY})
        runner = server.GuardedRunner(agent, agent[server.GUARD], access_log=None,
                                      auto_decompress=False)  # as capgate-sidecar serves it
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        try:
            yield runner.addresses[0][1], agent
        finally:
            await runner.cleanup()

    def _learn_tokens(self, spec: dict[str, Any], agent: web.Application) -> None:
        """Valid tokens for later campaigns (this capability, narrowed) and forged ones."""
        loaded = agent[sidecar_app.GATE].store.current
        assert loaded is not None
        credential = loaded.credential
        allow = [r["name"] for r in spec["rules"] if r["effect"] == "allow"]
        self.tokens.valid[credential.token] = oracle.Narrowed(spec)
        if allow:
            subset = allow[: max(1, len(allow) // 2)]
            narrowed = tokens.attenuate(credential, rules=subset, ttl=timedelta(minutes=30))
            self.tokens.valid[narrowed] = oracle.Narrowed(spec, tuple(subset))
        if len(self.tokens.valid) > 12:
            for key in list(self.tokens.valid)[:-12]:
                del self.tokens.valid[key]
        token = credential.token
        self.tokens.invalid = [
            token[: len(token) // 2], token[:-3], token[:40] + ("A" if token[40] != "A" else "B") + token[41:],
            tokens.mint(loaded.capability, self.other_root),
            "", "not-a-token", "E" * 7000, token + "." + token,
            # Genuine signatures outside their validity: issued 120 s ahead (not before), expired 2 min ago.
            tokens.mint(loaded.capability, self.keyset, now=datetime.now(UTC) + timedelta(seconds=120)),
            tokens.mint(loaded.capability, self.keyset, now=datetime.now(UTC) - timedelta(hours=1, minutes=2),
                        ttl=timedelta(hours=1)),
            # Blocks appended offline (they verify): a Datalog bomb, a fact granting a rule, a foreign check.
            *(credential.parsed.append([(code, {})]).to_base64() for code in _HOSTILE_BLOCKS),
        ]
        other = tokens.mint(replace(loaded.capability, service_account="someone-else"), self.keyset)
        self.tokens.valid[other] = oracle.Narrowed(spec, holder="someone-else")
        session = receipts.SessionKey.issue(self.other_root, capability="fuzz/agent", credential=credential.id)
        self.receipts_foreign = receipts.mint(session, rule="r0", correlation="trip-1", ttl=timedelta(minutes=5),
                                              decision_id="x")
        # A compromised sidecar of another capability under the same root signs receipts claiming this one.
        stolen = receipts.SessionKey.issue(self.keyset, capability="fuzz/other-agent", credential="ab" * 64)
        claimed = loaded.capability.qualified_name
        self.receipts_stolen = {corr: ",".join(_forge(stolen, rule=r["name"], correlation=corr, capability=claimed,
                                                      credential=credential.id) for r in spec["rules"])
                                for corr in CORRELATIONS}

    async def campaign(self, seed: int, requests: int, *, mcp: bool = False) -> Counts:
        """One random capability (``mcp``: surely with an MCP upstream), ``requests`` adversarial requests."""
        rng = random.Random(seed)
        spec = generate.random_spec(rng, mcp=mcp)
        counts = Counts()
        agent_state = oracle.Agent(spec)
        offset = self.audit_path.stat().st_size if self.audit_path.exists() else 0
        async with self.sidecar(spec) as (port, agent):
            self._learn_tokens(spec, agent)
            client = RawClient(port)
            try:
                for _ in range(requests):
                    await self._one(rng, spec, agent_state, client, counts)
            finally:
                await client.close()
        if self.upstream.unexplained:
            counts.false_allows += len(self.upstream.unexplained)
            counts.examples.append(f"smuggled to the upstream: {self.upstream.unexplained[:3]}")
            self.upstream.unexplained.clear()
        if self.crash_log.records:
            counts.crashes += len(self.crash_log.records)
            counts.examples += [f"logged error: {r}" for r in self.crash_log.records[:3]]
            self.crash_log.records.clear()
        self._check_records(offset, counts)
        return counts

    def _check_records(self, offset: int, counts: Counts) -> None:
        """The ledger tells the truth: what reached the upstream is recorded as forwarded, never as denied."""
        with self.audit_path.open("rb") as handle:
            handle.seek(offset)
            records = [json.loads(line) for line in handle if line.strip()]
        for record in records:
            if "type" in record:
                continue
            seen = record["decision_id"] in self.forwarded_ids
            recorded = bool(record.get("forwarded"))
            if (seen and not recorded) or (recorded and record["outcome"] not in ("allowed", "would_deny")):
                counts.ledger_lies += 1
                if len(counts.examples) < 20:
                    counts.examples.append(f"LEDGER: the upstream saw it, the record says {record}")
        self.forwarded_ids.clear()

    def verify_ledger(self, counts: Counts) -> None:
        """Every sidecar stopped cleanly, so every record must be covered by a signature."""
        report = ledger.verify(self.audit_path, self.keyset.trust_bundle())
        if self.audit_path.exists() and report.verdict() != "VERIFIED":
            counts.ledger_lies += 1
            counts.examples.append(f"LEDGER: {report.summary()[:300]}")

    async def _one(self, rng: random.Random, spec: dict[str, Any], state: oracle.Agent, client: RawClient,
                   counts: Counts) -> None:
        attempt = generate.random_attempt(rng, spec, self.tokens, self.receipts, CORRELATIONS)
        if rng.random() < 0.01 and hasattr(self, "receipts_foreign"):
            attempt.headers.append(("X-Capgate-Receipt", self.receipts_foreign))
        stolen = getattr(self, "receipts_stolen", {}).get(attempt.correlation())
        if stolen and rng.random() < 0.05:
            attempt.headers.append(("X-Capgate-Receipt", stolen))  # one "receipt" of every rule
            attempt.http_weird = attempt.http_weird or len(stolen) > 8000  # over the parser's field limit
        self._next_id += 1
        ident = self._next_id
        correlation = attempt.correlation()
        narrowed = None
        if attempt.token is not None:
            narrowed = self.tokens.valid.get(attempt.token)
        carried: dict[str, set[str]] = {}
        for _receipt, receipt_corr, rule in attempt.carried:
            if receipt_corr == correlation:
                carried.setdefault(correlation, set()).add(rule)
        expected, rule = state.decide(method=attempt.method, target=attempt.target, headers=attempt.headers,
                                      body=attempt.body, narrowed=narrowed, carried=carried)
        counts.tried += 1
        counts.mcp_tried += attempt.mcp
        data = attempt.encode(ident)
        head = attempt.method == "HEAD"
        response = await client.send(data, head=head, close=attempt.close or attempt.http_weird)
        if response is None and ident not in self.upstream.seen:
            # The server may close an idle keep-alive connection (e.g. after a body it did not read)
            # before our request arrived: any HTTP client retries that once on a new connection.
            response = await client.send(data, head=head, close=True)
        seen = self.upstream.seen.pop(ident, None)
        self.upstream.seen.clear()
        if seen is not None and response is not None and "x-capgate-decision-id" in response.headers:
            self.forwarded_ids.add(response.headers["x-capgate-decision-id"])
        if seen is not None:
            counts.allowed += 1
            counts.mcp_forwarded += attempt.mcp
            state.charged()
            if expected is not None:
                counts.false_allows += 1
                counts.note("FALSE ALLOW", attempt, f"oracle {expected}, upstream saw {seen['path']!r}")
            self._check_forwarded(attempt, spec, seen, counts)
        else:
            counts.refused += 1
        if response is None:
            if attempt.http_weird:
                counts.parser_refusals += 1
            else:
                counts.crashes += 1
                counts.note("CRASH", attempt, "connection dropped without a response")
            return
        if (response.status >= 500 and response.status not in (502, 503, 504)) or b"Traceback" in response.body \
                or b"internal_error" in response.body:
            counts.crashes += 1
            counts.note("CRASH", attempt, f"{response.status} {response.body[:200]!r}")
            return
        error = _error_code(response)
        if response.status == 400 and error is None:
            await client.close()  # a parser refusal: the server closes this connection
        if head and error is None and response.status >= 400 and not (attempt.http_weird and response.status == 400):
            error = expected.error if expected is not None else None  # HEAD answers carry no body
        if seen is not None:
            if 200 <= response.status < 300:
                receipt = response.headers.get("x-capgate-receipt")
                if expected is None:
                    state.forwarded(correlation, rule)
                    if receipt and correlation and rule:
                        self.receipts.append((receipt, correlation, rule))
                        del self.receipts[:-30]
            return
        if expected is None:
            if attempt.http_weird and error is None:
                counts.parser_refusals += 1
                return
            counts.false_denies += 1
            counts.note("FALSE DENY", attempt, f"{response.status} {response.body[:200]!r}")
            return
        if error is None and attempt.http_weird and response.status == 400:
            counts.parser_refusals += 1
            return
        if (response.status, error) != (expected.status, expected.error):
            counts.disagreements += 1
            counts.note("DISAGREE", attempt, f"oracle {expected}, sidecar {response.status} {response.body[:200]!r}")

    def _check_forwarded(self, attempt: generate.Attempt, spec: dict[str, Any], seen: dict[str, Any],
                         counts: Counts) -> None:
        """What the upstream saw: no capgate headers, no agent credentials, no hop-by-hop headers."""
        upstream_name, path = oracle.Agent(spec).route(attempt.target)
        inject = next((u["inject"] for u in spec["upstreams"] if u["name"] == upstream_name and "inject" in u), None)
        listed = {p.strip().lower() for n, v in attempt.headers if n.lower() == "connection" for p in v.split(",")}
        problems = []
        for name, value in seen["headers"]:
            lower = name.lower()
            if lower.startswith("x-capgate-") or lower in ("proxy-authorization", "te", "upgrade", "keep-alive") \
                    or lower in listed - {"keep-alive", "close"}:
                problems.append(name)
            if lower == "authorization" and (inject is None or inject["header"] != "Authorization"):
                problems.append(f"{name}: {value[:20]}")
            if inject is not None and lower == inject["header"].lower() and value != inject["valuePrefix"] + \
                    generate.API_KEY:
                problems.append(f"{name} not the injected key")
        sent = {n.lower() for n, _ in attempt.headers}
        for name, _value in seen["headers"]:
            lower = name.lower()
            if lower in oracle.METHOD_OVERRIDE_HEADERS:
                problems.append(f"method override {name} forwarded")
            if lower in ("accept", "accept-encoding", "user-agent", "content-type") and lower not in sent:
                problems.append(f"{name} added by the forwarder")
        if inject is not None and sum(1 for n, _ in seen["headers"] if n.lower() == inject["header"].lower()) != 1:
            problems.append(f"injected {inject['header']} not exactly once")
        from urllib.parse import unquote

        if path is not None and unquote(seen["path"].partition("?")[0]) != path:
            problems.append(f"upstream path {seen['path']!r} is not the matched {path!r}")
        if problems:
            counts.header_leaks += 1
            counts.note("LEAK", attempt, "; ".join(problems))


def _error_code(response: Response) -> str | None:
    """capgate's ``error``, also from an MCP refusal (a JSON-RPC error with capgate's object in ``data``)."""
    if "application/json" not in response.headers.get("content-type", ""):
        return None
    try:
        document = json.loads(response.body)
    except ValueError:
        return None
    error = document.get("error") if isinstance(document, dict) else None
    if isinstance(error, dict) and document.get("jsonrpc") == "2.0":
        data = error.get("data")
        error = data.get("error") if isinstance(data, dict) else None
    return error if isinstance(error, str) else None


async def run(seed: int, campaigns: int, requests: int, workdir: Path | None = None, *, mcp: bool = False) -> Counts:
    """``campaigns`` random capabilities × ``requests`` requests each, seeded."""
    total = Counts()
    with tempfile.TemporaryDirectory(prefix="capgate-fuzz-") as tmp:
        async with Rig(workdir or Path(tmp)) as rig:
            for index in range(campaigns):
                total.add(await rig.campaign(seed * 100_003 + index, requests, mcp=mcp))
            rig.verify_ledger(total)
    return total


def _forge(key: receipts.SessionKey, *, rule: str, correlation: str, capability: str, credential: str) -> str:
    """A receipt signed with ``key`` that claims a capability and credential its endorsement does not name."""
    now = int(time.time())
    payload = json.dumps({"rule": rule, "corr": correlation, "cap": capability, "cred": credential, "iat": now,
                          "exp": now + 300, "did": "stolen", "sid": key.key_id},
                         sort_keys=True, separators=(",", ":")).encode()
    encoded = (base64.urlsafe_b64encode(raw).rstrip(b"=").decode() for raw in (payload, key.sign(payload)))
    return f"v1.{'.'.join(encoded)}.{key.endorsement}"
