"""Sidecar settings: flags, ``CAPGATE_*`` environment variables and a config file, merged once.

Precedence is CLI > environment > config file > defaults, decided *per setting* (a repeatable
setting such as ``--upstream-url`` is taken whole from the highest source that sets it, never merged
across sources, so what you see in one place is what runs). Every problem raises
:class:`ConfigError` naming the setting the way the user wrote it (``--listen``), and
``__main__`` turns that into exit code 2 without a traceback: a sidecar that guessed at a bad
setting would be a sidecar that fails open.

Config-file keys are the flag names without dashes (``listen``, ``upstream-url`` or
``upstream_url``); repeatable settings take a mapping (``{flights: http://...}``) or a list of
``NAME=VALUE`` strings. Environment variables hold repeatable settings comma-separated
(``CAPGATE_UPSTREAM_URL=flights=http://a,payments=http://b``).
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml

from capgate.capabilities import spec

ENV_PREFIX = "CAPGATE_"
LOG_LEVELS = ("debug", "info", "warning", "error")
MiB = 1024 * 1024


class ConfigError(Exception):
    """A setting that cannot be used; ``setting`` is its flag name (``--listen``)."""

    def __init__(self, setting: str, message: str) -> None:
        super().__init__(f"{setting}: {message}")
        self.setting = setting
        self.message = message


@dataclass(frozen=True)
class SecretRef:
    """Where an upstream credential value comes from: ``env:VAR`` or ``file:PATH`` (never the value)."""

    kind: Literal["env", "file"]
    where: str


@dataclass(frozen=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Settings:
    """Everything the sidecar is configured with; built once, never mutated."""

    capability: Path | None = None
    root_key: Path | None = None
    credential_dir: Path | None = None
    listen: Address = Address("127.0.0.1", 15080)
    admin_listen: Address = Address("127.0.0.1", 15090)
    upstream_urls: Mapping[str, str] = field(default_factory=dict)
    upstream_credentials: Mapping[str, SecretRef] = field(default_factory=dict)
    upstream_credentials_dir: Path | None = None
    namespace: str | None = None
    service_account: str | None = None
    audit_log: str = "-"
    revocations: Path | None = None
    log_level: str = "info"
    connect_timeout: float = 5.0
    read_timeout: float = 30.0
    total_timeout: float = 300.0
    max_body_bytes: int = MiB
    """Largest JSON body read for limits; 1 MiB covers any payment or tool-call payload we front."""
    max_correlations: int = 4096
    """Held receipts are kept for at most this many correlations (LRU): bounds memory per pod."""
    header_timeout: float = 10.0
    """Seconds a client has to send a complete request head (slowloris)."""
    body_timeout: float = 10.0
    """Seconds a body the sidecar must inspect has to arrive in whole."""
    max_inflight_bytes: int = 16 * MiB
    """Request heads and inspected bodies held at once across all agent connections; a 128 MiB pod
    idles at ~55 MiB, and Python holds a read body about twice while parsing it."""
    max_connections: int = 2048
    """Open agent connections; beyond it the one waiting longest for a head is closed."""
    checkpoint_every: int = 1000
    checkpoint_seconds: float = 10.0
    poll_seconds: float = 1.0
    outbound_listen: Address | None = None
    """The outbound listener for connections capgate-init redirects (``egress``); off when None."""
    ca_dir: Path | None = None
    """Where the pod CA's certificate is published for the agent containers (an emptyDir in a pod)."""

    @property
    def standalone(self) -> bool:
        return self.credential_dir is None

    @property
    def log_level_number(self) -> int:
        return int(getattr(logging, self.log_level.upper()))


@dataclass(frozen=True)
class _Option:
    name: str
    """Flag name without dashes, e.g. ``upstream-url``."""
    parse: Callable[[str, Any], Any]
    repeatable: bool = False
    help: str = ""

    @property
    def flag(self) -> str:
        return f"--{self.name}"

    @property
    def attr(self) -> str:
        return self.name.replace("-", "_")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.replace("-", "_").upper()


def _text(setting: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(setting, "must be a non-empty string")
    return value.strip()


def _path(setting: str, value: Any) -> Path:
    return Path(_text(setting, value))


def _existing_file(setting: str, value: Any) -> Path:
    path = _path(setting, value)
    if not path.is_file():
        raise ConfigError(setting, f"{path} is not a readable file")
    return path


def _existing_dir(setting: str, value: Any) -> Path:
    path = _path(setting, value)
    if not path.is_dir():
        raise ConfigError(setting, f"{path} is not a directory")
    return path


def _address(setting: str, value: Any) -> Address:
    text = _text(setting, value)
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(setting, f"{text!r} is not HOST:PORT")
    return Address(host.strip("[]"), int(port))


def _positive(kind: type[int] | type[float]) -> Callable[[str, Any], Any]:
    def parse(setting: str, value: Any) -> Any:
        try:
            number = kind(value)
        except (TypeError, ValueError) as exc:
            raise ConfigError(setting, f"{value!r} is not a {kind.__name__}") from exc
        if isinstance(value, bool) or not number > 0:
            raise ConfigError(setting, "must be positive")
        return number
    return parse


def _choice(choices: Sequence[str]) -> Callable[[str, Any], str]:
    def parse(setting: str, value: Any) -> str:
        text = _text(setting, value).lower()
        if text not in choices:
            raise ConfigError(setting, f"{text!r} is not one of {', '.join(choices)}")
        return text
    return parse


def _dns_label(setting: str, value: Any) -> str:
    text = _text(setting, value)
    if not spec.DNS_LABEL.match(text) or len(text) > 63:
        raise ConfigError(setting, f"{text!r} is not a DNS label")
    return text


def _service_account(setting: str, value: Any) -> str:
    text = _text(setting, value)
    if not spec.DNS_SUBDOMAIN.match(text) or len(text) > 253:
        raise ConfigError(setting, f"{text!r} is not a ServiceAccount name")
    return text


def _pairs(setting: str, value: Any) -> dict[str, str]:
    """``NAME=VALUE`` items from a mapping, a list, or a comma-separated string."""
    if isinstance(value, Mapping):
        items = [(str(k), v) for k, v in value.items()]
    else:
        raw = value.split(",") if isinstance(value, str) else value
        if not isinstance(raw, list):
            raise ConfigError(setting, "must be NAME=VALUE items")
        items = []
        for item in raw:
            name, sep, rest = _text(setting, item).partition("=")
            if not sep:
                raise ConfigError(setting, f"{item!r} is not NAME=VALUE")
            items.append((name.strip(), rest.strip()))
    out: dict[str, str] = {}
    for name, item_value in items:
        if not spec.DNS_LABEL.match(name):
            raise ConfigError(setting, f"{name!r} is not an upstream name")
        if name in out:
            raise ConfigError(setting, f"upstream {name!r} given twice")
        out[name] = _text(setting, item_value)
    return out


def _upstream_urls(setting: str, value: Any) -> dict[str, str]:
    urls = _pairs(setting, value)
    for name, url in urls.items():
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.username:
            raise ConfigError(setting, f"{name}: {url!r} is not an http(s) URL without query or credentials")
        urls[name] = url.rstrip("/")
    return urls


def _secret_refs(setting: str, value: Any) -> dict[str, SecretRef]:
    out: dict[str, SecretRef] = {}
    for name, ref in _pairs(setting, value).items():
        kind, sep, where = ref.partition(":")
        if not sep or kind not in ("env", "file") or not where:
            # Never echo the value: someone may have pasted the secret itself here.
            raise ConfigError(setting, f"{name}: must be env:VARIABLE or file:PATH")
        out[name] = SecretRef("env" if kind == "env" else "file", where)
    return out


OPTIONS: tuple[_Option, ...] = (
    _Option("capability", _existing_file, help="AgentCapability manifest (standalone mode)"),
    _Option("root-key", _existing_file, help="root key set file (standalone mode)"),
    _Option("credential-dir", _existing_dir, help="mounted credential Secret (pod mode)"),
    _Option("listen", _address, help="agent port, HOST:PORT (default 127.0.0.1:15080)"),
    _Option("admin-listen", _address, help="metrics/health port, HOST:PORT (default 127.0.0.1:15090)"),
    _Option("upstream-url", _upstream_urls, repeatable=True, help="NAME=URL, overrides the capability's URL"),
    _Option("upstream-credential", _secret_refs, repeatable=True, help="NAME=env:VAR or NAME=file:PATH"),
    _Option("upstream-credentials-dir", _existing_dir, help="directory with one file per upstream name"),
    _Option("namespace", _dns_label, help="identity namespace (default: the capability's)"),
    _Option("service-account", _service_account, help="identity ServiceAccount (default: the capability's)"),
    _Option("audit-log", _text, help="audit ledger path, '-' for stdout (default)"),
    _Option("revocations", _path, help="local RevocationList JSON file, polled (standalone)"),
    _Option("log-level", _choice(LOG_LEVELS), help="debug, info, warning, error"),
    _Option("connect-timeout", _positive(float), help="seconds to connect upstream (default 5)"),
    _Option("read-timeout", _positive(float), help="seconds between upstream reads (default 30)"),
    _Option("total-timeout", _positive(float), help="seconds for a whole upstream call (default 300)"),
    _Option("max-body-bytes", _positive(int), help="largest body read for limits (default 1 MiB)"),
    _Option("max-correlations", _positive(int), help="correlations whose receipts are held (default 4096)"),
    _Option("header-timeout", _positive(float), help="seconds for a client to send a request head (default 10)"),
    _Option("body-timeout", _positive(float), help="seconds for a body the sidecar inspects to arrive (default 10)"),
    _Option("max-inflight-bytes", _positive(int),
            help="request bytes held at once across agent connections (default 16 MiB)"),
    _Option("max-connections", _positive(int), help="open agent connections (default 2048)"),
    _Option("checkpoint-every", _positive(int), help="audit records between signed checkpoints"),
    _Option("checkpoint-seconds", _positive(float), help="seconds between signed checkpoints"),
    _Option("poll-seconds", _positive(float), help="how often credential and revocation files are polled"),
    _Option("outbound-listen", _address, help="listener for redirected egress, HOST:PORT (pods: 127.0.0.1:15001)"),
    _Option("ca-dir", _existing_dir, help="directory the pod CA certificate (ca.crt) is written to"),
)
_RENAMES = {"upstream_url": "upstream_urls", "upstream_credential": "upstream_credentials"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="capgate-sidecar",
        description="capgate enforcement proxy: verifies the pod's capability on every outgoing call.",
        epilog="Every flag also reads CAPGATE_<FLAG> (e.g. CAPGATE_LISTEN) and a --config file key; "
               "precedence CLI > env > file > defaults.",
    )
    parser.add_argument("--config", default=None, help="YAML or JSON file of settings")
    for option in OPTIONS:
        if option.repeatable:
            parser.add_argument(option.flag, action="append", default=None, help=option.help)
        else:
            parser.add_argument(option.flag, default=None, help=option.help)
    return parser


def _read_config_file(path_text: str) -> dict[str, Any]:
    path = Path(path_text)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError("--config", f"cannot read {path}: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError("--config", f"{path} is not valid YAML/JSON") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("--config", f"{path} must hold a mapping of settings")
    known = {o.name for o in OPTIONS}
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = str(key).replace("_", "-")
        if name not in known:
            raise ConfigError("--config", f"unknown setting {key!r} in {path}")
        out[name] = value
    return out


def load(argv: Sequence[str] | None, env: Mapping[str, str]) -> Settings:
    """Parse ``argv`` (without the program name) and ``env`` into :class:`Settings`."""
    args = build_parser().parse_args(argv)
    config_path = args.config or env.get(ENV_PREFIX + "CONFIG")
    from_file = _read_config_file(config_path) if config_path else {}
    values: dict[str, Any] = {}
    for option in OPTIONS:
        cli = getattr(args, option.attr)
        if cli is not None:
            raw: Any = cli
            source = option.flag
        elif option.env in env:
            raw, source = env[option.env], option.env
        elif option.name in from_file:
            raw, source = from_file[option.name], f"{option.name} (in {config_path})"
        else:
            continue
        values[_RENAMES.get(option.attr, option.attr)] = option.parse(source, raw)
    settings = Settings(**values)
    _check_mode(settings)
    return settings


def _check_mode(settings: Settings) -> None:
    """Exactly one way of getting a credential: standalone (capability + root key) or a pod's directory."""
    if settings.credential_dir is not None:
        if settings.capability is not None or settings.root_key is not None:
            raise ConfigError("--credential-dir", "cannot be combined with --capability/--root-key")
        return
    if settings.capability is None:
        raise ConfigError("--capability", "is required (or --credential-dir in a pod)")
    if settings.root_key is None:
        raise ConfigError("--root-key", "is required with --capability")


def describe(settings: Settings) -> dict[str, Any]:
    """Settings as JSON-safe values for a startup log line: sources of secrets, never their values."""
    out: dict[str, Any] = {}
    for key, value in vars(settings).items():
        if isinstance(value, Mapping):
            value = {k: (f"{v.kind}:{v.where}" if isinstance(v, SecretRef) else v) for k, v in value.items()}
        elif isinstance(value, Path | Address):
            value = str(value)
        out[key] = value
    return json.loads(json.dumps(out, default=str))  # type: ignore[no-any-return]
