"""Memory at real sizes, exactly: the chunked loss equals the unchunked one; activation checkpointing gives the same
gradients; a recomputed backward with dropout reproduces the original forward's masks; presets hold what their name
says."""

import pytest
import torch
import torch.nn.functional as F

import gwtf.models.staged as staged
from gwtf.models.presets import get_preset
from gwtf.models.staged import IGNORE_INDEX, build_stage
from gwtf.optim import OptimConfig
from gwtf.stage import StageReplica


def test_chunked_loss_equals_the_unchunked_loss(monkeypatch) -> None:
    cfg = get_preset("debug")
    head = build_stage(cfg, 0, seed=1)
    torch.manual_seed(0)
    hidden = torch.randn(3, 20, cfg.d_model, requires_grad=True)
    labels = torch.randint(0, cfg.vocab_size, (3, 20))
    labels[1, :7] = IGNORE_INDEX  # a prompt part that the loss mask leaves out

    def reference() -> torch.Tensor:
        logits = F.linear(head.norm(hidden), head.lm_head.weight)[:, :-1]
        return F.cross_entropy(logits.reshape(-1, cfg.vocab_size), labels[:, 1:].reshape(-1),
                               ignore_index=IGNORE_INDEX)  # fmt: skip

    want = reference()
    want_grads = torch.autograd.grad(want, [hidden, head.lm_head.weight])
    monkeypatch.setattr(staged, "LOSS_CHUNK_BYTES", 4 * cfg.vocab_size * 8)  # 8 positions a chunk: 8 chunks
    got = head.loss(hidden, labels)
    got_grads = torch.autograd.grad(got, [hidden, head.lm_head.weight])
    assert got.item() == pytest.approx(want.item(), abs=1e-6)
    assert all(torch.allclose(g, w, atol=1e-7) for g, w in zip(got_grads, want_grads))


def replica(dropout: float = 0.0, checkpointing: bool = False) -> StageReplica:
    cfg = get_preset("debug").replace(dropout=dropout)
    module = build_stage(cfg, 1, seed=2)  # the same weights for every replica
    return StageReplica(1, module, OptimConfig(), total_steps=10, checkpointing=checkpointing,
                        dropout_seed=7 if dropout else None)  # fmt: skip


def grads_of(r: StageReplica, run) -> tuple[torch.Tensor, list[torch.Tensor]]:
    grad_in = run(r)
    return grad_in, [p.grad.clone() for p in r.module.parameters()]


KEY = ("data-0", 3, 0)
torch.manual_seed(5)
HIDDEN, GRAD_OUT = torch.randn(2, 16, 64), torch.randn(2, 16, 64)


def forward_backward(r: StageReplica, key=KEY) -> torch.Tensor:
    r.forward(key, HIDDEN)
    return r.backward(key, GRAD_OUT)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_activation_checkpointing_gives_the_same_gradients(dropout: float) -> None:
    plain_in, plain = grads_of(replica(dropout), forward_backward)
    ckpt_in, ckpt = grads_of(replica(dropout, checkpointing=True), forward_backward)
    assert torch.equal(plain_in, ckpt_in) and all(torch.equal(a, b) for a, b in zip(plain, ckpt))


def test_a_recomputed_backward_with_dropout_gives_the_original_forwards_gradient() -> None:
    original = replica(dropout=0.1)
    out = original.forward(KEY, HIDDEN)
    orig_in = original.backward(KEY, GRAD_OUT)
    orig = [p.grad.clone() for p in original.module.parameters()]
    # another replica of the stage recomputes the microbatch (its replica died after the forward)
    new_in, new = grads_of(replica(dropout=0.1), lambda r: r.recompute_backward(KEY, HIDDEN, GRAD_OUT))
    assert torch.equal(orig_in, new_in) and all(torch.equal(a, b) for a, b in zip(orig, new))
    # dropout is on: another attempt of the microbatch draws other masks, and a plain forward differs from both
    other = replica(dropout=0.1).forward(("data-0", 3, 1), HIDDEN)
    assert not torch.equal(out, other)


def test_the_124m_preset_holds_124m_parameters() -> None:
    cfg = get_preset("124m")
    with torch.device("meta"):
        n = sum(p.numel() for k in range(cfg.n_stages + 1) for p in staged.empty_stage(cfg, k).parameters())
    assert abs(n - 124e6) / 124e6 < 0.01, n
