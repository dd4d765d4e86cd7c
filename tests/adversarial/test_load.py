"""Many concurrent connections through one sidecar (each part its own process), CI-sized.

``bench/adversarial.py`` runs the full budget (1,000 connections for 60 s) and prints the numbers.
"""

from __future__ import annotations

from tests.adversarial.load import run_load


def test_two_hundred_concurrent_agents_get_only_policy_answers_and_memory_stays_bounded() -> None:
    result = run_load(connections=200, seconds=5)
    assert result.errors == 0, result.error_samples
    assert result.allowed > 0 and result.refused > 0  # both answers, under load
    assert result.rss_after_mb - result.rss_before_mb < 50, result
