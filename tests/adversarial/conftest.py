"""The sidecar fixtures of tests/sidecar (a real sidecar app in front of a real loopback upstream)."""

from tests.sidecar.conftest import keyset, root_key, sidecar, upstream

__all__ = ["keyset", "root_key", "sidecar", "upstream"]
