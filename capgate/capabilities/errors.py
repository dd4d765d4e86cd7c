"""The errors of the capability core, one tree for the whole boundary.

Adapters (the sidecar's outermost middleware, the operator's handlers, the CLI) map these to
outcomes in exactly one place each, so every class carries the machine-readable ``code`` and
``reason`` that DESIGN.md's error JSON uses::

    CapabilityError                 base; never raised itself
    ├── SpecError                   an AgentCapability that cannot be compiled (names the field path)
    ├── KeyFileError                a root key or trust bundle that cannot be loaded
    ├── TokenError                  401 invalid_token: malformed, bad_signature, unknown_root,
    │                               expired, not_yet_valid, revoked, too_deep, identity
    ├── ReceiptError                a carried receipt that must be ignored: malformed, bad_signature,
    │                               unknown_key, unendorsed, expired, wrong_correlation,
    │                               wrong_credential
    ├── RequestError                400 bad_request: an ambiguous path, an unreadable body
    │   └── BodyError               (bodies.py) a body or query a limit cannot read unambiguously
    └── AttenuationError            a narrowing that would widen, or is not allowed by the capability

None of these messages ever contains a token, a key or a secret value: they name fields, rule
names and revocation ids only.
"""

from __future__ import annotations

from typing import Literal

TokenReason = Literal[
    "malformed", "bad_signature", "unknown_root", "expired", "not_yet_valid", "revoked", "too_deep", "identity"
]
ReceiptReason = Literal[
    "malformed", "bad_signature", "unknown_key", "unendorsed", "expired", "wrong_correlation", "wrong_credential"
]


class CapabilityError(Exception):
    """Base of every error the capability core raises."""


class SpecError(CapabilityError):
    """An AgentCapability spec is invalid; ``path`` is the offending field, e.g. ``spec.rules[2].paths[0]``."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path
        self.message = message


class KeyFileError(CapabilityError):
    """A root key set, trust bundle or session key could not be read."""


class TokenError(CapabilityError):
    """A credential failed verification; maps to 401 ``invalid_token``."""

    code = "invalid_token"

    def __init__(self, reason: TokenReason, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason: TokenReason = reason
        self.detail = detail


class ReceiptError(CapabilityError):
    """A receipt failed verification; the request is decided as if it had not been carried."""

    def __init__(self, reason: ReceiptReason, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason: ReceiptReason = reason
        self.detail = detail


class RequestError(CapabilityError):
    """The request itself is ambiguous or unreadable; maps to 400 ``bad_request``."""

    code = "bad_request"


class AttenuationError(CapabilityError):
    """A narrowing request asks for more than the parent grants, or the capability forbids it."""
