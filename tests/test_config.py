"""Run config: TOML + overrides, type coercion, unknown keys, validation, dict round trip; optimizer schedule."""

import json

import pytest
import torch
from torch import nn

from gwtf.config import RunConfig, from_dict, load_config, to_dict
from gwtf.errors import UserError
from gwtf.optim import OptimConfig, lr_at, make_optimizer, set_lr

TOML = """
preset = "debug"
stages = 2

[model]
d_model = 32

[data]
corpus = "embedded"
max_bytes = 100000

[optim]
lr = 1
schedule = "constant"

[train]
steps = 7
microbatch_size = 2
"""


@pytest.fixture
def toml_file(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(TOML)
    return str(path)


def test_toml_then_overrides(toml_file):
    cfg = load_config(toml_file, ["train.steps=20", "optim.betas=[0.8, 0.9]", "train.seed=3", "data.corpus=/x/y z"])
    assert cfg.stages == 2 and cfg.model_overrides == {"d_model": 32}
    assert cfg.train.steps == 20 and cfg.train.microbatch_size == 2 and cfg.train.seed == 3
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float) and cfg.optim.schedule == "constant"
    assert cfg.optim.betas == (0.8, 0.9) and cfg.data.corpus == "/x/y z" and cfg.data.max_bytes == 100000
    model = cfg.model_config()
    assert (model.d_model, model.n_stages) == (32, 2)


def test_overrides_without_file():
    cfg = load_config(None, ["preset=debug", "stages=none", "optim.lr=2e-3", "model.dropout=0.1"])
    assert cfg.stages is None and cfg.optim.lr == 2e-3 and cfg.model_overrides == {"dropout": 0.1}
    assert load_config(None, []) == RunConfig()


@pytest.mark.parametrize(
    "override, named",
    [("train.stepz=3", "stepz"), ("trian.steps=3", "trian"), ("model.bogus=1", "bogus"), ("epochs=3", "epochs")],
)
def test_unknown_key_names_it_and_the_valid_ones(override, named):
    with pytest.raises(UserError, match=named) as info:
        load_config(None, [override])
    assert "valid" in str(info.value)


def test_unknown_key_in_toml(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[train]\nsteps = 3\nlearning_rate = 0.1\n")
    valid = "valid keys: activation_checkpointing, eval_every, microbatch_size"
    with pytest.raises(UserError, match=f"learning_rate.*{valid}"):
        load_config(str(path), [])


@pytest.mark.parametrize(
    "override", ["train.steps=abc", "train.steps=2.5", "optim.betas=0.9", "train.steps=0", "optim.schedule=linear",
                 "data.val_fraction=0", "preset=nope", "model.d_model=30", "notkeyvalue"],
)  # fmt: skip
def test_bad_values_are_user_errors(override):
    with pytest.raises(UserError):
        load_config(None, [override])


def test_missing_and_broken_files(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_config(str(tmp_path / "none.toml"), [])
    broken = tmp_path / "broken.toml"
    broken.write_text("[train\n")
    with pytest.raises(UserError, match="not valid TOML"):
        load_config(str(broken), [])


def test_dict_round_trip(toml_file):
    cfg = load_config(toml_file, ["optim.betas=[0.5, 0.6]"])
    d = json.loads(json.dumps(to_dict(cfg)))  # through JSON, as in the DHT run record
    assert from_dict(d) == cfg
    with pytest.raises(UserError, match="extra"):
        from_dict({**d, "extra": 1})


# --- optimizer -------------------------------------------------------------------------------------------------


def test_lr_schedule():
    cfg = OptimConfig(lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, 100, cfg) == pytest.approx(0.1) and lr_at(9, 100, cfg) == pytest.approx(1.0)
    assert lr_at(10, 100, cfg) == pytest.approx(1.0) and lr_at(99, 100, cfg) == pytest.approx(0.1)
    lrs = [lr_at(s, 100, cfg) for s in range(10, 100)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    const = OptimConfig(lr=1.0, warmup_steps=0, schedule="constant")
    assert {lr_at(s, 100, const) for s in range(100)} == {1.0}


def test_weight_decay_only_on_matrices():
    module = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    opt = make_optimizer(module, OptimConfig(weight_decay=0.5))
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 0.5 and plain["weight_decay"] == 0.0
    assert [p.dim() for p in decayed["params"]] == [2] and [p.dim() for p in plain["params"]] == [1, 1, 1]
    set_lr(opt, 0.25)
    assert all(g["lr"] == 0.25 for g in opt.param_groups)


def test_stagewise_optimizers_equal_one_optimizer():
    """AdamW is per parameter: one optimizer per stage steps exactly like one over the whole model."""
    torch.manual_seed(0)
    a, b = nn.Linear(3, 3), nn.Linear(3, 2)
    whole = nn.Sequential(a, b)
    copy_a, copy_b = nn.Linear(3, 3), nn.Linear(3, 2)
    copy_a.load_state_dict(a.state_dict())
    copy_b.load_state_dict(b.state_dict())
    cfg = OptimConfig()
    opt_whole, opts = make_optimizer(whole, cfg), [make_optimizer(copy_a, cfg), make_optimizer(copy_b, cfg)]
    x = torch.randn(5, 3)
    for _ in range(3):
        for opt in [opt_whole, *opts]:
            opt.zero_grad()
        whole(x).square().sum().backward()
        copy_b(copy_a(x)).square().sum().backward()
        for opt in [opt_whole, *opts]:
            opt.step()
    assert torch.equal(a.weight, copy_a.weight) and torch.equal(b.bias, copy_b.bias)


# ---------------------------------------------------------------------------------------------------------------
# every run setting is owned by a component's config, composed into RunConfig, and reachable by --set


def _other_value(value):
    """A valid value of the same type, different from `value` (enough to see that an override reached the field)."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value * 2 + 1
    if isinstance(value, tuple):
        return tuple(v / 2 for v in value)
    return None


CHOICES = {  # fields whose values are names: another valid name
    "data.text_field": "body",
    "data.documents": "paragraphs",
    "lora.targets": "q_proj,k_proj,v_proj,o_proj",
    "lora.dropout": 0.1,
    "data.corpus": "/srv/corpus.txt",
    "data.tokenizer": "/srv/tokenizer",
    "data.val_fraction": 0.1,
    "optim.min_lr_ratio": 0.2,
    "averaging.trim": 0.3,
    "iteration.stage0_copy_share": 1.0,
    "optim.schedule": "constant",
    "routing.router": "swarm",
    "recovery.strategy": "checkfree+",
    "averaging.aggregate": "median",
    "train.precision": "bf16",
    "wire.activations": "uint8",
    "wire.gradients": "blockwise8",
    "wire.averaging": "fp16",
    "wire.state": "bf16",
}


def _reachable_fields():
    import dataclasses

    from gwtf.config import SECTIONS

    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            yield f"{section}.{f.name}", getattr(cls(), f.name)


@pytest.mark.parametrize("key,default", list(_reachable_fields()))
def test_every_run_setting_is_reachable_by_set(key, default):
    """Each field of each component config is set by `--set section.field=value` and survives the run record's
    dict round trip (what bootstrap writes and every node reads)."""
    value = CHOICES.get(key, _other_value(default))
    assert value is not None and value != default, f"{key}: add a second value for {default!r} to CHOICES"
    literal = json.dumps(list(value) if isinstance(value, tuple) else value)
    cfg = load_config(None, [f"{key}={literal}"])
    section, name = key.split(".")
    assert getattr(getattr(cfg, section), name) == value
    assert getattr(getattr(from_dict(json.loads(json.dumps(to_dict(cfg)))), section), name) == value


def test_sections_cover_every_component_config():
    """The run config composes one config per component; nothing a run needs lives outside it."""
    from gwtf.config import SECTIONS

    assert set(SECTIONS) == {
        "data", "optim", "train", "transport", "membership", "routing", "recovery", "iteration", "averaging", "wire",
        "lora",
    }  # fmt: skip
    assert all(isinstance(getattr(RunConfig(), name), cls) for name, cls in SECTIONS.items())


@pytest.mark.parametrize(
    "override,named",
    [
        ("routing.router=fastest", "routing.router='fastest'"),
        ("routing.round_s=0", "round_s"),
        ("recovery.strategy=magic", "recovery.strategy='magic'"),
        ("recovery.strategy=checkpoint", "not a live swarm mode"),
        ("recovery.stage_timeout=-1", "recovery.stage_timeout"),
        ("membership.heartbeat_s=0", "membership.heartbeat_s"),
        ("membership.record_ttl_s=0.5", "must exceed membership.heartbeat_s"),
        ("transport.call_timeout=0", "call_timeout"),
        ("iteration.max_attempts=0", "iteration.max_attempts"),
        ("iteration.microbatch_timeout=0", "iteration.microbatch_timeout"),
        ("averaging.aggregate=mode", "averaging.aggregate"),
        ("averaging.timeout=0", "averaging.timeout"),
        ("stages=0", "stages=0"),
        ("preset=gpt5", "gpt5"),
        ("train.steps=0", "train.steps=0"),
    ],
)
def test_a_bad_run_setting_is_one_line_naming_it(override, named):
    with pytest.raises(UserError, match=named.replace("(", r"\(").replace(")", r"\)")) as err:
        load_config(None, [override])
    assert "\n" not in str(err.value)


def test_a_node_option_is_checked_before_anything_starts():
    from gwtf.runtime.spec import NodeOptions

    assert NodeOptions(capacity=2, region="Japan").region == "Japan"
    with pytest.raises(UserError, match="region 'mars' is not in the region table"):
        NodeOptions(region="mars")
    with pytest.raises(UserError, match="capacity=0"):
        NodeOptions(capacity=0)


def test_launcher_defaults_come_before_the_file_and_overrides(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('[routing]\nrouter = "swarm"\n')
    assert load_config(None, [], defaults=["routing.router=gwtf-p2p"]).routing.router == "gwtf-p2p"
    assert load_config(str(path), [], defaults=["routing.router=gwtf-p2p"]).routing.router == "swarm"
    assert load_config(str(path), ["routing.router=oracle"], defaults=["routing.router=gwtf-p2p"]).routing.router == (
        "oracle"
    )
