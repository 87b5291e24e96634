"""Where a joining relay goes: the stage with the fewest microbatches per second, an empty stage first."""

from gwtf.membership import NodeRecord
from gwtf.placement import choose_stage


def relay(peer: str, stage: int, compute_s: float, status: str = "serving", capacity: int = 3) -> NodeRecord:
    return NodeRecord(peer, "relay", stage, status, capacity, compute_s, None, 0, True, None, 0.0, 0)


def nodes(*records: NodeRecord) -> dict[str, NodeRecord]:
    return {r.peer_id: r for r in records}


def test_an_empty_stage_comes_first():
    assert choose_stage(nodes(relay("a", 1, 0.1), relay("b", 3, 0.1)), 3) == 2


def test_the_slowest_stage_gets_the_joiner():
    # stage 1: one relay at 0.1 s (10 mb/s); stage 2: two at 0.3 s (6.7 mb/s): stage 2 needs it despite two relays
    assert choose_stage(nodes(relay("a", 1, 0.1), relay("b", 2, 0.3), relay("c", 2, 0.3)), 2) == 2
    assert choose_stage(nodes(relay("a", 1, 0.3), relay("b", 2, 0.1), relay("c", 2, 0.3)), 2) == 1


def test_an_unmeasured_relay_counts_at_the_median_not_as_infinitely_fast():
    # "j" joined stage 1 a moment ago (no compute time yet): stage 1 has two relays like stage 2's, so the tie
    # goes to stage 1; counting "j" at 0 s (or its capacity over a tiny time) would send every joiner to stage 2
    swarm = nodes(relay("a", 1, 0.2), relay("j", 1, 0.0, "joining"), relay("b", 2, 0.2), relay("c", 2, 0.2))
    assert choose_stage(swarm, 2) == 1
    swarm = nodes(relay("a", 1, 0.2), relay("j", 1, 0.0), relay("b", 2, 0.2))
    assert choose_stage(swarm, 2) == 2


def test_leaving_relays_and_data_nodes_do_not_count():
    data = NodeRecord("d", "data", 0, "serving", 0, 0.0, None, 0, True, None, 0.0, 0)
    assert choose_stage(nodes(relay("a", 1, 0.1), relay("b", 2, 0.1, "leaving"), data), 2) == 2
