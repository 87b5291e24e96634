"""Presets and staged models: the composed pipeline equals the unsplit transformers model.

OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/test_models.py -q
"""

from __future__ import annotations

import re

import pytest
import torch
from transformers import BertConfig, GPT2LMHeadModel, LlamaForCausalLM

from gwtf.errors import UserError
from gwtf.models.presets import PRESETS, ModelConfig, get_preset, require_equal_stages
from gwtf.models.staged import (
    BlockStage,
    HeadStage,
    build_stage,
    build_stages,
    forward_stages,
    hf_name_map,
    loss_stages,
    stages_from_hf,
    stages_to_hf,
)

HF_CLASS = {"llama": LlamaForCausalLM, "gpt": GPT2LMHeadModel}
TOL = 1e-6


def _tiny(family: str, n_layers: int, n_stages: int, **kw) -> ModelConfig:
    preset = "debug" if family == "llama" else "debug-gpt"
    return get_preset(preset).replace(n_layers=n_layers, n_stages=n_stages, **kw)


def _random_hf(cfg: ModelConfig, seed: int = 0):
    torch.manual_seed(seed)
    return HF_CLASS[cfg.family](cfg.to_hf_config())


def _tokens(cfg: ModelConfig, batch: int = 2, seq: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, cfg.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))


SPLITS = [  # (family, n_layers, n_stages, tied embeddings)
    ("llama", 4, 1, False),
    ("llama", 4, 2, False),
    ("llama", 4, 4, False),
    ("llama", 5, 2, False),  # uneven: 3 + 2
    ("llama", 4, 2, True),
    ("gpt", 4, 1, True),
    ("gpt", 4, 2, True),
    ("gpt", 4, 4, True),
    ("gpt", 5, 2, False),
]


@pytest.mark.parametrize("family,n_layers,n_stages,tied", SPLITS)
def test_composed_stages_match_unsplit_model(family, n_layers, n_stages, tied):
    cfg = _tiny(family, n_layers, n_stages, tie_embeddings=tied)
    hf = _random_hf(cfg).double().train()
    stages = [stage.double().train() for stage in stages_from_hf(hf, cfg)]
    ids = _tokens(cfg)

    reference = hf(input_ids=ids, labels=ids)
    reference.loss.backward()
    logits = forward_stages(stages, ids)
    loss = loss_stages(stages, ids)
    loss.backward()

    assert logits.shape == reference.logits.shape
    assert torch.allclose(logits, reference.logits, atol=TOL, rtol=0)
    assert abs(loss.item() - reference.loss.item()) < TOL
    hf_params = dict(hf.named_parameters())
    mapping = hf_name_map(cfg)
    assert set(hf_params) <= set(mapping)
    stage_params = [dict(stage.named_parameters()) for stage in stages]
    for hf_name, param in hf_params.items():
        k, local = mapping[hf_name]
        grad = stage_params[k][local].grad
        assert grad is not None, hf_name
        assert torch.allclose(grad, param.grad, atol=TOL, rtol=0), f"gradient of {hf_name} differs"


def test_every_stage_parameter_maps_to_the_unsplit_model():
    cfg = _tiny("llama", 5, 2)
    stages = build_stages(cfg, seed=0)
    mapped = {(k, local) for k, local in hf_name_map(cfg).values()}
    owned = {(k, name) for k, stage in enumerate(stages) for name, _ in stage.named_parameters()}
    assert mapped == owned


def test_layer_ranges_even_and_uneven():
    assert _tiny("llama", 4, 4).layer_ranges() == [range(0, 1), range(1, 2), range(2, 3), range(3, 4)]
    assert _tiny("llama", 5, 2).layer_ranges() == [range(0, 3), range(3, 5)]
    assert _tiny("llama", 7, 3).layer_ranges() == [range(0, 3), range(3, 5), range(5, 7)]
    assert _tiny("llama", 4, 2).equal_stages() and not _tiny("llama", 5, 2).equal_stages()


@pytest.mark.parametrize("preset", ["debug", "debug-gpt"])
def test_equal_relay_stages_have_identical_state_dict_keys(preset):
    cfg = get_preset(preset, stages=3).replace(n_layers=6)
    stages = build_stages(cfg, seed=0)
    assert isinstance(stages[0], HeadStage)
    shapes = [{name: t.shape for name, t in stage.state_dict().items()} for stage in stages[1:]]
    assert all(isinstance(s, BlockStage) for s in stages[1:])
    assert all(s == shapes[0] for s in shapes)
    assert all(name.startswith(("blocks.0.", "blocks.1.")) for name in shapes[0])
    assert [s.layer_range for s in stages[1:]] == [range(0, 2), range(2, 4), range(4, 6)]


def test_tied_head_has_no_separate_lm_head():
    tied = build_stage(_tiny("llama", 2, 2, tie_embeddings=True), 0, seed=0)
    untied = build_stage(_tiny("llama", 2, 2), 0, seed=0)
    assert "lm_head.weight" not in tied.state_dict() and "lm_head.weight" in untied.state_dict()
    assert sum(p.numel() for p in tied.parameters()) < sum(p.numel() for p in untied.parameters())


def test_build_stage_is_deterministic_and_independent_of_other_stages():
    cfg = get_preset("debug")
    rng_before = torch.random.get_rng_state()
    a = build_stage(cfg, 2, seed=7)
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # the global RNG is untouched
    b = build_stages(cfg, seed=7)[2]
    c = build_stage(cfg, 2, seed=8)
    d = build_stage(cfg, 3, seed=7)
    for (name, x), y, z, w in zip(
        a.state_dict().items(), b.state_dict().values(), c.state_dict().values(), d.state_dict().values()
    ):
        assert torch.equal(x, y), name
        if x.std() > 0:  # random matrices differ between seeds and between stages; norms (all ones) do not
            assert not torch.equal(x, z) and not torch.equal(x, w), name


def test_init_follows_transformers_scheme():
    stage = build_stage(get_preset("debug-gpt"), 1, seed=0)
    state = stage.state_dict()
    assert torch.all(state["blocks.0.ln_1.weight"] == 1) and torch.all(state["blocks.0.ln_1.bias"] == 0)
    assert torch.all(state["blocks.0.attn.c_attn.bias"] == 0)
    assert abs(state["blocks.0.mlp.c_fc.weight"].std().item() - 0.02) < 0.002


@pytest.mark.parametrize("preset", ["debug", "debug-gpt"])
def test_stages_to_hf_round_trip(preset):
    cfg = get_preset(preset)
    stages = build_stages(cfg, seed=3)
    hf = stages_to_hf(stages, cfg)
    ids = _tokens(cfg)
    with torch.no_grad():
        assert torch.allclose(hf(input_ids=ids).logits, forward_stages(stages, ids), atol=1e-5, rtol=0)
    for original, back in zip(stages, stages_from_hf(hf, cfg)):
        assert original.state_dict().keys() == back.state_dict().keys()
        assert all(torch.equal(v, back.state_dict()[k]) for k, v in original.state_dict().items())


def test_loss_ignores_masked_labels_like_transformers():
    cfg = get_preset("debug")
    stages = build_stages(cfg, seed=0)
    hf = stages_to_hf(stages, cfg)
    ids = _tokens(cfg)
    labels = ids.clone()
    labels[:, :5] = -100
    with torch.no_grad():
        hidden = stages[0].embed(ids)
        for stage in stages[1:]:
            hidden = stage(hidden)
        ours = stages[0].loss(hidden, labels)
        assert abs(ours.item() - hf(input_ids=ids, labels=labels).loss.item()) < 1e-5


# --- presets ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_are_valid_and_round_trip(name):
    cfg = get_preset(name)
    assert cfg.equal_stages()
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert ModelConfig.from_hf_config(cfg.to_hf_config(), cfg.n_stages) == cfg
    assert len(cfg.config_hash()) == 16 and int(cfg.config_hash(), 16) >= 0


def test_preset_sizes():
    debug = get_preset("debug")
    assert (debug.family, debug.d_model, debug.n_heads, debug.n_kv_heads) == ("llama", 64, 4, 2)
    assert (debug.n_layers, debug.n_stages, debug.seq_len, debug.vocab_size, debug.d_ff) == (4, 4, 64, 259, 172)
    assert get_preset("debug-gpt").family == "gpt"
    m124 = get_preset("124m")
    assert (m124.d_model, m124.n_heads, m124.n_stages, m124.n_layers, m124.seq_len) == (768, 12, 4, 12, 512)
    assert (get_preset("1.5b").d_model, get_preset("1.5b").seq_len) == (2048, 4096)
    assert get_preset("gpt-355m").vocab_size == 50257 and get_preset("500m").vocab_size == 32000
    with pytest.raises(UserError, match="'gpt-500m' is now 'gpt-355m'"):
        get_preset("gpt-500m")


def _size_in_name(name: str) -> float | None:
    """124m -> 124e6, 1.5b -> 1.5e9, gpt-355m -> 355e6; None for a name without a size (debug)."""
    m = re.search(r"(\d+(?:\.\d+)?)([mb])$", name)
    return float(m.group(1)) * (1e6 if m.group(2) == "m" else 1e9) if m else None


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_holds_what_its_name_says(name):
    """Counted on transformers' unsplit model, built on the meta device (no memory, no init): within 5 %."""
    cfg = get_preset(name)
    with torch.device("meta"):
        model = HF_CLASS[cfg.family](cfg.to_hf_config())
    params = sum(p.numel() for p in model.parameters())  # a tied head is counted once
    named = _size_in_name(name)
    if named is None:
        assert name.startswith("debug") and params < 1e6, (name, params)
        return
    assert abs(params / named - 1) < 0.05, f"{name} holds {params / 1e6:.1f}M parameters"


def test_stages_override_keeps_layers_per_stage():
    cfg = get_preset("124m", stages=6)
    assert (cfg.n_stages, cfg.n_layers) == (6, 18)
    assert get_preset("debug", stages=2, d_model=128).d_model == 128


def test_config_hash_is_canonical():
    cfg = get_preset("debug")
    assert cfg.config_hash() == get_preset("debug").config_hash()
    assert cfg.config_hash() != cfg.replace(seq_len=128).config_hash()


@pytest.mark.parametrize(
    "change",
    [
        {"family": "mamba"},
        {"d_model": 66},
        {"n_kv_heads": 3},
        {"n_layers": 3},  # fewer layers than the 4 stages
        {"dropout": 1.0},
        {"family": "gpt"},  # gpt has no GQA: n_kv_heads 2 != n_heads 4
    ],
)
def test_invalid_config_is_a_user_error(change):
    with pytest.raises(UserError):
        get_preset("debug").replace(**change)


def test_unknown_preset_and_fields():
    with pytest.raises(UserError, match="debug-gpt"):
        get_preset("tiny")
    with pytest.raises(UserError, match="unknown model config fields"):
        ModelConfig.from_dict({**get_preset("debug").to_dict(), "n_experts": 8})


def test_require_equal_stages_suggests_divisors():
    require_equal_stages(get_preset("debug"))
    with pytest.raises(UserError, match="1, 5"):
        require_equal_stages(_tiny("llama", 5, 2))


def test_unsupported_architecture_is_a_user_error():
    with pytest.raises(UserError, match="unsupported architecture 'bert'"):
        ModelConfig.from_hf_config(BertConfig(), n_stages=2)
    hf = get_preset("debug-gpt").to_hf_config()
    hf.scale_attn_by_inverse_layer_idx = True
    with pytest.raises(UserError, match="scale_attn_by_inverse_layer_idx"):
        ModelConfig.from_hf_config(hf, n_stages=2)
