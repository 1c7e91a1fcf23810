"""Hypothesis strategies of random policies, shared by the evaluator's and the tables'
randomized tests (each gives its own networks, workloads and ports)."""

from __future__ import annotations

from collections.abc import Callable
from ipaddress import ip_network
from typing import Any

from hypothesis import strategies as st

from edge.policy.spec import FailsafeRule, NetworkPolicy, Peer, PolicySettings, PortSpec, Rule


def peers(nets: list[str]) -> st.SearchStrategy[Peer]:
    """A cidr of ``nets`` with up to two of the others inside it as excepts."""
    @st.composite
    def draw_peer(draw: st.DrawFn) -> Peer:
        cidr = ip_network(draw(st.sampled_from(nets)))
        inside = [n for n in map(ip_network, nets) if n.version == cidr.version
                  and n != cidr and n.subnet_of(cidr)]  # type: ignore[arg-type]
        holes = (draw(st.lists(st.sampled_from(inside), max_size=2, unique=True))
                 if inside else [])
        return Peer(cidr, tuple(holes))
    return draw_peer()


def policy_settings(nets: list[str], workloads: list[str],
                    port_specs: st.SearchStrategy[PortSpec], *, min_policies: int
                    ) -> Callable[[], st.SearchStrategy[PolicySettings]]:
    """Settings of ``min_policies`` to 3 policies on ``workloads`` and up to 2 failsafe
    rules, each rule over ``nets`` and ``port_specs`` (or any address, any port)."""
    rule_specs = st.builds(
        Rule, st.none() | st.lists(peers(nets), min_size=1, max_size=3).map(tuple),
        st.none() | st.lists(port_specs, min_size=1, max_size=3).map(tuple))
    sections = st.lists(rule_specs, max_size=2).map(tuple)

    @st.composite
    def draw_settings(draw: Any) -> PolicySettings:
        policies = tuple(
            NetworkPolicy(f"p{i}", draw(st.sampled_from(workloads)),
                          draw(st.sampled_from([None, "audit", "enforce"])),
                          draw(sections), draw(sections), draw(sections), draw(sections))
            for i in range(draw(st.integers(min_policies, 3))))
        failsafe = tuple(FailsafeRule(f"f{i}", draw(st.sampled_from(["egress", "ingress"])),
                                      draw(rule_specs))
                         for i in range(draw(st.integers(0, 2))))
        return PolicySettings(draw(st.sampled_from(["audit", "enforce"])), policies,
                              failsafe)
    return draw_settings
