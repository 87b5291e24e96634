"""Export a live run's model as a Hugging Face directory: `gwtf export --run NAME --initial-peers ADDR --to DIR`.

Every stage is fetched from a live node that holds it (relays for stages 1..S, a data node for stage 0), all at one
version, and written with the run's tokenizer when it fine-tunes a pretrained checkpoint. A LoRA run (gwtf.lora) gives
its adapters only, the frozen base coming from the run's staged copy on this machine (or, without it, from the nodes
too); they are merged into the base weights, or written as a peft adapter directory (`--adapter-only`).
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
from gwtf.runtime.state import fetch_state, state_wait
from gwtf.stage import state_bytes
from gwtf.transport import Message

log = logging.getLogger(__name__)


async def fetch_run(initial_peers: list[str], run_id: str, key: str | None = None, timeout: float = 60.0):
    """(run config, model config, [stage 0, stage 1..S], version, [each stage's state: (tensors, meta)]) of a live
    run; the states (weights and Adam moments, StageReplica.state()) are what gwtf.resume saves."""
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
            fetched = [await _fetch_stage(transport, nodes, cfg, k, run_id, timeout) for k in range(model.n_stages + 1)]
        finally:
            await transport.shutdown()
    finally:
        dht.shutdown()
    versions = {version for _, version, _ in fetched}
    if len(versions) != 1:
        raise UserError(f"the run's stages are at versions {sorted(versions)}: export when the run has finished")
    return cfg, model, [stage for stage, _, _ in fetched], versions.pop(), [state for _, _, state in fetched]


async def _fetch_stage(transport, nodes, cfg: RunConfig, k: int, run_id: str,
                       timeout: float) -> tuple[nn.Module, int, tuple[dict, dict]]:  # fmt: skip
    holders = sorted(((r.state_version, p) for p, r in serving(nodes, "data" if k == 0 else "relay", k).items()),
                     reverse=True)  # fmt: skip

    stage, names = _stage_to_fill(cfg, k)
    sizes = state_bytes(stage)
    wait = max(timeout, state_wait(cfg.iteration, sizes, names, 1))  # one holder gives the whole stage

    async def get(peer: str, msg: Message) -> Message:
        return await transport.call(peer, "get_state", msg, timeout=wait)

    for _, peer in holders:  # the most advanced first; a holder that fails is skipped
        try:
            tensors, meta = await fetch_state(get, run_id, [peer], names, sizes)
        except (PeerError, BadMessage) as exc:
            log.warning("stage %d from %s failed (%s); trying another holder", k, peer[:8], exc)
            continue
        stage.load_state_dict({n.split("/", 1)[1]: t for n, t in tensors.items() if n.startswith("param/")},
                              strict=False)  # fmt: skip
        return stage, int(meta["version"]), (tensors, meta)
    raise UserError(f"no live node of run {run_id!r} could give stage {k}")


def _stage_to_fill(cfg: RunConfig, k: int) -> tuple[nn.Module, list[str]]:
    """The module stage k's fetched state goes into, and the parameters to fetch: all of them; under LoRA the
    adapters alone where the run's staged copy is here to give the base (stage 0 trains nothing: taken whole)."""
    from gwtf.lora import apply_lora, trainable_names
    from gwtf.models.checkpoint import load_stage
    from gwtf.models.staged import empty_stage

    model = cfg.model_config()
    if not cfg.lora.enabled:
        stage = empty_stage(model, k)
        return stage, [n for n, _ in stage.named_parameters()]
    base_here = bool(cfg.pretrained) and Path(str(cfg.pretrained)).is_dir()
    stage = apply_lora(load_stage(str(cfg.pretrained), k)[1] if base_here else empty_stage(model, k), cfg.lora, k,
                       cfg.train.seed)  # fmt: skip
    names = trainable_names(stage) if base_here else []
    return stage, names or [n for n, _ in stage.named_parameters()]


def export_stages(stages: list[nn.Module], cfg: RunConfig, out_dir: str | Path, adapter_only: bool = False) -> Path:
    """A fetched run as a Hugging Face directory (a LoRA run's adapters merged in), or a LoRA run's peft adapter
    directory; with the run's tokenizer."""
    from gwtf.lora import save_adapter
    from gwtf.models.checkpoint import export_hf

    model = cfg.model_config()
    tokenizer, special = tokenizer_of(cfg)
    if adapter_only:
        if not cfg.lora.enabled:
            raise UserError("--adapter-only exports a LoRA run's adapters; this run fine-tunes every weight")
        return save_adapter(stages, model, cfg.lora, out_dir, tokenizer=tokenizer)
    return export_hf(plain_stages(stages, cfg), model, out_dir, tokenizer=tokenizer, special_tokens=special)


def plain_stages(stages: list[nn.Module], cfg: RunConfig) -> list[nn.Module]:
    """The stages with a LoRA run's adapters merged into their base (models.staged names); as they are otherwise."""
    from gwtf.lora import merged_stage

    if not cfg.lora.enabled:
        return stages
    model = cfg.model_config()
    return [stages[0]] + [merged_stage(s, model, k) for k, s in enumerate(stages[1:], start=1)]


def tokenizer_of(cfg: RunConfig) -> tuple[Any, dict]:
    """The run's tokenizer and special token ids when it fine-tunes a checkpoint on this machine; else none."""
    if not cfg.pretrained or not Path(cfg.pretrained).is_dir():
        return None, {}
    from transformers import AutoTokenizer

    from gwtf.models.checkpoint import read_manifest

    return AutoTokenizer.from_pretrained(cfg.pretrained), read_manifest(cfg.pretrained).get("special_tokens", {})


def export_run(initial_peers: list[str], run_id: str, out_dir: str, key: str | None = None,
               adapter_only: bool = False, with_state: bool = True) -> tuple[Path, int]:  # fmt: skip
    """The live run's model in OUT_DIR and, unless `with_state` is False, its whole state in OUT_DIR/state (what
    `gwtf bootstrap --resume OUT_DIR` goes on from: gwtf.resume). Returns (OUT_DIR, the version exported)."""
    from gwtf.config import to_dict
    from gwtf.models.checkpoint import weights_hash
    from gwtf.resume import save_run_state

    cfg, model, stages, version, states = asyncio.run(fetch_run(initial_peers, run_id, key))
    out = export_stages(stages, cfg, out_dir, adapter_only)
    if with_state:
        save_run_state(out, run_id, to_dict(cfg), version, states)
    log.info("exported run %s at version %d to %s (weights %s)", run_id, version, out, weights_hash(stages))
    return out, version
