from __future__ import annotations

import pytest

from capgate.capabilities import keys, tokens
from capgate.capabilities.spec import Capability

from . import _support


@pytest.fixture
def keyset() -> keys.KeySet:
    return _support.keyset()


@pytest.fixture
def booking() -> Capability:
    return _support.parse()


@pytest.fixture
def cred(booking: Capability) -> tokens.Credential:
    return _support.credential(booking)
