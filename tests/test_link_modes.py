"""TcpComm records how each link was made, and on Lambda never tries ``direct``."""

from __future__ import annotations

import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from lambda_shim import transport
from lambda_shim.tcpcomm import CommError, ShimConfig, TcpComm
from lambda_shim.wire import job_key


def _modes(rendezvous, mode: str, size: int = 3) -> list[dict[int, str]]:
    """Each rank's link modes after an allgather (every rank talks to at least one other)."""
    master, address = rendezvous
    job = uuid.uuid4().hex
    host, _, port = address.rpartition(":")

    def rank(r: int) -> dict[int, str]:
        config = ShimConfig(r, size, job, job_key(master, job), (host, int(port)), mode=mode, connect_timeout=30)
        with TcpComm(config) as comm:
            assert comm.allgather(r) == list(range(size))
            comm.barrier()
            return comm.link_modes()

    with ThreadPoolExecutor(size) as pool:
        return list(pool.map(rank, range(size)))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["punch", "direct", "relay"])
def test_each_link_records_the_mode_it_was_made_with(rendezvous, mode) -> None:
    modes = _modes(rendezvous, mode)
    assert all(modes), modes  # every rank has links
    assert {m for links in modes for m in links.values()} == {mode}
    for r, links in enumerate(modes):  # a link is recorded at both of its ends
        assert all(r in modes[peer] for peer in links)


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("on_lambda", "fallback"), [(False, "direct"), (True, "relay")])
def test_auto_skips_direct_on_lambda(rendezvous, monkeypatch, on_lambda, fallback) -> None:
    def blocked(self, peer, deadline):  # a NAT that punching cannot pass
        raise CommError(f"rank {self.rank}: could not punch through to rank {peer}")

    monkeypatch.setattr(transport.Transport, "_punch_link", blocked)
    if on_lambda:
        monkeypatch.setenv("AWS_LAMBDA_FUNCTION_NAME", "cai-hpc-rank")
    else:
        monkeypatch.delenv("AWS_LAMBDA_FUNCTION_NAME", raising=False)
    modes = _modes(rendezvous, "auto", size=2)
    assert modes == [{1: fallback}, {0: fallback}]
