"""What a (hostile) agent does inside its container, run by ``kubectl exec ... python -c``.

``argv[1]`` is a JSON list of calls; the answer is a JSON list, one result per call:

- ``{"http": URL, "method", "json", "headers", "proxy": bool}``: urllib, through ``HTTP_PROXY`` unless
  ``proxy`` is false (an agent that ignores it); ``$VARS`` in the URL are expanded from the env.
  -> ``{"status", "body", "headers"}`` or ``{"error"}`` when no HTTP answer came back.
- ``{"tcp": [HOST, PORT], "send": TEXT}``: a raw socket. -> ``{"received"}`` or ``{"error"}``.
- ``{"udp": [HOST, PORT], "send": TEXT}``: one datagram. -> ``{"sent": true}`` or ``{"error"}``.
- ``{"until_refused": URL, "seconds": N}``: call URL in a loop; prints ``ready`` after the first answer,
  then stops at the first 401 -> ``{"refused_at": time.time()}`` (the revocation clock).
- ``{"until_rotated": URL, "whoami": URL, "seconds": N}``: call URL (and whoami) until the credential id
  whoami reports has changed, and 10 calls more -> ``{"calls": [{"at", "credential", "status", "receipt"}]}``.
- ``{"watch": [HTTP CALLS], "seconds": N}``: prints ``ready``, then makes the calls over and over for N s
  -> ``{"outcomes": [{"at", "status", "decided", "error"}]}`` (``decided``: the sidecar's decision id came back).
- ``{"receipts": [SEARCH URL, BOOK URL], "keys": K, "seconds": N}``: GET search and POST book (a rule that
  requires search's receipt) over and over, until the receipts have been signed by K session keys and 5
  rounds more, or N s. It is an agent container's own command (a Deployment's, from the start of the
  pod), not a ``kubectl exec``: each call is printed at once as ``{"call": {"at", "step", "status",
  "reason", "key", "credential", "sign_until"}}`` (the session key id and credential the receipt names,
  and the end of the key's endorsement), then ``{"done": true}``, and the process idles (the test reads
  ``kubectl logs``).
- ``{"memory": URL, "bodies": N, "kib": K, "amount": A, "seconds": S}``: N threads POST JSON bodies of K KiB that are
  large once parsed, over and over for S s or until one gets no answer
  -> ``{"answers": {status: count}, "stopped": {"at", "error"} or None}``.
"""

from __future__ import annotations

import base64
import collections
import json
import os
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from http.client import HTTPException
from typing import Any


def http(call: dict[str, Any]) -> dict[str, Any]:
    handlers = [] if call.get("proxy", True) else [urllib.request.ProxyHandler({})]
    opener = urllib.request.build_opener(*handlers)
    data = json.dumps(call["json"]).encode() if "json" in call else None
    headers = {"Content-Type": "application/json", "Authorization": "Bearer agent-made-this-up",
               **call.get("headers", {})}
    request = urllib.request.Request(os.path.expandvars(call["http"]), data=data, headers=headers,
                                     method=call.get("method", "GET"))
    try:
        with opener.open(request, timeout=call.get("timeout", 10)) as response:
            status, body, answer = response.status, response.read(), response.headers
    except urllib.error.HTTPError as error:
        status, body, answer = error.code, error.read(), error.headers
    except (OSError, HTTPException) as error:  # no HTTP answer (refused, reset, cut short)
        return {"error": f"{type(error).__name__}: {error}"}
    try:
        parsed = json.loads(body or b"{}")
    except ValueError:
        parsed = {"raw": body.decode(errors="replace")[:200]}
    return {"status": status, "body": parsed, "headers": {k.lower(): v for k, v in answer.items()}}


def tcp(call: dict[str, Any]) -> dict[str, Any]:
    host, port = call["tcp"]
    try:
        with socket.create_connection((host, port), timeout=5) as sock:
            sock.settimeout(3)
            sock.sendall(call.get("send", "HELLO\n").encode())
            return {"received": sock.recv(4096).decode(errors="replace")}
    except OSError as error:
        return {"error": f"{type(error).__name__}: {error}"}


def udp(call: dict[str, Any]) -> dict[str, Any]:
    host, port = call["udp"]
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.sendto(call.get("send", "HELLO").encode(), (host, port))
            return {"sent": True}
    except OSError as error:
        return {"error": f"{type(error).__name__}: {error}"}


def until_refused(call: dict[str, Any]) -> dict[str, Any]:
    deadline = time.monotonic() + call.get("seconds", 30)
    ready = False
    while time.monotonic() < deadline:
        result = http({"http": call["until_refused"], "timeout": 2})
        if not ready and "status" in result:
            print("ready", flush=True)
            ready = True
        if result.get("status") == 401:
            return {"refused_at": time.time(), "body": result["body"]}
        time.sleep(0.005)
    return {"error": "never refused"}


def watch(call: dict[str, Any]) -> dict[str, Any]:
    deadline = time.monotonic() + call["seconds"]
    outcomes = []
    print("ready", flush=True)
    while time.monotonic() < deadline:
        for inner in call["watch"]:
            result = http({**inner, "timeout": 1})
            outcomes.append({"at": time.time(), "status": result.get("status"),
                             "decided": "x-capgate-decision-id" in result.get("headers", {}),
                             "error": result.get("error", "")[:80]})
        time.sleep(0.02)
    return {"outcomes": outcomes}


def until_rotated(call: dict[str, Any]) -> dict[str, Any]:
    deadline = time.monotonic() + call["seconds"]
    calls: list[dict[str, Any]] = []
    seen: list[str] = []
    after = 0
    while time.monotonic() < deadline and after < 10:
        who = http({"http": call["whoami"], "timeout": 2})
        credential = (who.get("body") or {}).get("credential", {}).get("id")
        if credential and credential not in seen:
            seen.append(credential)
        result = http({"http": call["until_rotated"], "timeout": 2})
        calls.append({"at": time.time(), "credential": credential, "status": result.get("status"),
                      "receipt": "x-capgate-receipt" in result.get("headers", {}), "error": result.get("error")})
        after += len(seen) > 1
        time.sleep(0.2)
    return {"calls": calls}


def _part(text: str) -> dict[str, Any]:
    return dict(json.loads(base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))))


def receipt_keys(call: dict[str, Any]) -> dict[str, Any]:
    search, book = call["receipts"]
    deadline = time.monotonic() + call["seconds"]
    calls: list[dict[str, Any]] = []
    keys: list[str] = []
    after = 0
    while time.monotonic() < deadline and after < 5:
        for step, url, method in (("search", search, "GET"), ("book", book, "POST")):
            result = http({"http": url, "method": method, "json": {}, "timeout": 5})
            receipt = result.get("headers", {}).get("x-capgate-receipt", "")
            parts = receipt.split(".")
            key, sign_until, credential = None, None, None
            if len(parts) == 5:  # v1.<payload>.<signature>.<endorsement>.<endorsement signature>
                payload = _part(parts[1])
                key, credential, sign_until = payload.get("sid"), payload.get("cred"), _part(parts[3]).get("signUntil")
                if key not in keys:
                    keys.append(key)
            record = {"at": time.time(), "step": step, "status": result.get("status"),
                      "reason": (result.get("body") or {}).get("reason"), "key": key, "credential": credential,
                      "sign_until": sign_until, "error": result.get("error")}
            calls.append(record)
            print(json.dumps({"call": record}), flush=True)
        after += len(keys) >= call["keys"]
        time.sleep(0.5)
    print(json.dumps({"done": True}), flush=True)
    while True:  # a Deployment's container: exiting would restart it and call again
        time.sleep(3600)


def memory(call: dict[str, Any]) -> dict[str, Any]:
    """Bodies small on the wire and large once parsed (``"k0000001": {}, `` is 16 bytes, a string and a dict
    in the sidecar's JSON reader: about 10 times that). Stops at the first call that got no answer (the
    timeout is long enough that only a dead sidecar gives none)."""
    deadline = time.monotonic() + call["seconds"]
    answers: collections.Counter[str] = collections.Counter()
    lock = threading.Lock()
    stopped: list[dict[str, Any]] = []
    body: dict[str, Any] = {f"k{i:07d}": {} for i in range(call["kib"] * 1024 // 16)}
    body["amount"] = call.get("amount", 100)

    def post() -> None:
        while time.monotonic() < deadline and not stopped:
            result = http({"http": call["memory"], "method": "POST", "json": body, "timeout": 60})
            with lock:
                answers[str(result.get("status", "no answer"))] += 1
                if "status" not in result and not stopped:
                    stopped.append({"at": time.time(), "error": result["error"][:120]})

    threads = [threading.Thread(target=post) for _ in range(call["bodies"])]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {"answers": dict(answers), "stopped": stopped[0] if stopped else None}


CALLS = {"http": http, "tcp": tcp, "udp": udp, "until_refused": until_refused, "watch": watch,
         "until_rotated": until_rotated, "receipts": receipt_keys, "memory": memory}


def main() -> None:
    results = []
    for call in json.loads(sys.argv[1]):
        (kind,) = (k for k in CALLS if k in call)
        results.append(CALLS[kind](call))
    print(json.dumps(results), flush=True)


if __name__ == "__main__":
    main()
