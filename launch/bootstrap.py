"""`gwtf bootstrap`: start a run. A DHT peer holds the run record; its address is what volunteers join.

    gwtf bootstrap --run myrun --preset debug --stages 4 --key run.key [--config run.toml] [--set optim.lr=1e-3]

`--key FILE` makes the run by invitation (the key is created there if the file does not exist; hand it to the
volunteers you invite); `--open` lets anyone who reaches the address join (see docs/security.md).

It prints the multiaddress to pass as `--initial-peers` (and writes it to `--addr-file`), then keeps the DHT peer
and the run record alive until it is stopped. Loopback only unless `--public` (every interface) or `--host-maddrs`
says where to listen; `--announce-maddrs` is the address volunteers dial (README: "Across machines").
"""

from __future__ import annotations

import argparse
import logging
import signal
import threading
import time
from pathlib import Path

from gwtf.config import RunConfig, load_config, to_dict
from gwtf.errors import UserError
from gwtf.launch.network import add_address_arguments, addresses_of
from gwtf.membership import RunRecord, make_dht
from gwtf.routing.registry import ROUTERS

log = logging.getLogger(__name__)

RECORD_REFRESH_S = 30.0


def add_arguments(parser: argparse.ArgumentParser, command: str = "bootstrap") -> None:
    parser.add_argument("--run", required=True, help="run name (the DHT key prefix of all its records)")
    parser.add_argument("--preset", default=None, help="model preset (overrides the config file)")
    parser.add_argument("--stages", type=int, default=None, help="relay stages")
    parser.add_argument("--config", default=None, help="run config TOML")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--data-nodes", type=int, default=1, help="data nodes that drive the run")
    parser.add_argument(
        "--router",
        default=None,
        choices=sorted(ROUTERS),
        help="routing.router (default: gwtf-p2p, the launchers' default; a config file or --set may choose another)",
    )
    parser.add_argument("--addr-file", default=None, help="also write the address here")
    add_address_arguments(parser)  # --public, --host-maddrs, --announce-maddrs, --use-relay
    parser.add_argument("--key", default=None, metavar="FILE", help="run key: joining needs it (created if missing)")
    parser.add_argument("--open", action="store_true", help="an open run: anyone who reaches it may join")
    parser.add_argument(
        "--from-pretrained",
        default=None,
        metavar="PATH",
        help="fine-tune this HF directory, .gguf file or staged checkpoint",
    )
    parser.add_argument("--resume", default=None, metavar="DIR",
                        help="go on with a stopped run from its export (`gwtf export --to DIR`): its config, "
                        "weights, optimizer state and step; --set may change what does not fix the model (train.steps, "
                        "...)")  # fmt: skip
    parser.add_argument("--data", default=None, metavar="PATH", help="the corpus: a text file or a folder of them")
    parser.add_argument("--workdir", default=None, help="where a pretrained checkpoint is converted (runs/RUN)")


# Fine-tuning starts from weights that already work: a lower learning rate, no weight decay, a short warmup.
# Applied before the user's --set overrides, which win.
FINETUNE_DEFAULTS = ["optim.lr=1e-4", "optim.weight_decay=0.0", "optim.warmup_steps=5", "optim.min_lr_ratio=0.1"]
# A live run routes with one GWTF agent per node unless its config file or --set says otherwise.
LAUNCH_DEFAULTS = ["routing.router=gwtf-p2p"]


def build_record(args: argparse.Namespace) -> RunRecord:
    cfg, extra = _resumed_config(args) if getattr(args, "resume", None) else _new_config(args)
    if getattr(args, "data", None):
        cfg.data.corpus = str(Path(args.data).resolve())
    if args.data_nodes < 1:
        raise UserError(f"--data-nodes {args.data_nodes}: a run needs at least 1 data node")
    model = cfg.model_config()
    config = {"run": to_dict(cfg), "data_nodes": args.data_nodes, **extra}
    return RunRecord(
        run_id=args.run, model=model.to_dict(), model_hash=model.config_hash(), config=config, created=time.time()
    )


def _new_config(args: argparse.Namespace) -> tuple[RunConfig, dict]:
    """A new run's config (flags, config file, --set), and what its record carries besides (a checkpoint's hash)."""
    pretrained = getattr(args, "from_pretrained", None)
    if args.stages is not None and args.stages < 1:
        raise UserError(f"--stages {args.stages}: a run needs at least 1 relay stage")
    stages = None if pretrained else args.stages  # a pretrained checkpoint is split when it is converted
    flags = {"preset": args.preset, "stages": stages, "routing.router": args.router}
    overrides = [*args.set, *(f"{k}={v}" for k, v in flags.items() if v is not None)]
    cfg = load_config(args.config, overrides, defaults=[*LAUNCH_DEFAULTS, *(FINETUNE_DEFAULTS if pretrained else [])])
    if not pretrained:
        return cfg, {}
    return cfg, _use_pretrained(cfg, pretrained, args.stages, Path(args.workdir or f"runs/{args.run}") / "pretrained")


def _resumed_config(args: argparse.Namespace) -> tuple[RunConfig, dict]:
    """A run that goes on from its export (gwtf.resume): the saved config, with the user's --set on top (what fixes
    the model is refused), pointed at the saved state, whose hash the record carries for every node to check its
    copy against."""
    from gwtf.config import from_dict, with_overrides
    from gwtf.resume import read_manifest, state_dir, state_hash

    fixed = [f for f, v in (("--preset", args.preset), ("--stages", args.stages), ("--config", args.config),
                            ("--from-pretrained", getattr(args, "from_pretrained", None))) if v]  # fmt: skip
    if fixed:
        raise UserError(f"--resume takes the run's config from its export; leave out {', '.join(fixed)}")
    saved = read_manifest(args.resume)
    before = from_dict(saved["config"])
    cfg = with_overrides(before, [*args.set, *([f"routing.router={args.router}"] if args.router else [])])
    if cfg.model_config().config_hash() != before.model_config().config_hash():
        raise UserError("--resume: --set may not change the model of a saved run (its weights fix it)")
    if saved["version"] >= cfg.train.steps:
        raise UserError(f"the saved run is at step {saved['version']} of train.steps={cfg.train.steps}: give more "
                        f"steps to go on (--set train.steps={saved['version'] + cfg.train.steps})")  # fmt: skip
    cfg.resume = str(state_dir(args.resume))
    log.info("run %s resumes run %s at step %d", args.run, saved["run_id"], saved["version"])
    return cfg, {"resume_hash": state_hash(cfg.resume)}


def _use_pretrained(cfg, path: str, stages: int | None, workdir: Path) -> dict:
    """Point the run at a staged copy of the checkpoint (converting it if needed) and at its tokenizer; the record
    carries its weights hash, so every node checks what it loads."""
    from gwtf.models.checkpoint import ensure_staged, read_manifest

    staged = ensure_staged(path, stages, workdir).resolve()
    if not (staged / "tokenizer_config.json").is_file():
        raise UserError(f"{path} has no tokenizer; fine-tuning needs the checkpoint's own (save it alongside)")
    cfg.pretrained, cfg.stages, cfg.data.tokenizer = str(staged), None, str(staged)
    return {"weights_hash": read_manifest(staged)["weights_hash"]}


def _republish(membership, record: RunRecord) -> None:
    """Refresh the run record (bounded retries). A store a peer refuses (a stranger with another run key refuses
    this run's MACs) is not fatal: the record lives on at the peers that hold it, and the next refresh tries again."""
    for attempt in range(3):
        try:
            membership.publish_run(record)
            return
        except (RuntimeError, TimeoutError) as exc:  # a refused store, or a DHT that did not answer in time
            log.warning("refreshing the run record failed (%s); attempt %d of 3", exc, attempt + 1)
            time.sleep(1.0)


RUN_END_POLL_S = 2.0  # how often the bootstrap reads the node records to see whether the run is over


def _serve(membership, record: RunRecord, stop: threading.Event) -> None:
    """Refresh the run record every RECORD_REFRESH_S, and as soon as new nodes appear, until stopped or until the
    run is over (a node reached the last step and no data node serves: gwtf.membership.RunEnd), then return: the
    bootstrap exits 0 with its run.

    The bootstrap is a DHT peer like the others: a store goes to the peers nearest the key (hivemind keeps
    num_replicas copies), so storing again once nodes have joined leaves copies of the run record on them. When the
    bootstrap dies the record lives on there, and a volunteer joins through any live node's address."""
    from gwtf.membership import RunEnd

    end = RunEnd(int(record.config["run"]["train"]["steps"]))
    refreshed, seen = time.monotonic(), 0
    while not stop.wait(RUN_END_POLL_S):
        try:
            nodes = membership.live_nodes()
        except (RuntimeError, TimeoutError) as exc:  # a read that timed out: the next poll reads again
            log.debug("reading the node records failed (%s)", exc)
            continue
        if end.over(nodes):
            print(f"run {record.run_id} reached its last step ({end.total_steps}); the bootstrap exits", flush=True)
            return
        if len(nodes) > seen or time.monotonic() - refreshed >= RECORD_REFRESH_S:
            _republish(membership, record)  # onto the nodes that joined since, if they are nearest the key
            refreshed, seen = time.monotonic(), len(nodes)


def run(args: argparse.Namespace) -> int:
    from gwtf import lifecycle
    from gwtf.auth import bootstrap_access
    from gwtf.membership import DHTMembership

    lifecycle.install()  # its p2pd ends with it, whatever ends it
    record = build_record(args)
    access = bootstrap_access(args.run, args.key, args.open)
    record.key_id = access.key_id
    addrs = addresses_of(args)
    dht = make_dht(None, loopback=addrs.loopback, access=access, **addrs.dht_kwargs())
    membership = DHTMembership(dht, args.run)
    addrs = [str(a) for a in dht.get_visible_maddrs()]
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        membership.publish_run(record)
        print(" ".join(addrs), flush=True)
        if args.addr_file:
            Path(args.addr_file).write_text(" ".join(addrs))
        log.info(
            "run %s: %s, %d stages, model hash %s",
            args.run,
            record.model["family"],
            record.model["n_stages"],
            record.model_hash,
        )
        _serve(membership, record, stop)
    except KeyboardInterrupt:
        pass
    finally:
        membership.close()
        dht.shutdown()
    return 0
