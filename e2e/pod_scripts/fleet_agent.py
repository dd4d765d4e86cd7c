"""What an agent hammering a fleet-wide budget does inside its container (``kubectl exec ... python -c``).

``argv[1]`` is a JSON list of steps; the answer, printed last, is a JSON list with one result per step:

- ``{"hammer": URL, "field": F, "marker": M, "threads": N, "low": A, "high": B, "seed": S, "seconds": T,
  "at": START}``: prints ``ready`` and sleeps until Unix time START (pods share the node's clock), then
  N threads each POST ``{F: amount, "marker": M}`` to URL with amounts drawn from [A, B], until the first
  answer ``429 budget_exhausted`` that is not ``usage_unavailable``, retrying calls that got no answer.
  Then one thread calls with amount B until that is refused too, so the sidecar ends refusing the
  largest call. -> ``{"calls": [[at, amount, status, reason], ...]}`` (``status`` null: no HTTP answer).
- ``{"metrics": URL}``: the sidecar's ``capgate_usage_*`` samples -> ``{"samples": {name{labels}: value}}``.
- ``{"at": T, "parallel": [HTTP CALLS]}``: prints ``ready``, sleeps until Unix time T, then makes the
  calls at once -> ``{"results": [{"status", "body", "headers"}]}``.
- ``{"until": HTTP CALL, "reason": R, "seconds": T}``: makes the call until its answer's ``reason`` is R
  -> the last result, with ``tries``.
- ``{"http": URL, "method", "json", "headers"}``: one call -> ``{"status", "body", "headers"}`` or ``{"error"}``.

``$VARS`` in URLs are expanded from the agent's environment (``CAPGATE_UPSTREAM_PAYMENTS_URL``).
"""

from __future__ import annotations

import json
import os
import random
import sys
import threading
import time
import urllib.error
import urllib.request
from http.client import HTTPException
from typing import Any

OPENER = urllib.request.build_opener()  # through HTTP_PROXY, as an unmodified client would


def http(call: dict[str, Any]) -> dict[str, Any]:
    data = json.dumps(call["json"]).encode() if "json" in call else None
    request = urllib.request.Request(os.path.expandvars(call["http"]), data=data, method=call.get("method", "GET"),
                                     headers={"Content-Type": "application/json", **call.get("headers", {})})
    opener = OPENER if call.get("proxy", True) else urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=call.get("timeout", 10)) as response:
            status, body, answer = response.status, response.read(), response.headers
    except urllib.error.HTTPError as error:
        status, body, answer = error.code, error.read(), error.headers
    except (OSError, HTTPException) as error:
        return {"error": f"{type(error).__name__}: {error}"}
    try:
        parsed = json.loads(body or b"{}")
    except ValueError:
        parsed = {"raw": body.decode(errors="replace")}
    return {"status": status, "body": parsed, "headers": {k.lower(): v for k, v in answer.items()}}


def _exhausted(result: dict[str, Any]) -> bool:
    body = result.get("body") or {}
    return (result.get("status") == 429 and body.get("error") == "budget_exhausted"
            and body.get("reason") != "usage_unavailable")


def hammer(step: dict[str, Any]) -> dict[str, Any]:
    if "at" in step:
        _wait(step["at"])
    deadline = time.monotonic() + step.get("seconds", 60)
    calls: list[list[Any]] = []
    lock = threading.Lock()

    def charge(amount: int) -> dict[str, Any]:
        while True:
            result = http({"http": step["hammer"], "method": "POST", "timeout": 5,
                           "json": {step["field"]: amount, "marker": step["marker"]}})
            with lock:
                calls.append([time.time(), amount, result.get("status"), (result.get("body") or {}).get("reason")])
            if "status" in result or time.monotonic() > deadline:
                return result
            time.sleep(0.05)  # no answer: the sidecar is down; the kubelet brings it back

    def worker(index: int) -> None:
        rng = random.Random(step.get("seed", 0) * 1000 + index)
        while time.monotonic() < deadline:
            if _exhausted(charge(rng.randint(step["low"], step["high"]))):
                return

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(step["threads"])]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    while time.monotonic() < deadline and not _exhausted(charge(step["high"])):
        pass
    return {"calls": calls}


def metrics(step: dict[str, Any]) -> dict[str, Any]:
    result = http({"http": step["metrics"], "proxy": False})
    text = (result.get("body") or {}).get("raw", "")
    samples = {}
    for line in text.splitlines():
        if line.startswith("capgate_usage_") or line.startswith("capgate_receipt"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return {"samples": samples, "status": result.get("status")}


def _wait(at: float) -> None:
    """Tell the caller this pod is ready, then start at ``at``, with the other pods (one node, one clock)."""
    print("ready", flush=True)
    time.sleep(max(0.0, at - time.time()))


def parallel(step: dict[str, Any]) -> dict[str, Any]:
    _wait(step["at"])
    results: list[dict[str, Any]] = [{} for _ in step["parallel"]]

    def one(index: int) -> None:
        results[index] = http(step["parallel"][index])

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(results))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {"results": results}


def until(step: dict[str, Any]) -> dict[str, Any]:
    deadline = time.monotonic() + step.get("seconds", 20)
    tries = 0
    while True:
        result = http(step["until"])
        tries += 1
        if (result.get("body") or {}).get("reason") == step["reason"] or time.monotonic() > deadline:
            return {**result, "tries": tries}
        time.sleep(0.1)


STEPS = {"hammer": hammer, "metrics": metrics, "parallel": parallel, "until": until, "http": http}


def main() -> None:
    results = []
    for step in json.loads(sys.argv[1]):
        (kind,) = (k for k in STEPS if k in step)
        results.append(STEPS[kind](step))
    print(json.dumps(results), flush=True)


if __name__ == "__main__":
    main()
