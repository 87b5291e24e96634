"""LoRA adapters across the swarm: only the adapters train, are averaged and downloaded (counted on the wire), replicas
agree through a relay crash, a joiner and a CheckFree rebuild, the loss falls, and the export (merged, or a peft
adapter directory) gives the swarm's logits in transformers."""

import asyncio

import pytest
import torch

from gwtf.errors import UserError
from gwtf.lora import LoraConfig, apply_lora, merged_stage, parse_lora, save_adapter, trainable_names
from gwtf.transport import InProcessTransport, Transport
from tests.support import InProcessSwarm
from tests.test_finetune import tiny_checkpoint  # noqa: F401 (a fixture)
from tests.test_swarm_inprocess import fast_swarm

LORA = ["lora.r=8", "lora.alpha=16", 'lora.targets="q_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"']


def test_lora_flag_parses_into_settings():
    assert parse_lora("r=16,alpha=32,targets=q_proj,v_proj") == [
        "lora.r=16", "lora.alpha=32", 'lora.targets="q_proj,v_proj"'
    ]  # fmt: skip
    for bad, match in (("alpha=2", "needs r="), ("r=4,rank=2", "unknown key 'rank'"), ("q_proj", "not key=value")):
        with pytest.raises(UserError, match=match):
            parse_lora(bad)
    with pytest.raises(UserError, match="lora.r=-1"):
        LoraConfig(r=-1)


def test_adapters_are_seeded_by_stage_and_merge_exactly():
    from gwtf.models.presets import get_preset
    from gwtf.models.staged import build_stage

    cfg, lora = get_preset("debug", 2), LoraConfig(r=4, alpha=8)
    a, b = (apply_lora(build_stage(cfg, 1, 0), lora, 1, seed=0) for _ in range(2))
    assert trainable_names(a) == trainable_names(b) and all(".lora_" in n for n in trainable_names(a))
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))  # every replica starts identical
    with torch.no_grad():
        for n, p in a.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)  # a trained adapter (B starts at zero)
    x = torch.randn(2, 16, cfg.d_model)
    torch.testing.assert_close(merged_stage(a, cfg, 1)(x), a(x), rtol=0, atol=1e-5)
    head = apply_lora(build_stage(cfg, 0, 0), lora, 0, seed=0)
    assert trainable_names(head) == []  # stage 0 stays frozen
    with pytest.raises(UserError, match="lora.targets='nope'"):
        apply_lora(build_stage(cfg, 1, 0), LoraConfig(r=4, targets="nope"), 1, seed=0)


class WireLog:
    """Every call between nodes with its reply: what crossed the wire, by handler."""

    def __init__(self, monkeypatch):
        self.calls: list[tuple[str, object, object]] = []
        original = Transport.call

        async def spy(transport, peer_id, name, msg, timeout):
            reply = await original(transport, peer_id, name, msg, timeout)
            self.calls.append((name, msg, reply))
            return reply

        monkeypatch.setattr(InProcessTransport, "call", spy)

    def state_keys(self) -> list[str]:
        return [k for name, _, reply in self.calls if name in ("get_state", "get_shadow") for k in reply.meta["keys"]]

    def averaged_numel(self, group: str) -> list[int]:
        """Elements pushed per averaging call of `group` (whatever buckets the averager packs them in)."""
        return [sum(t.numel() for t in msg.tensors) for name, msg, _ in self.calls if name.startswith(f"avg_{group}")]


async def later(delay: float, fn, *args) -> None:
    await asyncio.sleep(delay)  # inside the iteration, while microbatches are in flight
    await fn(*args)


def one_file_corpus(root) -> str:
    path = root / "notes.txt"
    notes = sorted((root / "corpus").glob("*.txt"))
    path.write_text("\n\n".join(p.read_text() for p in notes[:6]))
    return str(path)


@pytest.mark.timeout(120)
def test_lora_across_a_swarm_with_a_crash_a_joiner_and_a_rebuild(tiny_checkpoint, tmp_path, monkeypatch):  # noqa: F811
    from transformers import AutoModelForCausalLM

    from gwtf.launch.finetune import run_config
    from gwtf.models.checkpoint import ensure_staged, export_hf
    from gwtf.models.staged import forward_stages

    staged = ensure_staged(tiny_checkpoint / "src", 2, tmp_path / "staged")
    corpus = one_file_corpus(tiny_checkpoint)  # one text file: its paragraphs, held out by rows
    settings = ["model.seq_len=32", "optim.lr=5e-2", "optim.warmup_steps=2", "train.microbatch_size=4",
                "train.microbatches_per_step=2", "train.steps=12", *LORA]  # fmt: skip
    cfg = run_config(staged, corpus, settings)
    wire = WireLog(monkeypatch)

    async def go():
        swarm = InProcessSwarm(cfg, replicas=2, settings=fast_swarm(), run_id="lora")
        await swarm.start()
        losses = []
        try:
            for step in range(12):
                if step == 3:  # a relay of stage 1 vanishes mid-iteration; a volunteer takes its place
                    crash = later(0.05, swarm.crash, sorted(p for p, n in swarm.relays.items() if n.stage == 1)[0])
                    asyncio.ensure_future(crash)
                if step == 5:
                    await swarm.add_relay(1)  # downloads the adapters and their Adam moments only
                if step == 6:  # stage 2 loses every replica: CheckFree rebuilds its adapters on a newcomer
                    for peer in [p for p, n in swarm.relays.items() if n.stage == 2]:
                        await swarm.crash(peer)
                    await asyncio.sleep(1.2)  # their records expire
                    await swarm.add_relay(2)
                    await swarm.add_relay(2)
                result = await swarm.step()
                assert all(r.lost == 0 for r in result.reports)
                losses.append(result.loss)
            return swarm, losses
        finally:
            await swarm.close()

    swarm, losses = asyncio.run(asyncio.wait_for(go(), timeout=100))
    rebuilt = [n for n in swarm.relays.values() if n.rebuilt_source]
    assert rebuilt and rebuilt[0].stage == 2, "stage 2 was not rebuilt"
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.2, losses  # it trains (head and embedding frozen)

    # Only adapter tensors crossed the wire: every state tensor a joiner or a rebuild fetched, every averaged value
    keys = wire.state_keys()
    assert keys and all(".lora_" in k for k in keys), [k for k in keys if ".lora_" not in k][:3]
    relay = next(n for n in swarm.relays.values() if n.stage == 1)
    adapter_numel = sum(p.numel() for p in relay.replica.trainable())
    total_numel = sum(p.numel() for p in relay.replica.module.parameters())
    assert 0 < adapter_numel < total_numel / 4
    for stage in (1, 2):
        pushed = wire.averaged_numel(f"stage{stage}")
        assert pushed and max(pushed) <= adapter_numel, (stage, max(pushed), adapter_numel)
    assert max(wire.averaged_numel("stage0"), default=0) == 0  # stage 0 trains nothing

    # The replicas of each stage agree (adapters and base)
    for stage in (1, 2):
        replicas = [n.replica.module for n in swarm.relays.values() if n.stage == stage]
        assert len(replicas) == 2
        for a, b in zip(replicas[0].parameters(), replicas[1].parameters()):
            assert torch.equal(a, b), f"replicas of stage {stage} differ"

    # Export merged: transformers gives the swarm's logits; and a peft adapter directory does too
    model_cfg = swarm.spec.model
    modules = [swarm.data_nodes[0].stage0.module] + [
        next(n for n in swarm.relays.values() if n.stage == k).replica.module for k in (1, 2)
    ]
    merged = [modules[0]] + [merged_stage(m, model_cfg, k) for k, m in enumerate(modules[1:], start=1)]
    export_hf(merged, model_cfg, tmp_path / "hf")
    ids = torch.randint(0, 200, (1, 24))
    with torch.no_grad():
        swarm_logits = forward_stages(modules, ids)
        hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
        torch.testing.assert_close(hf(ids).logits, swarm_logits, rtol=0, atol=1e-5)
        from peft import PeftModel

        save_adapter(modules, model_cfg, cfg.lora, tmp_path / "adapter")
        base = AutoModelForCausalLM.from_pretrained(tiny_checkpoint / "src").eval()
        adapted = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
        torch.testing.assert_close(adapted(ids).logits, swarm_logits, rtol=0, atol=1e-5)
