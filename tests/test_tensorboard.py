"""TensorBoard scalars: what the writer is fed comes back from the event files (read with TensorBoard's own
EventAccumulator) equal to the reports' figures; figures computed in the background never hold up the caller; a
directory it cannot write to is one line before anything starts."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest

from gwtf.errors import UserError
from gwtf.launch.cli import main
from gwtf.launch.join import iteration_row, routing_gap_of
from gwtf.membership import serving
from gwtf.tensorboard import ITERATION_TAGS, ScalarBoard, check_logdir
from tests.support import InProcessSwarm
from tests.test_swarm_inprocess import fast_swarm, small_config


def read_scalars(logdir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the run in `logdir`: tag -> [(step, value)] in the order written."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})  # 0: keep every point
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def assert_rows_logged(scalars: dict[str, list[tuple[int, float]]], rows: list[dict]) -> None:
    """Each row's figures are its step's scalars (float32 in the event file)."""
    for field, tag in ITERATION_TAGS.items():
        expected = [(r["iteration"], r[field]) for r in rows if r.get(field) is not None]
        got = scalars.get(tag, [])
        assert [s for s, _ in got] == [s for s, _ in expected], tag
        assert [v for _, v in got] == pytest.approx([v for _, v in expected], rel=1e-6), tag
    for k in range(len(rows[0]["live_per_stage"])):
        got = scalars[f"swarm/live_replicas/stage_{k + 1}"]
        assert got == [(r["iteration"], r["live_per_stage"][k]) for r in rows]


ROWS = [
    {"iteration": 0, "loss": 5.587, "tokens_per_s": 9533.2, "seconds": 0.41, "rerouted": 0, "partial": 0, "lost": 0,
     "live_per_stage": [2, 2, 2]},
    {"iteration": 1, "loss": 5.5292, "tokens_per_s": 1262.0, "seconds": 3.1, "rerouted": 2, "partial": 1, "lost": 1,
     "live_per_stage": [2, 1, 2], "val_loss": 5.61},
]  # fmt: skip


def test_iteration_rows_come_back_from_the_event_files(tmp_path):
    with ScalarBoard(check_logdir(tmp_path / "tb")) as board:
        for row in ROWS:
            board.iteration(row)
    scalars = read_scalars(tmp_path / "tb")
    assert_rows_logged(scalars, ROWS)
    assert scalars["loss/val"] == [(1, pytest.approx(5.61))]  # only the row that has one


def test_without_a_directory_it_drops_everything():
    board = ScalarBoard(None)
    board.iteration(ROWS[0])
    assert not board.enabled and not board.in_background(0, lambda: {"x": 1.0})
    board.close()


def test_background_figures_never_pile_up_and_a_failure_is_only_missing(tmp_path, caplog):
    release = threading.Event()

    def slow() -> dict[str, float]:
        release.wait(10)
        return {"throughput_gap": 0.25, "worst_path_gap": float("inf")}

    with ScalarBoard(tmp_path / "tb") as board:
        t0 = time.monotonic()
        assert board.in_background(0, slow, prefix="routing/")
        assert not board.in_background(1, slow, prefix="routing/")  # the first one still runs: this one is skipped
        assert time.monotonic() - t0 < 1.0 and board.skipped == 1  # the caller never waited for it
        release.set()
        deadline = time.monotonic() + 10
        while not board.in_background(2, lambda: 1 / 0, prefix="routing/") and time.monotonic() < deadline:
            time.sleep(0.01)
    assert "step 2: no routing/ figures (ZeroDivisionError" in caplog.text
    scalars = read_scalars(tmp_path / "tb")
    assert scalars == {"routing/throughput_gap": [(0, 0.25)]}  # an infinite gap is left out


def test_an_unwritable_directory_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(UserError, match="--tensorboard .*a-file/tb: cannot write there"):
        check_logdir(blocker / "tb")
    peer = "/ip4/127.0.0.1/tcp/9/p2p/QmNotThere"
    for argv, named in [
        (["join", "--run", "r", "--initial-peers", peer, "--role", "data", "--tensorboard", str(blocker / "tb")],
         "cannot write there"),
        (["join", "--run", "r", "--initial-peers", peer, "--tensorboard", str(tmp_path / "tb")], "only data nodes"),
        (["demo", "--out", str(tmp_path / "demo"), "--tensorboard", str(blocker / "tb")], "cannot write there"),
        (["train-local", "--steps", "1", "--tensorboard", str(blocker / "tb")], "cannot write there"),
    ]:  # fmt: skip
        t0 = time.monotonic()
        code = main(argv)
        err = capsys.readouterr().err
        assert code == 2 and named in err and len(err.strip().splitlines()) == 1, err
        assert time.monotonic() - t0 < 10  # before any DHT or process started
    assert not (tmp_path / "demo").exists()


def test_train_local_writes_the_same_scalars(tmp_path):
    from gwtf.config import load_config
    from gwtf.trainer import train_local

    cfg = load_config(None, ["train.steps=3", "train.eval_every=2", "train.microbatches_per_step=2"])
    result = train_local(cfg, progress=False, tensorboard_dir=str(tmp_path / "tb"))
    scalars = read_scalars(tmp_path / "tb")
    assert [s for s, _ in scalars["loss/train"]] == [0, 1, 2]
    assert [v for _, v in scalars["loss/train"]] == pytest.approx(result["losses"], rel=1e-6)
    assert scalars["loss/val"] == [(s, pytest.approx(v, rel=1e-6)) for s, v in result["val_losses"]]
    assert len(scalars["throughput/tokens_per_s"]) == 3


def test_a_swarms_iterations_and_routing_gap_come_back(tmp_path):
    """An in-process swarm (3 stages x 2 replicas): each iteration's report, as `gwtf join` logs it, and the gap of
    the data node's plan to the optimum on its view, computed in the board's worker thread."""

    async def train() -> tuple[list[dict], dict[int, dict[str, float]]]:
        swarm = InProcessSwarm(small_config(steps=3, microbatches=4), replicas=2, settings=fast_swarm(), capacity=2)
        await swarm.start()
        node, rows, gaps = swarm.data_nodes[0], [], {}
        try:
            with ScalarBoard(tmp_path / "tb") as board:
                for _ in range(3):
                    (report,) = (await swarm.step()).reports
                    live = await node.live_nodes()
                    rows.append(iteration_row(report, [len(serving(live, "relay", k)) for k in (1, 2, 3)]))
                    board.iteration(rows[-1])
                    gap = routing_gap_of(node)
                    gaps[report.iteration] = gap()
                    assert board.in_background(report.iteration, gap, prefix="routing/")
                    board.drain()
        finally:
            await swarm.close()
        return rows, gaps

    rows, gaps = asyncio.run(asyncio.wait_for(train(), timeout=100))
    scalars = read_scalars(tmp_path / "tb")
    assert_rows_logged(scalars, rows)
    assert [r["live_per_stage"] for r in rows] == [[2, 2, 2]] * 3
    for key in ("throughput_gap", "worst_path_gap", "throughput", "optimum_throughput"):
        assert scalars[f"routing/{key}"] == [(i, pytest.approx(gaps[i][key], rel=1e-6, abs=1e-9)) for i in range(3)]
    assert all(g["optimum_throughput"] == 4 and 0 <= g["throughput_gap"] < 1 for g in gaps.values()), gaps
