"""Real swarms: every node a process on hivemind (DHT + P2P on 127.0.0.1), as `gwtf demo` runs them."""

import json

import pytest

from gwtf.config import load_config
from gwtf.launch.cli import main
from gwtf.trainer import train_local

SETTINGS = ["data.max_bytes=300000", "train.microbatch_size=4", "train.microbatches_per_step=4", "optim.warmup_steps=3"]


def demo(tmp_path, *extra: str, router: str = "round-robin") -> dict:
    argv = ["demo", "--preset", "debug", "--stages", "2", "--router", router, "--out", str(tmp_path),
            "--timeout", "240", *sum((["--set", s] for s in SETTINGS), []), *extra]  # fmt: skip
    code = main(argv)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert code == 0, summary
    return summary


def node_warnings(out) -> str:
    """The lines of every node's log that say something went wrong or a microbatch took another way."""
    lines = []
    for log in sorted(out.glob("*.log")):
        for line in log.read_text(errors="replace").splitlines():
            if any(w in line for w in ("WARNING", "ERROR", "Traceback", " mb ", "recover", "restart")):
                lines.append(f"{log.stem}: {line}")
    return "\n".join(lines[-80:])


@pytest.mark.timeout(300)
def test_process_swarm_reproduces_train_local(tmp_path):
    steps = 6
    summary = demo(tmp_path, "--replicas", "1", "--steps", str(steps), "--crash-at", "-1", "--seed", "5")
    cfg = load_config(None, [*SETTINGS, "stages=2", f"train.steps={steps}", "train.seed=5", "train.eval_every=0"])
    reference = train_local(cfg, progress=False)["losses"]
    assert summary["losses"] == pytest.approx(reference, abs=1e-4)
    assert summary["microbatches"]["lost"] == 0


@pytest.mark.timeout(300)
# In the integration tier: the fast tier covers a crash in process (tests/test_faults.py), p2p re-routing in process
# (tests/test_routing_p2p.py), and a crash of a real process with a rejoin (the churn harness's end-to-end test).
@pytest.mark.integration
@pytest.mark.parametrize("router", ["round-robin", "gwtf-p2p"])
def test_process_swarm_survives_sigkill_and_a_joiner_takes_over(tmp_path, router):
    argv = ["--replicas", "2", "--steps", "24", "--crash-at", "4", "--crash-stage", "1"]
    summary = demo(tmp_path, *argv, router=router)
    assert summary["crash"].get("stage") == 1, (summary["crash"], node_warnings(tmp_path))
    mb = summary["microbatches"]
    assert mb["lost"] == 0
    assert mb["started"] == mb["finished"] + mb["partial"]
    assert summary["joiner_served"], "the joiner did not start serving"
    assert summary["last_loss"] < summary["first_loss"] - 0.3


@pytest.mark.timeout(300)
@pytest.mark.integration  # the fast tier checks the same property in process (test_swarm_inprocess.py)
def test_process_swarm_two_replicas_two_data_nodes_equal_data_parallel(tmp_path):
    steps = 5
    summary = demo(tmp_path, "--replicas", "2", "--data-nodes", "2", "--steps", str(steps), "--crash-at", "-1")
    cfg = load_config(None, [*SETTINGS, "stages=2", f"train.steps={steps}", "train.seed=0", "train.eval_every=0"])
    reference = train_local(cfg, progress=False, n_data_nodes=2)["losses"]
    # data-0's losses are the mean over its own microbatches; the global step loss is the mean over both nodes
    both = [
        json.loads(line) for p in ("data-0.jsonl", "data-1.jsonl") for line in (tmp_path / p).read_text().splitlines()
    ]
    per_step = {}
    for row in both:
        if row.get("event") == "iteration":
            per_step.setdefault(row["iteration"], []).append(row["loss"])
    losses = [sum(v) / len(v) for _, v in sorted(per_step.items())]
    assert summary["microbatches"]["lost"] == 0
    # A microbatch whose backward did not come back falls off data parallelism: say where it stopped.
    assert summary["microbatches"]["partial"] == 0, node_warnings(tmp_path)
    assert losses == pytest.approx(reference, abs=1e-4)
