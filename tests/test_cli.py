"""The command line: its surface is pinned (a flag added, renamed or removed is a decision, made here too), and a bad
value is one line naming it, at once, before anything starts."""

import argparse
import time

import pytest

from gwtf.errors import UserError
from gwtf.launch.cli import COMMANDS, build_parser, main

SURFACE = {
    "demo": [
        "--capacity",
        "--crash-at",
        "--crash-phase",
        "--crash-stage",
        "--dashboard",
        "--data-nodes",
        "--device",
        "--out",
        "--plain-processes",
        "--preset",
        "--replicas",
        "--router",
        "--seed",
        "--set",
        "--stages",
        "--steps",
        "--tensorboard",
        "--timeout",
    ],
    "bootstrap": [
        "--addr-file",
        "--announce-maddrs",
        "--config",
        "--data",
        "--data-nodes",
        "--from-pretrained",
        "--host-maddrs",
        "--key",
        "--open",
        "--preset",
        "--public",
        "--resume",
        "--router",
        "--run",
        "--set",
        "--stages",
        "--use-relay",
        "--workdir",
    ],
    "join": [
        "--announce-maddrs",
        "--capacity",
        "--device",
        "--fault",
        "--host-maddrs",
        "--initial-peers",
        "--join-timeout",
        "--key",
        "--linger",
        "--metrics",
        "--public",
        "--rank",
        "--region",
        "--role",
        "--run",
        "--stage",
        "--standby",
        "--tensorboard",
        "--use-relay",
    ],
    "doctor": [
        "--announce-maddrs",
        "--host-maddrs",
        "--initial-peers",
        "--key",
        "--public",
        "--run",
        "--timeout",
        "--use-relay",
    ],
    "status": ["--initial-peers", "--key", "--public", "--run", "--timeout", "--watch"],
    "dashboard": ["--host", "--initial-peers", "--key", "--port", "--public", "--run", "--timeout"],
    "train-local": [
        "--config",
        "--data-nodes",
        "--json",
        "--metrics",
        "--no-progress",
        "--preset",
        "--seed",
        "--set",
        "--stages",
        "--steps",
        "--tensorboard",
    ],
    "convert": ["--equal-stages", "--from", "--stages", "--to"],
    "export": ["--adapter-only", "--from", "--initial-peers", "--key", "--run", "--to", "--weights-only"],
    "finetune": [
        "--adapter-only",
        "--crash-at",
        "--crash-phase",
        "--crash-stage",
        "--data",
        "--data-nodes",
        "--device",
        "--from-pretrained",
        "--lora",
        "--out",
        "--prompts",
        "--replicas",
        "--resume",
        "--router",
        "--seed",
        "--seq-len",
        "--set",
        "--stages",
        "--steps",
        "--timeout",
    ],
    "generate": ["--base", "--chat", "--max-new-tokens", "--model", "--prompt", "--seed", "--temperature"],
}


def _flags(command: str) -> list[str]:
    parser = build_parser(command)
    sub = next(a for a in parser._actions if a.dest == "command")
    cmd = sub.choices[command]
    return sorted(o for a in cmd._actions for o in a.option_strings if o.startswith("--") and o != "--help")


def test_the_cli_surface_is_pinned():
    assert sorted(COMMANDS) == sorted(SURFACE)
    assert {name: _flags(name) for name in COMMANDS} == SURFACE


def _bootstrap_args(*argv: str) -> argparse.Namespace:
    return build_parser("bootstrap").parse_args(["bootstrap", "--run", "r", *argv])


def test_bootstrap_puts_every_section_into_the_run_record():
    """What `--set section.key=value` sets reaches the run record, which every node reads its settings from."""
    from gwtf.launch.bootstrap import build_record

    sets = ["transport.call_timeout=7.5", "membership.heartbeat_s=0.5", "routing.round_s=0.25",
            "recovery.strategy=copy", "iteration.max_attempts=5", "averaging.timeout=3.0", "train.steps=9"]  # fmt: skip
    record = build_record(_bootstrap_args("--stages", "2", *(x for s in sets for x in ("--set", s))))
    run = record.config["run"]
    assert run["transport"]["call_timeout"] == 7.5 and run["membership"]["heartbeat_s"] == 0.5
    assert run["routing"] == {
        "router": "gwtf-p2p",
        "round_s": 0.25,
        "moves": 0,
        "exchange": False,
        "takeover": False,
    }  # the launchers' default router, the agent's moves off
    assert run["recovery"]["strategy"] == "copy" and run["iteration"]["max_attempts"] == 5
    assert run["averaging"]["timeout"] == 3.0 and run["train"]["steps"] == 9 and run["stages"] == 2
    assert "swarm" not in record.config  # no settings outside the run config
    assert build_record(_bootstrap_args("--set", "routing.router=swarm")).config["run"]["routing"]["router"] == "swarm"
    assert build_record(_bootstrap_args("--router", "oracle")).config["run"]["routing"]["router"] == "oracle"


@pytest.mark.parametrize(
    "argv,named",
    [
        (["--stages", "0"], "--stages 0"),
        (["--data-nodes", "0"], "--data-nodes 0"),
        (["--preset", "gpt5"], "gpt5"),
        (["--set", "train.steps=0"], "train.steps=0"),
        (["--set", "recovery.strategy=checkpoint"], "not a live swarm mode"),
        (["--set", "iteration.floor_bandwidth_mbps=0"], "iteration.floor_bandwidth_mbps=0.0 must be positive"),
        (["--set", "iteration.stage0_copy_share=1.5"], r"iteration.stage0_copy_share=1.5 must be in \(0, 1\]"),
        (["--set", "averaging.bucket_mb=0"], "averaging.bucket_mb=0.0 must be in .0, 1024. .MiB."),
        (["--set", "train.precision=fp16"], "train.precision='fp16': choose one of fp32, bf16"),
        (["--set", "wire.activations=int4"], "wire.activations='int4': choose one of"),
        (["--set", "lora.r=-1"], "lora.r=-1 must be >= 0"),
        (["--set", "data.documents=chapters"], "data.documents='chapters' is unknown"),
    ],
)
def test_bootstrap_refuses_a_bad_value_in_one_line(argv, named):
    from gwtf.launch.bootstrap import build_record

    with pytest.raises(UserError, match=named) as err:
        build_record(_bootstrap_args(*argv))
    assert "\n" not in str(err.value)


def test_an_unknown_router_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["bootstrap", "--run", "r", "--router", "fastest"])
    assert exit_.value.code == 2 and "invalid choice: 'fastest'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv,named",
    [
        (["--region", "mars"], "region 'mars' is not in the region table"),
        (["--capacity", "0"], "capacity=0"),
        (["--device", "gpu"], "--device gpu: choose auto, cpu, cuda or cuda:N"),
    ],  # fmt: skip
)
def test_join_refuses_a_bad_node_option_before_it_reaches_for_the_run(argv, named, capsys):
    t0 = time.monotonic()
    code = main(["join", "--run", "r", "--initial-peers", "/ip4/127.0.0.1/tcp/9/p2p/QmNotThere", *argv])
    err = capsys.readouterr().err
    assert code == 2 and named in err and len(err.strip().splitlines()) == 1
    assert time.monotonic() - t0 < 10  # no DHT was started, nothing waited on a peer


@pytest.mark.parametrize(
    "argv,named",
    [
        (["--stages", "0"], "--stages 0"),
        (["--replicas", "0"], "--replicas 0"),
        (["--steps", "0"], "--steps 0"),
        (["--data-nodes", "0"], "--data-nodes 0"),
        (["--capacity", "0"], "capacity=0"),
        (["--preset", "gpt5"], "unknown model preset 'gpt5'"),
        (["--router", "fastest"], "routing.router='fastest'"),
        (["--crash-stage", "7"], "--crash-stage 7"),
        (["--crash-phase", "lunch"], "--crash-phase 'lunch'"),
        (["--crash-at", "40"], "--crash-at 40"),
        (["--set", "recovery.strategy=nope"], "recovery.strategy='nope'"),
        (["--dashboard", "70000"], "--dashboard 70000: a TCP port is 0..65535"),
        (["--device", "tpu"], "--device tpu: choose auto, cpu, cuda or cuda:N"),
    ],
)
def test_demo_refuses_a_bad_value_before_it_starts_a_process(argv, named, tmp_path, capsys):
    t0 = time.monotonic()
    code = main(["demo", "--out", str(tmp_path / "demo"), *argv])
    err = capsys.readouterr().err
    assert code == 2 and named in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "demo").exists() and time.monotonic() - t0 < 10  # nothing was started
