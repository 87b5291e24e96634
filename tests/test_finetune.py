"""Fine-tuning a pretrained checkpoint across a swarm of processes (a relay crashes), exported back to transformers.

The fast tier uses a tiny random LLaMA made here with `save_pretrained` and a byte-level tokenizer built offline.
"""

import json
import random

import pytest
import torch

from gwtf.errors import UserError
from gwtf.launch.cli import main


def byte_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    for special in ("<s>", "</s>", "<pad>"):
        vocab[special] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("tiny")
    tok = byte_tokenizer()
    special = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, **special)  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(root / "src")
    tok.save_pretrained(root / "src")
    rng = random.Random(0)
    words = ["the", "swarm", "routes", "every", "microbatch", "through", "one", "replica", "of", "each", "stage"]
    corpus = root / "corpus"
    corpus.mkdir()
    for i in range(12):  # a few hundred sequences of 64 bytes: a small local corpus, as a user's notes would be
        lines = [" ".join(rng.choice(words) for _ in range(12)) + "." for _ in range(40)]
        (corpus / f"notes{i}.txt").write_text("\n".join(lines))
    return root


@pytest.mark.timeout(420)
def test_finetune_a_checkpoint_across_a_crashing_swarm_and_export_it(tiny_checkpoint, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gwtf.models.checkpoint import load_staged
    from gwtf.models.staged import forward_stages

    out = tmp_path / "ft"
    settings = ["optim.lr=3e-3", "train.microbatch_size=4", "train.microbatches_per_step=4"]
    src, corpus = str(tiny_checkpoint / "src"), str(tiny_checkpoint / "corpus")
    code = main(["finetune", "--from-pretrained", src, "--data", corpus,
                 "--stages", "2", "--replicas", "2", "--steps", "24", "--seq-len", "64", "--crash-at", "3",
                 "--router", "round-robin", "--out", str(out), "--timeout", "300",
                 *sum((["--set", s] for s in settings), [])])  # fmt: skip
    assert code == 0
    result = json.loads((out / "finetune.json").read_text())
    assert result["microbatches"]["lost"] == 0 and result["crash"]["stage"] == 1
    assert result["val_loss_after"] < result["val_loss_before"] - 0.5  # it learned the corpus

    model = AutoModelForCausalLM.from_pretrained(out / "hf")  # transformers loads it, with the tokenizer
    tok = AutoTokenizer.from_pretrained(out / "hf")
    ids = torch.tensor([tok("the swarm routes every")["input_ids"]])
    cfg, stages, _ = load_staged(out / "final-staged")  # the swarm's final model, as fetched from its nodes
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, forward_stages(stages, ids), rtol=0, atol=1e-5)
    generated = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert generated.shape[1] == ids.shape[1] + 8


def test_a_checkpoint_copy_with_other_weights_is_refused(tiny_checkpoint, tmp_path):
    from gwtf.launch.join import _check_local_copy
    from gwtf.models.checkpoint import ensure_staged, load_stage, read_manifest

    staged = ensure_staged(tiny_checkpoint / "src", 2, tmp_path / "staged")
    good = read_manifest(staged)["weights_hash"]
    _check_local_copy(str(staged), good, "checkpoint")  # the run's own copy
    with pytest.raises(UserError, match="another checkpoint"):
        _check_local_copy(str(staged), "0" * 16, "checkpoint")
    stage_file = staged / "stage_1.safetensors"
    data = bytearray(stage_file.read_bytes())
    data[-8:] = b"\x00" * 8  # damage the tail: a flipped weight
    stage_file.write_bytes(bytes(data))
    with pytest.raises(UserError, match="does not match its recorded hash|corrupt"):
        load_stage(staged, 1)


def _notes(folder, n: int, lines: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    words = ["the", "swarm", "routes", "every", "microbatch", "through", "one", "replica", "of", "each", "stage"]
    folder.mkdir()
    for i in range(n):
        (folder / f"note{i}.md").write_text("\n".join(" ".join(rng.choice(words) for _ in range(12)) + "."
                                                      for _ in range(lines)))  # fmt: skip


@pytest.mark.timeout(120)
@pytest.mark.parametrize("corpus", ["one-file", "four-notes"])
def test_a_one_file_corpus_and_four_notes_fine_tune(tiny_checkpoint, tmp_path, corpus):
    """What a person starts with (one text file; a folder of four short notes, at seq_len 128) is held out by rows
    and fine-tunes the tiny model in an in-process swarm of 2 stages x 2 replicas: the validation loss falls."""
    import asyncio

    from gwtf.launch.finetune import run_config, validation_loss
    from gwtf.models.checkpoint import ensure_staged
    from tests.support import InProcessSwarm
    from tests.test_swarm_inprocess import fast_swarm

    _notes(tmp_path / "notes", 4, 6)
    if corpus == "one-file":
        data = tmp_path / "notes.txt"
        data.write_text("\n\n".join(p.read_text() for p in sorted((tmp_path / "notes").iterdir())))
    else:
        data = tmp_path / "notes"
    staged = ensure_staged(tiny_checkpoint / "src", 2, tmp_path / "staged")
    settings = ["model.seq_len=128", "optim.lr=3e-3", "optim.warmup_steps=2", "train.microbatch_size=2",
                "train.microbatches_per_step=2", "train.steps=8", "train.val_batches=2"]  # fmt: skip
    cfg = run_config(staged, str(data), settings)

    async def go():
        swarm = InProcessSwarm(cfg, replicas=2, settings=fast_swarm())
        await swarm.start()
        try:
            assert len(swarm.data.val) >= 1 and len(swarm.data.train) >= 2
            before = validation_loss(cfg, stages_of(swarm))
            for _ in range(8):
                await swarm.step()
            return before, validation_loss(cfg, stages_of(swarm))
        finally:
            await swarm.close()

    before, after = asyncio.run(asyncio.wait_for(go(), timeout=100))
    assert after < before - 0.3, (before, after)


def stages_of(swarm):
    relays = {n.stage: n.replica.module for n in swarm.relays.values()}
    return [swarm.data_nodes[0].stage0.module] + [relays[k] for k in sorted(relays)]


def test_generate_continues_a_prompt_and_chats(tiny_checkpoint, tmp_path, capsys):
    """`gwtf generate` on an exported model: greedy continuation equals transformers' own; --chat renders the turns
    with the tokenizer's template and answers each."""
    import io

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gwtf.launch.generate import chat_loop, load_model

    src = tiny_checkpoint / "src"
    assert main(["generate", "--model", str(src), "--prompt", "the swarm", "--max-new-tokens", "5"]) == 0
    printed = capsys.readouterr().out.strip()
    model, tok = AutoModelForCausalLM.from_pretrained(src).eval(), AutoTokenizer.from_pretrained(src)
    ids = tok("the swarm", return_tensors="pt")["input_ids"]
    expected = tok.decode(model.generate(ids, max_new_tokens=5, do_sample=False)[0, ids.shape[1]:],
                          skip_special_tokens=True)  # fmt: skip
    assert printed == "the swarm" + expected
    model, tok = load_model(str(src))
    with pytest.raises(UserError, match="chat template"):
        chat_loop(model, tok, io.StringIO("hi\n"), io.StringIO())
    tok.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    out = io.StringIO()
    turns = chat_loop(model, tok, io.StringIO("hello\nagain\n\nnot read\n"), out, max_new_tokens=3)
    assert [t["role"] for t in turns] == ["user", "assistant", "user", "assistant"]
    assert out.getvalue().count("model> ") == 2
    assert main(["generate", "--model", str(tmp_path)]) == 2  # no prompt, no model: one line each


def test_resume_starts_from_the_last_export_and_bad_flags_are_one_line(tiny_checkpoint, tmp_path):
    import argparse
    import shutil

    from gwtf.launch.finetune import _read_prompts, _source
    from gwtf.models.checkpoint import ensure_staged

    def args(**kw):
        return argparse.Namespace(**{"from_pretrained": None, "resume": None, **kw})

    previous = tmp_path / "ft"
    ensure_staged(tiny_checkpoint / "src", 2, previous / "staged")
    assert _source(args(resume=str(previous))) == str(previous / "staged")  # no export yet: its staged copy
    shutil.copytree(previous / "staged", previous / "final-staged")  # as export_final writes it
    assert _source(args(resume=str(previous))) == str(previous / "final-staged")  # the last export first
    for bad, match in ((args(), "--from-pretrained PATH"), (args(resume=str(tmp_path)), "no final-staged"),
                       (args(resume=str(previous), from_pretrained="x"), "leave --from-pretrained out")):  # fmt: skip
        with pytest.raises(UserError, match=match):
            _source(bad)
    (tmp_path / "p.txt").write_text("\n  first  \n\nsecond\n")
    assert _read_prompts(str(tmp_path / "p.txt")) == ["first", "second"]
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(UserError, match="is empty"):
        _read_prompts(str(tmp_path / "empty.txt"))
    assert main(["finetune", "--data", "x", "--out", str(tmp_path / "o"), "--adapter-only",
                 "--from-pretrained", "y"]) == 2  # fmt: skip
