"""``status.usage`` (the Budget column of ``kubectl get acap``) from the watched AgentCapabilityUsage."""

from __future__ import annotations

import time
from typing import Any

import kopf

from capgate.operator import handlers
from capgate.operator.config import OperatorConfig
from tests.capabilities import _support


def _memo() -> kopf.Memo:
    return kopf.Memo(capgate=handlers.Context(config=OperatorConfig()))


def _body() -> kopf.Body:
    return kopf.Body({"apiVersion": "capgate.dev/v1alpha1", "kind": "AgentCapability",
                      "metadata": {"name": "booking-agent", "namespace": "travel", "generation": 1},
                      "spec": _support.manifest()["spec"]})


def _event(spent: int, kind: str = "MODIFIED") -> Any:
    today = int(time.time()) // 86400 * 86400
    return {"type": kind, "object": {"metadata": {"name": "booking-agent", "namespace": "travel"},
                                     "status": {"windows": {"budget/payments/amount/86400s":
                                                            {"start": today, "spent": spent}}}}}


async def test_the_watched_spending_becomes_the_capability_status_and_its_printer_column() -> None:
    memo = _memo()
    await handlers.on_usage_event(event=_event(1200), memo=memo)
    patch = kopf.Patch()
    handlers._report_usage(handlers.context(memo), _body(), kopf.Status({}), patch, memo)
    usage = patch.status["usage"]
    assert usage["summary"] == "requests 0/600, payments.amount 1200/100000"
    assert usage["meters"][1]["remaining"] == 100000 - 1200


async def test_an_unchanged_summary_is_not_written_again() -> None:
    memo = _memo()
    await handlers.on_usage_event(event=_event(5), memo=memo)
    first = kopf.Patch()
    handlers._report_usage(handlers.context(memo), _body(), kopf.Status({}), first, memo)
    again = kopf.Patch()
    shown = kopf.Status({"status": {"usage": first.status["usage"]}})
    handlers._report_usage(handlers.context(memo), _body(), shown, again, memo)
    assert "usage" not in again.status


async def test_no_usage_object_seen_means_no_status_written() -> None:
    memo = _memo()
    await handlers.on_usage_event(event=_event(5), memo=memo)
    await handlers.on_usage_event(event=_event(5, "DELETED"), memo=memo)
    patch = kopf.Patch()
    handlers._report_usage(handlers.context(memo), _body(), kopf.Status({}), patch, memo)
    assert "usage" not in patch.status
