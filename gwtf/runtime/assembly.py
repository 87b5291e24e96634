"""Assembling nodes from a run: what every node builds (its stage modules, the data schedule, the routers' view)
and the nodes themselves. `gwtf join` (gwtf.launch.join) and the tests' in-process swarm use the same pieces.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from torch import nn

from gwtf.data import MicrobatchSchedule, PackedData
from gwtf.lora import apply_lora
from gwtf.membership import Membership
from gwtf.models.checkpoint import load_stage
from gwtf.models.staged import build_stage
from gwtf.runtime.datanode import DataNode
from gwtf.runtime.spec import NodeOptions, RunSpec
from gwtf.runtime.views import view_builder
from gwtf.transport import Transport


def module_builder(spec: RunSpec) -> Callable[[int], nn.Module]:
    """Stage k from the run's pretrained checkpoint (checked against its hash) when the run fine-tunes one and this
    machine has it, else from the run's seed alone, so every first replica of a stage starts from the same weights
    (a replica without the checkpoint downloads the stage from a live replica)."""

    def build(k: int) -> nn.Module:
        if spec.pretrained and Path(spec.pretrained).is_dir():
            module = load_stage(spec.pretrained, k)[1]
        else:
            module = build_stage(spec.model, k, spec.seed)
        return apply_lora(module, spec.config.lora, k, spec.seed)  # LoRA runs: frozen base, seeded adapters

    return build


def make_schedule(spec: RunSpec, data: PackedData, n_data_nodes: int) -> MicrobatchSchedule:
    t = spec.config.train
    return MicrobatchSchedule(data.train, t.microbatch_size, t.microbatches_per_step, n_data_nodes, t.seed,
                              labels=data.train_labels)  # fmt: skip


def make_data_node(
    spec: RunSpec,
    transport: Transport,
    membership: Membership,
    opts: NodeOptions,
    rank: int,
    data: PackedData,
) -> DataNode:
    """A data node of rank `rank` over the run's data, routing with the run's router."""
    schedule = make_schedule(spec, data, spec.data_nodes)
    views = view_builder(spec, spec.microbatch_size)
    return DataNode(spec, transport, membership, opts, rank, schedule, module_builder(spec), views)
