"""Prometheus metrics, on a per-app registry (no process-global state; tests run many apps).

Label values are closed sets or names from the capability (outcome, reason, upstream) — never
paths, tokens, correlation ids or anything the agent chooses freely, so cardinality stays bounded
and nothing secret can reach a scrape.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
"""Decisions take ~0.3 ms; upstream calls range to seconds — one bucket set covers both."""
UNKNOWN_UPSTREAM = "_unknown"


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.decisions = Counter("capgate_decisions", "Decisions by outcome, reason and upstream",
                                 ("outcome", "reason", "upstream"), registry=self.registry)
        self.decision_seconds = Histogram("capgate_decision_seconds", "Time to decide a request",
                                          buckets=LATENCY_BUCKETS, registry=self.registry)
        self.upstream_seconds = Histogram("capgate_upstream_seconds", "Upstream call time until response headers",
                                          ("upstream",), buckets=LATENCY_BUCKETS, registry=self.registry)
        self.receipts_minted = Counter("capgate_receipts_minted", "Receipts minted", registry=self.registry)
        self.mcp_definition_changed = Counter("capgate_mcp_definition_changed",
                                              "MCP tools hidden because their definition differs from its pin",
                                              ("upstream",), registry=self.registry)
        self.mcp_sessions_closed = Counter("capgate_mcp_sessions_closed",
                                           "MCP sessions capgate closed because their tokens can no longer act",
                                           ("reason",), registry=self.registry)
        self.lockdown = Gauge("capgate_lockdown", "1 while this sidecar is locked down", registry=self.registry)
        self.revocation_age = Gauge("capgate_revocation_list_age_seconds",
                                    "Seconds since the revocation source was last heard from (-1: no source)",
                                    registry=self.registry)
        self.credential_expiry = Gauge("capgate_credential_expiry_timestamp_seconds",
                                       "Unix time the base credential expires", registry=self.registry)
        self.connections_refused = Counter("capgate_connections_refused",
                                           "Connections closed outside a request (header_timeout, header_too_large, "
                                           "buffer_full, connection_limit), by listener",
                                           ("listener", "reason"), registry=self.registry)
        # Fleet-wide usage (capgate.sidecar.usage); the meter label is a key built from the capability.
        self.leases_taken = Counter("capgate_usage_leases", "Slices of a fleet-wide window leased by this sidecar",
                                    ("meter",), registry=self.registry)
        self.response_charged = Counter("capgate_usage_response_charged",
                                        "Units response budgets charged after calls (read from responses, or their "
                                        "worst case), by upstream.field", ("budget",), registry=self.registry)
        self.lease_remaining = Gauge("capgate_usage_lease_remaining", "Units left in this sidecar's current lease",
                                     ("meter",), registry=self.registry)
        self.usage_state_age = Gauge("capgate_usage_state_age_seconds",
                                     "Seconds since the shared usage state was last read or written (-1: never)",
                                     registry=self.registry)
        self.usage_refusals = Counter("capgate_usage_refusals", "Calls refused by rate limits or budgets, by reason",
                                      ("reason",), registry=self.registry)
        self.receipts_consumed = Counter("capgate_receipts_consumed",
                                         "Single-use receipts recorded as consumed before forwarding",
                                         registry=self.registry)
        self.receipt_refusals = Counter("capgate_receipt_consumption_refusals",
                                        "Consuming calls refused, by reason (receipt_consumed, usage_unavailable)",
                                        ("reason",), registry=self.registry)
        self.usage_state_age.set(-1)  # standalone: no shared state

        self._children: dict[tuple[str, str, str], Counter] = {}
        self._upstream_children: dict[str, Histogram] = {}

    def decision(self, outcome: str, reason: str, upstream: str | None) -> None:
        key = (outcome, reason, upstream or UNKNOWN_UPSTREAM)
        child = self._children.get(key)
        if child is None:  # labels() costs a lock and a tuple build per call; the set is small and closed
            child = self._children[key] = self.decisions.labels(*key)
        child.inc()

    def upstream_time(self, upstream: str, seconds: float) -> None:
        child = self._upstream_children.get(upstream)
        if child is None:
            child = self._upstream_children[upstream] = self.upstream_seconds.labels(upstream)
        child.observe(seconds)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
