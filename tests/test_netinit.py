"""capgate-init's rules: what they say (pure) and that loading them twice leaves one copy (real netns)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from capgate import netinit

CLUSTER_RESOLV = """# written by the kubelet
search travel.svc.cluster.local svc.cluster.local cluster.local
nameserver 10.96.0.10
nameserver fd00::10
nameserver 10.96.0.10
options ndots:5
"""


def rules(table: netinit.Table) -> list[str]:
    return list(table.rules)


def test_resolvers_are_the_ipv4_nameservers_of_resolv_conf() -> None:
    assert netinit.resolvers_from(CLUSTER_RESOLV) == ("10.96.0.10",)
    assert netinit.resolvers_from("nameserver not-an-ip\n#nameserver 1.2.3.4\n") == ()


def test_tcp_is_redirected_except_the_sidecar_its_ports_and_dns() -> None:
    nat, _, _ = netinit.plan(netinit.Options(resolvers=("10.96.0.10",)))
    assert (nat.family, nat.name) == ("ip", "nat")
    assert rules(nat) == [
        "-m owner --uid-owner 65532 -j RETURN",
        "-d 127.0.0.1/32 -p tcp -m multiport --dports 15080,15090,15001 -j RETURN",
        "-d 10.96.0.10/32 -p tcp --dport 53 -j RETURN",
        "-p tcp -j REDIRECT --to-ports 15001",
    ]


def test_everything_else_is_dropped_and_ipv6_has_no_exemption_but_the_sidecar() -> None:
    _, filter4, filter6 = netinit.plan(netinit.Options(resolvers=("10.96.0.10",), proxy_uid=1337))
    assert rules(filter4)[0] == "-m owner --uid-owner 1337 -j RETURN"
    assert "-d 10.96.0.10/32 -p udp --dport 53 -j RETURN" in rules(filter4)
    assert rules(filter4)[-1] == rules(filter6)[-1] == "-j DROP"
    assert not any("udp" in rule or "--dport" in rule for rule in rules(filter6))


def test_restore_input_declares_our_chain_and_jumps_to_it_only_once() -> None:
    _, filter4, _ = netinit.plan(netinit.Options())
    first = filter4.restore_input(jump_present=False)
    assert first.startswith("*filter\n:CAPGATE_EGRESS - [0:0]\n-I OUTPUT 1 -j CAPGATE_EGRESS\n")
    assert first.endswith("COMMIT\n")
    assert "-I OUTPUT" not in filter4.restore_input(jump_present=True)


def test_dry_run_prints_the_rules_and_changes_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    assert netinit.main(["--dry-run", "--dns", "10.96.0.10", "--proxy-uid", "4242"]) == 0
    out = capsys.readouterr().out
    assert "-A CAPGATE_REDIRECT -m owner --uid-owner 4242 -j RETURN" in out
    assert out.count("COMMIT") == 3


def test_applying_twice_in_a_real_namespace_leaves_one_copy_of_every_rule() -> None:
    if os.geteuid() != 0:
        pytest.fail("needs root to create a network namespace")
    name = f"cgeg-init-{os.getpid()}"
    init = str(Path(sys.executable).parent / "capgate-init")
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        for _ in range(2):
            done = subprocess.run(["ip", "netns", "exec", name, init, "--dns", "10.96.0.10"],
                                  capture_output=True, text=True, check=False)
            assert done.returncode == 0, done.stderr
        saved = subprocess.run(["ip", "netns", "exec", name, "iptables-save"], capture_output=True, text=True,
                               check=True).stdout
        saved6 = subprocess.run(["ip", "netns", "exec", name, "ip6tables-save"], capture_output=True, text=True,
                                check=True).stdout
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)
    assert saved.count("-A OUTPUT -j CAPGATE_REDIRECT") == 1
    assert saved.count("-A OUTPUT -j CAPGATE_EGRESS") == 1
    assert saved.count("-j REDIRECT --to-ports 15001") == 1
    assert saved.count("-A CAPGATE_EGRESS -j DROP") == 1
    assert saved6.count("-A CAPGATE_EGRESS -j DROP") == 1
