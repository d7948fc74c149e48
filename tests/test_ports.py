"""The one free-port helper: what it hands out is bindable, never in ``avoid``, in
``span`` when asked, and never the same twice in one process."""

from __future__ import annotations

import socket

import pytest

from gpuportal.provider.ports import BELOW_EPHEMERAL, free_port


def test_a_free_port_can_be_bound_and_is_never_handed_out_twice() -> None:
    seen = [free_port() for _ in range(20)]
    assert len(set(seen)) == len(seen)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", seen[-1]))


def test_ports_to_avoid_are_never_handed_out() -> None:
    span = range(BELOW_EPHEMERAL.start, BELOW_EPHEMERAL.start + 40)
    avoid = set(range(span.start, span.start + 30))
    for _ in range(5):
        port = free_port(avoid=avoid, span=span)
        assert port in span and port not in avoid


def test_a_port_in_use_is_not_free() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        with pytest.raises(OSError, match=f"no free TCP port on 127.0.0.1 in {taken}-{taken}"):
            free_port(span=range(taken, taken + 1))
