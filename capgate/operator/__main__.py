"""``capgate-operator`` / ``python -m capgate.operator``: run the kopf operator cluster-wide."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence

import kopf

from capgate.operator import admission, handlers
from capgate.operator.config import parse

__all__ = ["admission", "handlers", "main"]  # importing them registers their kopf handlers


class QuietTicks(logging.Filter):
    """Drop kopf's per-object "Timer 'on_tick' succeeded" line: one per capability every few seconds,
    it would be most of the log and a measurable share of an idle operator's CPU."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno <= logging.INFO and record.getMessage().startswith("Timer 'on_tick' succeeded"))


def main(argv: Sequence[str] | None = None) -> int:
    config = parse(argv)
    if config.kubeconfig:
        os.environ["KUBECONFIG"] = config.kubeconfig  # kopf's own login reads only the environment
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("kopf.objects").addFilter(QuietTicks())
    kopf.run(clusterwide=True, standalone=True, memo=kopf.Memo(capgate=handlers.Context(config=config)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
