"""`gwtf generate`: try a fine-tuned model (what `gwtf finetune` or `gwtf export` wrote) in transformers.

    gwtf generate --model runs/ft/hf --prompt "The capital of Italy is"
    gwtf generate --model runs/ft/hf --chat                          # a conversation on stdin; an empty line ends it
    gwtf generate --model runs/ft/adapter --base runs/ft/staged-hf --prompt "..."    # a peft adapter on its base

Greedy decoding unless `--temperature` is above 0 (then sampled, seeded by `--seed`). `--chat` renders the
conversation with the tokenizer's chat template (an instruct model's), one turn a line.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, TextIO

from gwtf.errors import UserError


def add_arguments(parser: argparse.ArgumentParser, command: str = "generate") -> None:
    parser.add_argument("--model", required=True, metavar="DIR", help="a Hugging Face model dir or a peft adapter dir")
    parser.add_argument("--base", default=None, metavar="DIR", help="the base model of a peft adapter --model")
    parser.add_argument("--prompt", action="append", default=[], help="text to continue (repeatable)")
    parser.add_argument("--chat", action="store_true", help="talk with it: turns on stdin, its chat template")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate per answer")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy; above: sampled")
    parser.add_argument("--seed", type=int, default=0, help="seeds the sampling")


def run(args: argparse.Namespace) -> int:
    if not args.prompt and not args.chat:
        raise UserError("give --prompt TEXT (repeatable) or --chat")
    if args.max_new_tokens < 1 or args.temperature < 0:
        raise UserError("--max-new-tokens must be at least 1 and --temperature at least 0")
    model, tokenizer = load_model(args.model, args.base)
    options = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "seed": args.seed}
    for prompt in args.prompt:
        print(f"{prompt}{generate_text(model, tokenizer, prompt, **options)}", flush=True)
    if args.chat:
        chat_loop(model, tokenizer, sys.stdin, sys.stdout, **options)
    return 0


def load_model(model_dir: str, base: str | None = None) -> tuple[Any, Any]:
    """(model in eval mode, tokenizer) from an exported Hugging Face directory, or a peft adapter on `base`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(model_dir)
    adapter = (path / "adapter_config.json").is_file()
    if not path.is_dir() or not (adapter or (path / "config.json").is_file()):
        raise UserError(
            f"{model_dir} is not a model directory; give what `gwtf finetune` wrote (OUT/hf or OUT/adapter)"
        )
    if adapter and base is None:
        raise UserError(f"{model_dir} is a peft adapter: give its base model with --base DIR (a Hugging Face dir)")
    try:
        model = AutoModelForCausalLM.from_pretrained(str(base if adapter else path))
        if adapter:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(path))
        tokenizer = AutoTokenizer.from_pretrained(str(path if (path / "tokenizer_config.json").is_file() else base))
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load {model_dir}: {str(exc).splitlines()[0]}") from exc
    return model.eval(), tokenizer


def generate_text(model: Any, tokenizer: Any, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0,
                  seed: int = 0) -> str:  # fmt: skip
    """The model's continuation of `prompt` (the new text only)."""
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    return _continue(model, tokenizer, ids, max_new_tokens, temperature, seed)


def _continue(model: Any, tokenizer: Any, ids: Any, max_new_tokens: int, temperature: float, seed: int) -> str:
    import torch

    torch.manual_seed(seed)
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             pad_token_id=pad, **sampling)  # fmt: skip
    return str(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))


def chat_loop(model: Any, tokenizer: Any, stdin: TextIO, stdout: TextIO, max_new_tokens: int = 64,
              temperature: float = 0.0, seed: int = 0, max_turns: int = 1000) -> list[dict[str, str]]:  # fmt: skip
    """A conversation: each line of `stdin` a user turn, each answer written to `stdout`; an empty line or the end of
    the input ends it (at most `max_turns`). Returns the conversation."""
    if not getattr(tokenizer, "chat_template", None):
        raise UserError("--chat needs a tokenizer with a chat template (an instruct model's); use --prompt instead")
    messages: list[dict[str, str]] = []
    for _ in range(max_turns):
        stdout.write("you> ")
        stdout.flush()
        line = stdin.readline()
        if not line.strip():
            break
        messages.append({"role": "user", "content": line.strip()})
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)["input_ids"]  # fmt: skip
        answer = _continue(model, tokenizer, ids, max_new_tokens, temperature, seed).strip()
        messages.append({"role": "assistant", "content": answer})
        stdout.write(f"model> {answer}\n")
    return messages
