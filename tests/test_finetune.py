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
    from gwtf.launch.join import _check_pretrained_copy
    from gwtf.models.checkpoint import ensure_staged, load_stage, read_manifest

    staged = ensure_staged(tiny_checkpoint / "src", 2, tmp_path / "staged")
    good = read_manifest(staged)["weights_hash"]
    _check_pretrained_copy(str(staged), good)  # the run's own copy
    with pytest.raises(UserError, match="another checkpoint"):
        _check_pretrained_copy(str(staged), "0" * 16)
    stage_file = staged / "stage_1.safetensors"
    data = bytearray(stage_file.read_bytes())
    data[-8:] = b"\x00" * 8  # damage the tail: a flipped weight
    stage_file.write_bytes(bytes(data))
    with pytest.raises(UserError, match="does not match its recorded hash|corrupt"):
        load_stage(staged, 1)
