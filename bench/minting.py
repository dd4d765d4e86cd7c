"""Minting at scale: apply 1,000 AgentCapabilities and wait until every one is Ready with its credential.

    python bench/minting.py            # 1,000 capabilities in 4 namespaces
    python bench/minting.py --quick    # 100

A private control plane (etcd + kube-apiserver) and the real operator (a local process). The
capabilities are created as fast as the client can (kubernetes_asyncio, a few dozen requests in
flight; every create also passes the operator's validating webhook), while a watch records when
each one first reports ``Ready=True`` for its generation (credential Secret written, status patched).
Rows, all from this run:

  * baseline: ``tokens.mint`` x N in-process (the cryptographic floor: compile + sign a Biscuit);
  * baseline: creating as many ConfigMaps with the same client (the API server's write floor);
  * the operator: first create → last Ready, and the creates alone; operator RSS and CPU.

Target (issue 5): 1,000 capabilities Ready in < 60 s.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import harness

TARGET_SECONDS = 60.0
CONCURRENCY = 32
NAMESPACES = ("bench-a", "bench-b", "bench-c", "bench-d")


def mint_baseline(count: int) -> float:
    from capgate.capabilities import keys, spec, tokens

    keyset = keys.KeySet.generate()
    caps = [spec.parse_capability(harness.capability(f"cap-{index}", NAMESPACES[index % 4]))
            for index in range(count)]
    tokens.mint(caps[0], keyset, ttl=timedelta(hours=1))
    started = time.perf_counter()
    for cap in caps:
        tokens.mint(cap, keyset, ttl=timedelta(hours=1))
    return time.perf_counter() - started


async def run(cluster: harness.Cluster, count: int) -> dict[str, Any]:
    from kubernetes_asyncio import client, config, watch

    configuration = client.Configuration()
    await config.load_kube_config(config_file=str(cluster.plane.kubeconfig), client_configuration=configuration)
    configuration.connection_pool_maxsize = CONCURRENCY
    result: dict[str, Any] = {}
    async with client.ApiClient(configuration) as api, client.ApiClient(configuration) as watch_api:
        core = client.CoreV1Api(api)
        custom = client.CustomObjectsApi(api)
        gate = asyncio.Semaphore(CONCURRENCY)

        async def bounded(coroutine: Any) -> None:
            async with gate:
                await coroutine

        # baseline: the same number of plain writes through the same client
        started = time.monotonic()
        await asyncio.gather(*(bounded(core.create_namespaced_config_map(
            NAMESPACES[index % 4], {"metadata": {"name": f"cm-{index}"}, "data": {"k": "v"}}))
            for index in range(count)))
        result["configmaps"] = time.monotonic() - started

        ready_at: dict[str, float] = {}
        listing = await client.CustomObjectsApi(watch_api).list_cluster_custom_object(
            "capgate.dev", "v1alpha1", "agentcapabilities")
        all_ready = asyncio.Event()

        async def observe() -> None:
            stream = watch.Watch()
            version = listing["metadata"]["resourceVersion"]
            while True:
                async for event in stream.stream(client.CustomObjectsApi(watch_api).list_cluster_custom_object,
                                                 "capgate.dev", "v1alpha1", "agentcapabilities",
                                                 resource_version=version, timeout_seconds=300):
                    obj = event["raw_object"]
                    key = f"{obj['metadata']['namespace']}/{obj['metadata']['name']}"
                    if key not in ready_at and harness.is_ready(obj):
                        ready_at[key] = time.monotonic()
                        if len(ready_at) == count:
                            all_ready.set()
                version = stream.resource_version or version

        watcher = asyncio.create_task(observe())
        pid = cluster.operator.process.pid if cluster.operator.process else 0
        result["rss_before"] = harness.rss_mb(pid)
        cpu_before = harness.cpu_seconds(pid)
        try:
            started = time.monotonic()
            await asyncio.gather(*(bounded(custom.create_namespaced_custom_object(
                "capgate.dev", "v1alpha1", NAMESPACES[index % 4], "agentcapabilities",
                harness.capability(f"cap-{index}", NAMESPACES[index % 4])))
                for index in range(count)))
            result["created"] = time.monotonic() - started
            peak = result["rss_before"]
            deadline = started + 600
            while not all_ready.is_set():
                peak = max(peak, harness.rss_mb(pid))
                if time.monotonic() > deadline or watcher.done():
                    if watcher.done():
                        watcher.result()
                    raise TimeoutError(f"only {len(ready_at)}/{count} Ready after 600 s")
                await asyncio.sleep(0.5)
            result["ready"] = max(ready_at.values()) - started
            result["ready_p50"] = harness.percentile([t - started for t in ready_at.values()], 50)
            result["cpu"] = harness.cpu_seconds(pid) - cpu_before
            result["rss_peak"] = max(peak, harness.rss_mb(pid))
            await asyncio.sleep(10)  # two timer intervals with 1,000 objects: the steady state
            result["rss_after"] = harness.rss_mb(pid)
            cpu_idle = harness.cpu_seconds(pid)
            await asyncio.sleep(10)
            result["idle_cpu"] = (harness.cpu_seconds(pid) - cpu_idle) / 10
        finally:
            watcher.cancel()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="100 capabilities instead of 1,000")
    parser.add_argument("--count", type=int, default=None)
    args = parser.parse_args()
    count = args.count or (100 if args.quick else 1000)

    minted = mint_baseline(count)
    with harness.cluster(NAMESPACES) as cluster:
        result = asyncio.run(run(cluster, count))

    rows = [
        (f"baseline: tokens.mint x {count}, in-process", f"{minted:.2f}", f"{count / minted:.0f}", "", ""),
        (f"baseline: create {count} ConfigMaps ({CONCURRENCY} in flight)", f"{result['configmaps']:.2f}",
         f"{count / result['configmaps']:.0f}", "", ""),
        (f"create {count} AgentCapabilities (validating webhook)", f"{result['created']:.2f}",
         f"{count / result['created']:.0f}", "", ""),
        (f"first create → all {count} Ready (credential Secret + status)", f"{result['ready']:.2f}",
         f"{count / result['ready']:.1f}", f"{result['rss_before']:.0f} → {result['rss_peak']:.0f}",
         f"{result['cpu']:.1f}"),
        ("  half of them Ready after", f"{result['ready_p50']:.2f}", "", "", ""),
    ]
    print(f"\nminting — {count} AgentCapabilities in {len(NAMESPACES)} namespaces, {harness.machine()}, "
          f"{datetime.now(UTC):%Y-%m-%d}\n")
    print(harness.table(("case", "seconds", "per second", "operator RSS MB", "operator CPU s"), rows))
    verdict = "meets" if result["ready"] < TARGET_SECONDS else "MISSES"
    print(f"\n{count} Ready in {result['ready']:.1f} s {verdict} the < {TARGET_SECONDS:.0f} s target "
          f"(scaled to 1,000: {result['ready'] * 1000 / count:.1f} s); operator afterwards: RSS "
          f"{result['rss_after']:.0f} MB, idle CPU {result['idle_cpu'] * 100:.0f}% of a core")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
