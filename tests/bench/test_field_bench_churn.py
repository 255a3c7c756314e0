"""The field bench's churn (bench/field_bench_churn.py), on the virtual clock: what each worker
is said to be at each step of its sessions, which the bench's lookups trust when they pick a
target."""

from __future__ import annotations

from dataclasses import dataclass

from dht_bridge.netem.clock import run_virtual
from tests.support.bench import bench_module
from tests.support.helpers import wait_for

churn_module = bench_module("field_bench_churn")


@dataclass
class Member:
    role: str = "server"
    alive: bool = True
    listed: bool = True
    down_since: float = 0.0


def test_a_worker_back_from_a_departure_is_not_listed_until_it_has_published() -> None:
    seen: list[tuple[str, bool, bool]] = []

    async def depart(worker: Member, crash: bool) -> None:
        seen.append(("depart", worker.alive, worker.listed))

    async def restart(worker: Member) -> bool | None:
        seen.append(("restart", worker.alive, worker.listed))
        return False

    async def rejoined(worker: Member) -> None:
        # Still unpublished: the record a get would look for is not out yet.
        seen.append(("rejoined", worker.alive, worker.listed))
        worker.listed = True

    async def main() -> int:
        model = churn_module.SessionModel.named("weibull", 60.0)
        churn = churn_module.Churn(model, depart=depart, restart=restart, rejoined=rejoined, seed=7)
        workers = [Member() for _ in range(5)]
        async with churn.running(workers) as counts:
            # Virtual seconds: a day of sessions at most.
            await wait_for(lambda: counts.restarts >= 20, timeout=86400, interval=1.0)
        return int(counts.restarts)

    assert run_virtual(main()) >= 20
    assert {(alive, listed) for step, alive, listed in seen if step == "depart"} == {(False, False)}
    assert {(alive, listed) for step, alive, listed in seen if step == "restart"} == {
        (False, False)
    }
    assert {(alive, listed) for step, alive, listed in seen if step == "rejoined"} == {
        (True, False)
    }
