"""A stage left one step behind: its replicas that made the last step died before anyone could download from them.
The data node has the survivors take the run's version without that step (one lost update for one stage) instead
of waiting for a stage nobody can serve until the run times out."""

import asyncio

from tests.support import InProcessSwarm
from tests.test_swarm_inprocess import fast_swarm, run, small_config


def test_a_stage_one_step_behind_with_nobody_to_download_from_advances_and_training_goes_on():
    cfg = small_config(steps=6, microbatches=4, stages=2)

    async def go() -> tuple[list[int], list[int], int]:
        swarm = InProcessSwarm(cfg, replicas=2, settings=fast_swarm())
        await swarm.start()
        try:
            for _ in range(2):
                await swarm.step()
            ahead, behind = sorted((n for n in swarm.relays.values() if n.stage == 1), key=lambda n: n.peer_id)
            await swarm.crash(ahead.peer_id)
            behind.replica.version -= 1  # it missed the last step; the one that made it is gone
            data = swarm.data_nodes[0]
            data.confirmed[behind.peer_id] = behind.replica.version
            await behind.announce()
            versions, lost = [], []
            for _ in range(2):
                result = await asyncio.wait_for(swarm.step(), timeout=60)
                versions.append(behind.replica.version)
                lost.extend(r.lost for r in result.reports)
            return versions, lost, data.iteration
        finally:
            await swarm.close()

    versions, lost, iteration = run(go())
    # advanced 1 -> 2 without the update, then stepped with the swarm: 3 after step 3, 4 after step 4
    assert versions == [3, 4] and lost == [0, 0] and iteration == 4
