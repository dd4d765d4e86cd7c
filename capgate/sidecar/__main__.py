"""``capgate-sidecar`` / ``python -m capgate.sidecar``: parse settings, load the credential, serve.

A bad setting or unusable credential material exits with code 2 and one line naming the setting
(no traceback): the process never starts half-configured. SIGTERM/SIGINT shut down gracefully,
which also writes a final signed checkpoint to the audit ledger.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence

from aiohttp import web

from capgate.sidecar import config, server
from capgate.sidecar.app import EGRESS, create_apps

log = logging.getLogger("capgate.sidecar")
MAX_HEADER_BYTES = 64 * 1024 + 1024

BACKLOG = 1024
"""Pending connections the kernel queues for us. aiohttp's default of 128 overflows when hundreds of
agent connections open at once, and the kernel then resets some of them (measured: bench/adversarial.py)."""


async def serve(settings: config.Settings, agent: web.Application, admin: web.Application) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    # A narrowed token of a large capability outgrows aiohttp's 8 KiB header default; the sidecar
    # itself accepts X-Capgate-Token up to 64 KiB, so the agent port parses headers that long.
    # auto_decompress=False: aiohttp's server inflates gzip/deflate/br request bodies by default, so
    # a gzip bomb would stall the loop and the upstream would get inflated bytes labelled gzip.
    agent_runner = server.GuardedRunner(agent, agent[server.GUARD], access_log=None, max_field_size=MAX_HEADER_BYTES,
                                        max_line_size=MAX_HEADER_BYTES, auto_decompress=False)
    runners = [agent_runner, server.GuardedRunner(admin, admin[server.GUARD], access_log=None)]
    outbound = agent[EGRESS]
    try:
        for runner, address in zip(runners, (settings.listen, settings.admin_listen), strict=True):
            await runner.setup()
            await web.TCPSite(runner, address.host, address.port, reuse_address=True, backlog=BACKLOG).start()
        if outbound is not None:  # captured egress is served by the agent app's own server
            assert agent_runner.server is not None
            await outbound.start(agent_runner.server)
        log.info("capgate-sidecar listening on http://%s (agent) and http://%s (admin)",
                 settings.listen, settings.admin_listen)
        await stop.wait()
        log.info("shutting down")
    finally:
        if outbound is not None:
            await outbound.close()
        for runner in reversed(runners):
            await runner.cleanup()


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop when installed (the ``fast`` extra): the proxy's own overhead drops by about a third."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def main(argv: Sequence[str] | None = None) -> int:
    try:
        settings = config.load(sys.argv[1:] if argv is None else argv, os.environ)
    except config.ConfigError as exc:
        print(f"capgate-sidecar: error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.log_level_number, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    try:
        agent, admin = create_apps(settings)
    except config.ConfigError as exc:
        print(f"capgate-sidecar: error: {exc}", file=sys.stderr)
        return 2
    try:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            runner.run(serve(settings, agent, admin))
    except OSError as exc:
        print(f"capgate-sidecar: error: cannot listen: {exc.strerror}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
