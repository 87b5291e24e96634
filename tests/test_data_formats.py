"""Fine-tuning data as people have it: one text file, a few notes, JSON lines (text, chat messages, prompt/completion),
CSV, Parquet and a saved `datasets` folder; the loss masks checked token by token; bad input as one line."""

import json

import pytest
import torch

from gwtf.data import IGNORE, DataConfig, MicrobatchSchedule, load_data, load_tokenizer
from gwtf.errors import UserError
from tests.test_finetune import byte_tokenizer

TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Capital of Italy?"},
    {"role": "assistant", "content": "Rome."},
    {"role": "user", "content": "And France?"},
    {"role": "assistant", "content": "Paris."},
]


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GWTF_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture
def tokenizer_dir(tmp_path):
    tok = byte_tokenizer()
    tok.chat_template = TEMPLATE
    tok.save_pretrained(tmp_path / "tok")
    return tmp_path / "tok"


def sentences(n: int, seed: int = 0) -> list[str]:
    import random

    rng = random.Random(seed)
    words = ["the", "swarm", "routes", "every", "microbatch", "through", "one", "replica", "of", "each", "stage"]
    return [" ".join(rng.choice(words) for _ in range(10)) + "." for _ in range(n)]


def test_one_text_file_is_cut_into_paragraphs_and_held_out_by_rows(tmp_path):
    """A single file with a few paragraphs (what used to fail with '1 document(s)'): validation rows are held out,
    never trained on, and the rows together are the whole file's tokens."""
    path = tmp_path / "notes.txt"
    path.write_text("\n\n".join(" ".join(sentences(6, seed=i)) for i in range(4)))
    data = load_data(DataConfig(corpus=str(path), val_fraction=0.1), seq_len=32, use_cache=False)
    assert len(data.val) >= 1 and len(data.train) > 5 * len(data.val) and data.train_labels is None
    rows = {tuple(r) for r in data.train.tolist()}
    assert not rows & {tuple(r) for r in data.val.tolist()}
    windows = load_data(DataConfig(corpus=str(path), documents="windows"), seq_len=32, use_cache=False)
    assert len(windows.train) + len(windows.val) >= len(data.train) + len(data.val) - 4  # fewer bos/eos, a few more


def test_a_folder_of_four_short_notes_fits_seq_len_128(tmp_path):
    """Four notes at seq_len 128 (the issue's '2 train and 0 validation rows'): held out by rows instead."""
    folder = tmp_path / "notes"
    folder.mkdir()
    for i in range(4):
        (folder / f"note{i}.md").write_text(" ".join(sentences(8, seed=i)))
    data = load_data(DataConfig(corpus=str(folder)), seq_len=128, use_cache=False)
    assert len(data.val) == 1 and len(data.train) >= 2
    MicrobatchSchedule(data.train, 8, 4, 1, seed=0).microbatches(0, 0)  # a step reads them (rows repeat)


def write_rows(path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_jsonl_csv_parquet_and_a_saved_dataset_give_the_same_text_rows(tmp_path):
    import datasets

    texts = [" ".join(sentences(3, seed=i)) for i in range(30)]
    write_rows(tmp_path / "a.jsonl", [{"text": t, "id": i} for i, t in enumerate(texts)])
    table = datasets.Dataset.from_dict({"body": texts})
    table.to_csv(str(tmp_path / "a.csv"), index=False)
    table.to_parquet(str(tmp_path / "a.parquet"))
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(tmp_path / "saved"))
    got = {
        "jsonl": load_data(DataConfig(corpus=str(tmp_path / "a.jsonl")), seq_len=32, use_cache=False),
        "csv": load_data(DataConfig(corpus=str(tmp_path / "a.csv"), text_field="body"), seq_len=32, use_cache=False),
        "parquet": load_data(
            DataConfig(corpus=str(tmp_path / "a.parquet"), text_field="body"), seq_len=32, use_cache=False
        ),  # fmt: skip
        "saved": load_data(DataConfig(corpus=str(tmp_path / "saved")), seq_len=32, use_cache=False),
    }
    first = got["jsonl"]
    assert len(first.train) > 20 and len(first.val) >= 1 and first.train_labels is None
    for name, data in got.items():  # the same 30 documents, split by document with the same seed
        assert torch.equal(data.train, first.train) and torch.equal(data.val, first.val), name


def test_prompt_completion_is_trained_on_the_completion_only(tmp_path):
    tok = load_tokenizer("byte")
    rows = [{"prompt": f"Q{i}: two plus two?", "completion": f" A{i}: four."} for i in range(12)]
    write_rows(tmp_path / "qa.jsonl", rows)
    data = load_data(DataConfig(corpus=str(tmp_path / "qa.jsonl")), seq_len=16, use_cache=False)
    ids = torch.cat([data.train, data.val]).flatten().tolist()
    labels = torch.cat([data.train_labels, data.val_labels]).flatten().tolist()
    assert len(ids) == len(labels) and data.train_labels.shape == data.train.shape
    # token by token: the bos and the prompt are IGNORE, the completion and its eos are their own ids
    stream = []
    for r in sorted(rows, key=lambda r: r["prompt"]):
        stream += [(tok.bos_id, False)] + [(i, False) for i in tok.encode(r["prompt"], add_bos=False)]
        stream += [(i, True) for i in tok.encode(r["completion"], add_bos=False)] + [(tok.eos_id, True)]
    expected = {(i, t) for i, t in stream}
    seen = {(i, lab != IGNORE) for i, lab in zip(ids, labels)}
    assert seen <= expected and all(lab in (IGNORE, i) for i, lab in zip(ids, labels))
    trained = tok.decode([i for i, lab in zip(ids, labels) if lab != IGNORE])
    assert "A" in trained and "Q" not in trained and "two plus" not in trained


def test_chat_messages_train_the_assistant_turns_only(tmp_path, tokenizer_dir):
    """The conversation through the tokenizer's chat template; token by token, exactly the assistant replies with
    their end-of-turn marker are trained on, and the whole rendering is the template's own."""
    from transformers import AutoTokenizer

    write_rows(tmp_path / "chat.jsonl", [{"messages": CHAT}] * 12)
    cfg = DataConfig(corpus=str(tmp_path / "chat.jsonl"), tokenizer=str(tokenizer_dir), val_fraction=0.1)
    tok = load_tokenizer(str(tokenizer_dir))
    data = load_data(cfg, seq_len=16, tokenizer=tok, use_cache=False)
    hf = AutoTokenizer.from_pretrained(tokenizer_dir)
    one = list(hf.apply_chat_template(CHAT, tokenize=True, return_dict=False))  # as the template renders it
    ids = torch.cat([data.train, data.val]).flatten().tolist()
    labels = torch.cat([data.train_labels, data.val_labels]).flatten().tolist()
    n = len(one)
    assert ids[:n] == one  # the first conversation, rendered by the template (the rows keep corpus order)
    trained = [lab != IGNORE for lab in labels[:n]]
    expected = [False] * n
    text = hf.apply_chat_template(CHAT, tokenize=False)
    for reply in ("Rome.<|im_end|>\n", "Paris.<|im_end|>\n"):
        start = len(tok.encode(text[: text.index(reply)], add_bos=False))
        for j in range(start, start + len(tok.encode(reply, add_bos=False))):
            expected[j] = True
    assert trained == expected
    assert tok.decode([i for i, t in zip(one, trained) if t]) == "Rome.<|im_end|>\nParis.<|im_end|>\n"


def test_the_loss_skips_masked_tokens():
    """The data node's loss (stage 0's) over labels with IGNORE: the mean over trained tokens only; a row with no
    trained token costs nothing rather than NaN."""
    from gwtf.models.presets import get_preset
    from gwtf.models.staged import build_stage

    head = build_stage(get_preset("debug", 2), 0, seed=0)
    hidden = torch.randn(2, 8, head.cfg.d_model)
    ids = torch.randint(0, 200, (2, 8))
    labels = ids.clone()
    labels[:, :5] = IGNORE
    logits = head.logits(hidden)[:, 4:-1]
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 5:].reshape(-1))
    torch.testing.assert_close(head.loss(hidden, labels), expected)
    assert head.loss(hidden, torch.full_like(ids, IGNORE)).item() == 0.0


def test_bad_rows_are_one_line_naming_the_file_and_what_to_do(tmp_path, tokenizer_dir):
    cases = []
    (tmp_path / "empty.jsonl").write_text("")
    cases.append(("empty.jsonl", {}, "empty.jsonl is empty"))
    write_rows(tmp_path / "other.jsonl", [{"body": "x"}] * 3)
    cases.append(("other.jsonl", {}, r"other.jsonl has no `text`.*it has body.*data.text_field"))
    write_rows(tmp_path / "chat.jsonl", [{"messages": CHAT}] * 3)
    cases.append(("chat.jsonl", {"tokenizer": "byte"}, "chat.jsonl holds chat `messages` but the tokenizer has no"))
    (tmp_path / "broken.csv").write_text('a,b\n1,"2\n')
    cases.append(("broken.csv", {"text_field": "a"}, "cannot read .*broken.csv as csv rows"))
    for name, extra, match in cases:
        with pytest.raises(UserError, match=match) as err:
            load_data(DataConfig(corpus=str(tmp_path / name), **extra), seq_len=16, use_cache=False)
        assert "\n" not in str(err.value), name
