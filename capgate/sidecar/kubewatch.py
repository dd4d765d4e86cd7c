"""The RevocationList watch: how a sidecar in a pod hears revocations, lockdowns, and the heartbeat.

A :class:`~capgate.sidecar.watch.RevocationSource` over kubernetes_asyncio's watch: list the one
object (``fieldSelector=metadata.name=capgate``, which is all the pod's RBAC allows: get, list,
watch of that name), then watch from the list's resourceVersion with bookmarks; the library keeps
the resourceVersion current, and a ``410 Gone`` (our version was compacted away) means relist.

Every event, bookmark and cleanly ended watch is *contact*: each watch is opened with a server
timeout of a third of ``lockdownAfter``, so a healthy API server is heard from at least three times
per lockdown window even when nothing changes, and an unreachable one lets the state age into
lockdown. A deleted RevocationList clears nothing: the last known revocations stay in force.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta
from typing import Any

import aiohttp
from kubernetes_asyncio import client, config, watch
from kubernetes_asyncio.client.exceptions import ApiException

from capgate import resources
from capgate.sidecar.watch import RevocationState

log = logging.getLogger("capgate.sidecar.kubewatch")

RETRY_DELAY = 1.0
MIN_WATCH_SECONDS = 1
REQUEST_TIMEOUT = 10.0


class KubeSource:
    """Feeds a :class:`RevocationState` from the cluster's RevocationList until cancelled."""

    def __init__(self, kubeconfig: str | None, lockdown_after: timedelta,
                 name: str = resources.REVOCATION_LIST_NAME) -> None:
        self.kubeconfig = kubeconfig
        self.name = name
        self.watch_seconds = max(MIN_WATCH_SECONDS, int(lockdown_after.total_seconds() / 3))

    async def _client(self) -> client.ApiClient:
        if self.kubeconfig:
            await config.load_kube_config(config_file=self.kubeconfig)
        else:
            config.load_incluster_config()  # type: ignore[no-untyped-call]
        return client.ApiClient()

    async def run(self, state: RevocationState) -> None:
        state.has_source = True  # from here on, silence ages into lockdown
        while True:
            try:
                api = await self._client()
                break
            except (config.ConfigException, OSError) as exc:
                log.error("no Kubernetes API access for the RevocationList watch (%s); locking down after "
                          "lockdownAfter and retrying", exc)
                await asyncio.sleep(RETRY_DELAY * 5)
        try:
            custom = client.CustomObjectsApi(api)
            while True:
                try:
                    version = await self._list(custom, state)
                    await self._watch(custom, state, version)
                except ApiException as exc:
                    if exc.status != 410:
                        log.warning("RevocationList watch refused: %s %s; retrying", exc.status, exc.reason)
                        await asyncio.sleep(RETRY_DELAY)
                except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                    log.warning("API server unreachable (%s); revocations age towards lockdown", type(exc).__name__)
                    await asyncio.sleep(RETRY_DELAY)
                except ValueError as exc:
                    log.warning("malformed RevocationList ignored, keeping the previous state: %s", exc)
                    await asyncio.sleep(RETRY_DELAY)
        finally:
            await api.close()

    def _args(self) -> tuple[str, str, str]:
        return resources.GROUP, resources.VERSION, resources.REVOCATION_PLURAL

    async def _list(self, custom: client.CustomObjectsApi, state: RevocationState) -> str:
        listing: dict[str, Any] = await custom.list_cluster_custom_object(
            *self._args(), field_selector=f"metadata.name={self.name}", _request_timeout=REQUEST_TIMEOUT)
        items = listing.get("items") or []
        if items:
            state.apply(items[0].get("spec") or {})
        else:
            state.contact()  # no list yet: nothing revoked, and the API server answered
        return str(listing["metadata"]["resourceVersion"])

    async def _watch(self, custom: client.CustomObjectsApi, state: RevocationState, version: str) -> None:
        """Watch until a 410 (raised for relisting) or an error; each clean end re-watches from where it was."""
        stream = watch.Watch()
        resume = version
        try:
            while True:
                async for event in stream.stream(
                        custom.list_cluster_custom_object, *self._args(), field_selector=f"metadata.name={self.name}",
                        resource_version=resume, allow_watch_bookmarks=True, timeout_seconds=self.watch_seconds,
                        _request_timeout=self.watch_seconds + REQUEST_TIMEOUT):
                    self._handle(event, state)
                state.contact()  # the server closed the watch on schedule: it is alive
                resume = stream.resource_version or resume
        finally:
            await stream.close()

    @staticmethod
    def _handle(event: dict[str, Any], state: RevocationState) -> None:
        kind = event.get("type")
        raw = event.get("raw_object") or {}
        if kind in ("ADDED", "MODIFIED"):
            state.apply(raw.get("spec") or {})
        else:
            state.contact()  # BOOKMARK, or DELETED (the last known revocations stay in force)
