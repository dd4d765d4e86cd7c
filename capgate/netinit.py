"""``capgate-init``: program the pod's network namespace so the agent cannot go around the sidecar.

The injected init container runs this once, as root with only NET_ADMIN and NET_RAW, before the
sidecar and the agent start (the model is Istio's ``istio-init``; this is our own rule set):

* **nat OUTPUT** — every new TCP connection from any UID but the sidecar's is REDIRECTed to the
  sidecar's outbound listener (``--outbound-port``, 15001), except loopback connections to the
  sidecar's own ports and TCP DNS to the cluster resolver. The listener recovers the original
  destination with ``SO_ORIGINAL_DST`` and decides it like any other call.
* **filter OUTPUT** (IPv4) — what may leave a socket of a non-sidecar UID: packets to the sidecar's
  ports on 127.0.0.1 (this includes the redirected connections, which the filter table sees after
  NAT), DNS (UDP and TCP 53) to the resolver, replies of TCP connections *others* opened to the pod
  (kubelet probes, the agent's own Service) and ICMP errors about them. Everything else — UDP,
  ICMP echo, SCTP, raw IP — is dropped.
* **filter OUTPUT** (IPv6) — the same for replies; nothing else leaves but the sidecar's packets.
  IPv6 has no DNS or redirect exemption: the sidecar's listener is IPv4-only, so an IPv6 path would
  be a path around it.

The sidecar's UID passes everything: it must reach its upstreams and the Kubernetes API server.
That UID is the whole exemption, which is why the webhook refuses agent containers that could run
as it or change it (``capgate.injection``).

Each table is loaded with one ``iptables-restore --noflush`` call, so a table is programmed
atomically or not at all. Our chains (``CAPGATE_*``) are declared in the input, which empties them
first; the jump from ``OUTPUT`` is inserted only when it is not already there. Running twice
therefore leaves exactly one copy of every rule (idempotent, as an init container restarted by the
kubelet must be). Only the pure part — :func:`plan` — decides the rules; :func:`apply` runs the
binaries. No aiohttp, no Kubernetes client: this runs in a short-lived root container.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

SIDECAR_UID = 65532
OUTBOUND_PORT = 15001
SIDECAR_PORTS = (15080, 15090)
NAT_CHAIN = "CAPGATE_REDIRECT"
FILTER_CHAIN = "CAPGATE_EGRESS"
RESOLV_CONF = Path("/etc/resolv.conf")
DNS_PORT = 53


@dataclass(frozen=True)
class Options:
    proxy_uid: int = SIDECAR_UID
    outbound_port: int = OUTBOUND_PORT
    sidecar_ports: tuple[int, ...] = SIDECAR_PORTS
    resolvers: tuple[str, ...] = ()
    """IPv4 addresses DNS may go to; from resolv.conf unless given."""

    @property
    def local_ports(self) -> str:
        """The sidecar's loopback ports (agent port, admin port, outbound listener) as a multiport list."""
        return ",".join(str(p) for p in dict.fromkeys((*self.sidecar_ports, self.outbound_port)))


@dataclass(frozen=True)
class Table:
    """One ``iptables-restore`` input: the binary family, the table, and what to jump from OUTPUT."""

    family: str  # "ip" or "ip6"
    name: str
    chain: str
    rules: tuple[str, ...]

    def restore_input(self, jump_present: bool) -> str:
        lines = [f"*{self.name}", f":{self.chain} - [0:0]"]
        if not jump_present:
            lines.append(f"-I OUTPUT 1 -j {self.chain}")
        lines += [f"-A {self.chain} {rule}" for rule in self.rules]
        return "\n".join([*lines, "COMMIT", ""])


def resolvers_from(text: str) -> tuple[str, ...]:
    """The IPv4 ``nameserver`` addresses of a resolv.conf (IPv6 ones are useless: IPv6 is dropped)."""
    found: list[str] = []
    for line in text.splitlines():
        words = line.split("#", 1)[0].split()
        if len(words) >= 2 and words[0] == "nameserver":
            try:
                address = ipaddress.ip_address(words[1])
            except ValueError:
                continue
            if address.version == 4 and str(address) not in found:
                found.append(str(address))
    return tuple(found)


def plan(options: Options) -> tuple[Table, ...]:
    """The three tables (IPv4 nat, IPv4 filter, IPv6 filter), in the order they are applied.

    The nat table goes first: if the filter table then fails to load, redirected TCP still only
    reaches the sidecar; the reverse order would leave a window where nothing is redirected yet
    everything but the sidecar's ports is dropped — safe too, but harder to read in a failure.
    """
    uid = f"-m owner --uid-owner {options.proxy_uid} -j RETURN"
    local = f"-d 127.0.0.1/32 -p tcp -m multiport --dports {options.local_ports} -j RETURN"
    replies = "-p tcp -m conntrack --ctstate ESTABLISHED --ctdir REPLY -j RETURN"
    dns_tcp = [f"-d {r}/32 -p tcp --dport {DNS_PORT} -j RETURN" for r in options.resolvers]
    dns_udp = [f"-d {r}/32 -p udp --dport {DNS_PORT} -j RETURN" for r in options.resolvers]
    nat = Table("ip", "nat", NAT_CHAIN, (
        uid, local, *dns_tcp, f"-p tcp -j REDIRECT --to-ports {options.outbound_port}"))
    filter4 = Table("ip", "filter", FILTER_CHAIN, (
        uid, replies, "-p icmp -m conntrack --ctstate RELATED -j RETURN", local, *dns_udp, *dns_tcp, "-j DROP"))
    filter6 = Table("ip6", "filter", FILTER_CHAIN, (
        uid, replies, "-p ipv6-icmp -m conntrack --ctstate RELATED -j RETURN", "-j DROP"))
    return nat, filter4, filter6


Runner = Callable[[Sequence[str], str | None], subprocess.CompletedProcess[str]]


def _run(argv: Sequence[str], stdin: str | None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), input=stdin, capture_output=True, text=True, check=False)


def _binary(family: str, tool: str) -> str:
    return f"{family}tables{tool}"


def _jump_present(table: Table, run: Runner) -> bool:
    listed = run([_binary(table.family, ""), "-w", "-t", table.name, "-S", "OUTPUT"], None)
    if listed.returncode != 0:
        raise InitError(f"{_binary(table.family, '')} -t {table.name} -S OUTPUT failed: {listed.stderr.strip()}")
    return f"-A OUTPUT -j {table.chain}" in listed.stdout.splitlines()


class InitError(Exception):
    """The namespace could not be programmed; the init container exits non-zero and the pod does not start."""


def ipv6_present() -> bool:
    """Whether this network namespace has IPv6 at all (a kernel booted with ``ipv6.disable=1`` has not)."""
    return Path("/proc/sys/net/ipv6").is_dir()


def apply(tables: Sequence[Table], run: Runner = _run, *, ipv6: bool = True) -> list[str]:
    """Load every table atomically; returns the restore inputs actually applied."""
    applied: list[str] = []
    for table in tables:
        if table.family == "ip6" and not ipv6:
            continue
        text = table.restore_input(_jump_present(table, run))
        result = run([_binary(table.family, "-restore"), "-w", "--noflush"], text)
        if result.returncode != 0:
            raise InitError(f"{_binary(table.family, '-restore')} ({table.name}) failed: {result.stderr.strip()}")
        applied.append(text)
    return applied


def _ports(text: str) -> tuple[int, ...]:
    ports = tuple(int(p) for p in text.split(",") if p.strip())
    if not ports or not all(0 < p < 65536 for p in ports):
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of ports")
    return ports


def _ipv4(text: str) -> str:
    try:
        return str(ipaddress.IPv4Address(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not an IPv4 address") from exc


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="capgate-init", description="Redirect the pod's TCP to the capgate sidecar and drop all other egress.")
    parser.add_argument("--proxy-uid", type=int, default=SIDECAR_UID, help="the sidecar's UID (exempt)")
    parser.add_argument("--outbound-port", type=int, default=OUTBOUND_PORT, help="the sidecar's outbound listener")
    parser.add_argument("--sidecar-ports", type=_ports, default=SIDECAR_PORTS,
                        help="the sidecar's loopback ports agents may call directly (default 15080,15090)")
    parser.add_argument("--dns", type=_ipv4, action="append", default=None,
                        help="resolver DNS may go to (repeatable; default: the nameservers of /etc/resolv.conf)")
    parser.add_argument("--dry-run", action="store_true", help="print the rules, change nothing")
    return parser


def options_from(args: argparse.Namespace, resolv_conf: Path = RESOLV_CONF) -> Options:
    resolvers = tuple(args.dns) if args.dns else ()
    if not resolvers and resolv_conf.is_file():
        resolvers = resolvers_from(resolv_conf.read_text(encoding="utf-8", errors="replace"))
    return Options(proxy_uid=args.proxy_uid, outbound_port=args.outbound_port, sidecar_ports=args.sidecar_ports,
                   resolvers=resolvers)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    options = options_from(args)
    if not options.resolvers:
        print("capgate-init: warning: no IPv4 nameserver found; DNS is dropped too", file=sys.stderr)
    tables = plan(options)
    if args.dry_run:
        for table in tables:
            print(f"# {_binary(table.family, '-restore')} --noflush")
            print(table.restore_input(jump_present=False), end="")
        return 0
    if os.geteuid() != 0:
        print("capgate-init: warning: not running as root; iptables will probably refuse", file=sys.stderr)
    try:
        applied = apply(tables, ipv6=ipv6_present())
    except (InitError, OSError) as exc:
        print(f"capgate-init: error: {exc}", file=sys.stderr)
        return 1
    for text in applied:
        print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
