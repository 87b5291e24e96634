"""Export a live run's model as a Hugging Face directory: `gwtf export --run NAME --initial-peers ADDR --to DIR`.

Every stage is fetched from a live node that holds it (relays for stages 1..S, a data node for stage 0), all at one
version, and written with the run's tokenizer when it fine-tunes a pretrained checkpoint.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

from torch import nn

from gwtf.config import RunConfig, from_dict
from gwtf.errors import BadMessage, PeerError, UserError
from gwtf.membership import make_dht, serving
from gwtf.runtime.state import fetch_state
from gwtf.transport import Message

log = logging.getLogger(__name__)


async def fetch_run(initial_peers: list[str], run_id: str, key: str | None = None, timeout: float = 60.0):
    """(run config, model config, [stage 0, stage 1..S], version) of a live run."""
    from gwtf.auth import join_access
    from gwtf.membership import DHTMembership, find_run
    from gwtf.transport import HivemindTransport

    access = join_access(run_id, key)
    dht = make_dht(initial_peers, loopback=True, access=access)
    try:
        membership = DHTMembership(dht, run_id)
        record = await asyncio.to_thread(find_run, dht, initial_peers, access, timeout)
        cfg = from_dict(record.config["run"])
        model = cfg.model_config()
        transport = await HivemindTransport.create(await dht.replicate_p2p(), run_id, access=access)
        try:
            nodes = await asyncio.to_thread(membership.live_nodes)
            fetched = [
                await _fetch_stage(transport, nodes, model, k, run_id, timeout) for k in range(model.n_stages + 1)
            ]
        finally:
            await transport.shutdown()
    finally:
        dht.shutdown()
    versions = {version for _, version in fetched}
    if len(versions) != 1:
        raise UserError(f"the run's stages are at versions {sorted(versions)}: export when the run has finished")
    return cfg, model, [stage for stage, _ in fetched], versions.pop()


async def _fetch_stage(transport, nodes, model, k: int, run_id: str, timeout: float) -> tuple[nn.Module, int]:
    from gwtf.models.staged import empty_stage

    holders = sorted(((r.state_version, p) for p, r in serving(nodes, "data" if k == 0 else "relay", k).items()),
                     reverse=True)  # fmt: skip

    async def get(peer: str, msg: Message) -> Message:
        return await transport.call(peer, "get_state", msg, timeout=timeout)

    stage = empty_stage(model, k)
    names = [n for n, _ in stage.named_parameters()]
    for _, peer in holders:  # the most advanced first; a holder that fails is skipped
        try:
            tensors, meta = await fetch_state(get, run_id, [peer], names)
        except (PeerError, BadMessage) as exc:
            log.warning("stage %d from %s failed (%s); trying another holder", k, peer[:8], exc)
            continue
        stage.load_state_dict({n.split("/", 1)[1]: t for n, t in tensors.items() if n.startswith("param/")},
                              strict=False)  # fmt: skip
        return stage, int(meta["version"])
    raise UserError(f"no live node of run {run_id!r} could give stage {k}")


def tokenizer_of(cfg: RunConfig) -> tuple[Any, dict]:
    """The run's tokenizer and special token ids when it fine-tunes a checkpoint on this machine; else none."""
    if not cfg.pretrained or not Path(cfg.pretrained).is_dir():
        return None, {}
    from transformers import AutoTokenizer

    from gwtf.models.checkpoint import read_manifest

    return AutoTokenizer.from_pretrained(cfg.pretrained), read_manifest(cfg.pretrained).get("special_tokens", {})


def export_run(initial_peers: list[str], run_id: str, out_dir: str, key: str | None = None) -> Path:
    from gwtf.models.checkpoint import export_hf, weights_hash

    cfg, model, stages, version = asyncio.run(fetch_run(initial_peers, run_id, key))
    tokenizer, special = tokenizer_of(cfg)
    out = export_hf(stages, model, out_dir, tokenizer=tokenizer, special_tokens=special)
    log.info("exported run %s at version %d to %s (weights %s)", run_id, version, out, weights_hash(stages))
    return out
