"""The reachability verdict from servers' answers: the address it hands out is the one most
servers that reached us saw, and an answer naming an address no record can carry is dropped."""

from __future__ import annotations

from typing import Any

import pytest

from dht_bridge.dht.reach import Address, Reachability, check

A, B, C = ("10.0.0.1", 4000), ("10.0.0.2", 4000), ("10.0.0.3", 4000)
HERE = ("198.51.100.7", 4100)  # where the honest servers see us
LIAR = ("203.0.113.9", 4000)


class Servers:
    """Stands in for the node's protocol: each server's scripted answer to `reach`."""

    def __init__(self, answers: dict[Address, object]) -> None:
        self.answers = answers

    async def request(
        self, address: Address, name: str, *args: Any, wait: float | None = None
    ) -> tuple[bool, Any]:
        """The server's answer, as the protocol returns it; (False, None) for a silent one."""
        assert name == "reach"
        answer = self.answers.get(address)
        return (answer is not None, answer)


def said(reachable: bool, host: object, port: object) -> dict[str, object]:
    return {"reachable": reachable, "host": host, "port": port}


async def verdict(answers: dict[Address, object]) -> Reachability:
    return await check(Servers(answers), b"\x01" * 20, list(answers), wait=1.0)


async def test_one_server_does_not_choose_the_address_the_others_agree_on() -> None:
    # The liar is asked first: the first answer decided before.
    got = await verdict({A: said(True, *LIAR), B: said(True, *HERE), C: said(True, *HERE)})
    assert got == Reachability(True, HERE, 3, 3)


async def test_the_address_comes_from_servers_that_reached_us() -> None:
    got = await verdict({A: said(False, *LIAR), B: said(False, *LIAR), C: said(True, *HERE)})
    assert got == Reachability(False, HERE, 3, 1)


@pytest.mark.parametrize(
    ("host", "port"),
    [
        ("127.0.0.1", 70000),
        ("127.0.0.1", 0),
        ("127.0.0.1", True),
        ("fe80::1%eth0", 4000),  # an IPv6 scope: no record can carry it
        ("0.0.0.0", 4000),
        ("example.com", 4000),
        (None, 4000),
    ],
)
async def test_an_answer_naming_an_address_no_record_can_carry_is_dropped(
    host: object, port: object
) -> None:
    # A port outside 1..65535 made every record the worker signed invalid.
    got = await verdict({A: said(True, host, port), B: said(False, *HERE)})
    assert got == Reachability(False, HERE, 1, 0)
    assert await verdict({A: said(True, host, port)}) == Reachability(None)


async def test_an_ipv4_mapped_address_is_handed_out_as_ipv4() -> None:
    got = await verdict({A: said(True, "::ffff:198.51.100.7", 4100)})
    assert got == Reachability(True, HERE, 1, 1)
