"""Data: tokenizer, corpus reading, document-level split, packing, cache and the microbatch schedule."""

import importlib.util
import lzma

import pytest
import torch

from gwtf import data as gdata
from gwtf.data import (
    DOC_CHARS,
    EMBEDDED_BYTES,
    EMBEDDED_CORPUS,
    ByteTokenizer,
    DataConfig,
    MicrobatchSchedule,
    embedded_corpus,
    load_data,
    load_tokenizer,
    pack,
    split_documents,
)
from gwtf.errors import UserError


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GWTF_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture
def corpus(tmp_path):
    """40 documents, each a unique marker repeated, so any row can be traced back to its document."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    for i in range(40):
        (folder / f"doc{i:02d}.txt").write_text(f"<d{i:02d}> " * 30)
    (folder / "image.bin").write_bytes(b"\x00\x01")  # not a text suffix: ignored
    return folder


def markers(rows: torch.Tensor) -> set[str]:
    text = ByteTokenizer().decode(rows.flatten().tolist())
    return {text[i : i + 5] for i in range(len(text) - 4) if text[i : i + 2] == "<d" and text[i + 4] == ">"}


def test_byte_tokenizer_round_trip():
    tok = load_tokenizer("byte")
    text = "def f(x):\n    return x  # café ✓"
    ids = tok.encode(text)
    assert tok.vocab_size == 259 and ids[0] == tok.bos_id == 256
    assert max(ids[1:]) < 256 and len(ids) == len(text.encode()) + 1
    assert tok.decode(ids + [tok.eos_id, tok.pad_id]) == text
    assert tok.encode(text, add_bos=False) == ids[1:]


def test_pack_exact_rows():
    rows = pack(["ab", "c"], ByteTokenizer(), seq_len=3)
    # bos a b eos bos c eos -> two full rows; the last token (eos) does not fill a row and is dropped
    assert rows.dtype == torch.long
    assert rows.tolist() == [[256, 97, 98], [257, 256, 99]]


def test_load_data_shapes_and_determinism(corpus):
    cfg = DataConfig(corpus=str(corpus), val_fraction=0.2, seed=1)
    a = load_data(cfg, seq_len=32, use_cache=False)
    b = load_data(cfg, seq_len=32, use_cache=False)
    assert a.train.shape[1] == a.val.shape[1] == 32 and len(a.train) > len(a.val) > 0
    assert torch.equal(a.train, b.train) and torch.equal(a.val, b.val) and a.corpus_hash == b.corpus_hash
    other = load_data(DataConfig(corpus=str(corpus), val_fraction=0.2, seed=2), seq_len=32, use_cache=False)
    assert other.corpus_hash != a.corpus_hash  # another seed holds out other documents


def test_val_documents_never_in_train(corpus):
    d = load_data(DataConfig(corpus=str(corpus), val_fraction=0.2), seq_len=16, use_cache=False)
    train_docs, val_docs = markers(d.train), markers(d.val)
    assert len(val_docs) >= 6 and len(train_docs) >= 28
    assert not train_docs & val_docs


def test_split_documents_disjoint_covering():
    docs = [f"doc {i}" for i in range(100)]
    train, val = split_documents(docs, 0.1, seed=0)
    assert len(val) == 10 and sorted(train + val) == sorted(docs) and not set(train) & set(val)
    assert split_documents(docs, 0.1, seed=0) == (train, val)


def test_long_file_is_cut_at_lines():
    text = "".join(f"line {i} " + "x" * (i % 70) + "\n" for i in range(3000))
    pieces = gdata._split_document(text)
    assert len(pieces) > 1 and "".join(pieces) == text
    assert all(len(p) <= DOC_CHARS and p.endswith("\n") for p in pieces)


def test_cache_is_used(corpus, monkeypatch):
    cfg = DataConfig(corpus=str(corpus))
    first = load_data(cfg, seq_len=16)

    def no_reading(*args, **kwargs):
        raise AssertionError("corpus read again despite the cache")

    monkeypatch.setattr(gdata, "_file_documents", no_reading)
    again = load_data(cfg, seq_len=16)
    assert torch.equal(first.train, again.train) and first.corpus_hash == again.corpus_hash
    with pytest.raises(AssertionError):  # another seq_len is another key
        load_data(cfg, seq_len=8)


def test_embedded_corpus_is_the_shipped_snapshot(monkeypatch):
    """The embedded corpus is the snapshot in gwtf/resources (with its PSF notice), never the running interpreter's
    own Lib/: the same rows and hash on every CPython build. The pinned hash is what reading CPython 3.11.7's Lib/
    gave before the snapshot (the snapshot is that Lib/'s first files in the same order, so nothing changed there)."""
    files = embedded_corpus()
    assert len(files) == 106 and sum(len(content) for _, content in files) == 2_001_578 >= EMBEDDED_BYTES
    assert all(name.endswith(".py") for name, _ in files)
    assert not any({"test", "tests", "idle_test", "site-packages"} & set(name.split("/")) for name, _ in files)
    notice = (EMBEDDED_CORPUS.parent / "embedded_corpus_LICENSE.txt").read_text()
    assert "PYTHON SOFTWARE FOUNDATION LICENSE VERSION 2" in notice and "CPython 3.11.7" in notice

    def no_stdlib(*args, **kwargs):
        raise AssertionError("the embedded corpus looked at the interpreter's files")

    monkeypatch.setattr(gdata.sysconfig, "get_paths", no_stdlib)
    monkeypatch.setattr(gdata, "_text_files", no_stdlib)
    d = load_data(DataConfig(max_bytes=200_000), seq_len=64, use_cache=False)
    assert d.train.shape == (3089, 64) and d.val.shape == (35, 64) and d.train.max() < 259
    assert d.corpus_hash == "48e403e43390b160d8d7e688731b865f66b63b47c9ba253ea2c8c6874caa0b3d"


def test_embedded_corpus_reads_like_a_folder_up_to_max_bytes():
    """Files in order until max_bytes, the last one in part; past the snapshot's size, all of it."""
    first = embedded_corpus()[0][1]
    assert gdata._embedded_documents(1000) == [first[:1000].decode()]
    everything = gdata._embedded_documents(10**9)
    assert everything == gdata._embedded_documents(EMBEDDED_BYTES + len(embedded_corpus()[-1][1]))
    assert sum(len(d.encode()) for d in everything) == 2_001_578


def test_embedded_snapshot_rebuilds_from_its_files(tmp_path):
    """The snapshot's archive is reproducible (no times or owners of the machine in it): from its files laid out as
    a Lib/ folder (with a test folder, left out), embedded_tar makes the shipped tar again, byte for byte."""
    lib = tmp_path / "Lib"
    for name, content in embedded_corpus():
        (lib / name).parent.mkdir(parents=True, exist_ok=True)
        (lib / name).write_bytes(content)
    (lib / "test").mkdir()
    (lib / "test" / "test_x.py").write_text("skipped")
    tar, total = gdata.embedded_tar(lib)
    assert total == 2_001_578 and tar == lzma.decompress(EMBEDDED_CORPUS.read_bytes())


def test_bad_corpus_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="not a file or folder"):
        load_data(DataConfig(corpus=str(tmp_path / "missing")), seq_len=16)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="no text files"):
        load_data(DataConfig(corpus=str(empty)), seq_len=16)
    tiny = tmp_path / "tiny"
    tiny.mkdir()
    for i in range(3):
        (tiny / f"{i}.txt").write_text("hi")
    with pytest.raises(UserError, match="too small"):
        load_data(DataConfig(corpus=str(tiny)), seq_len=64)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(UserError, match="empty.txt is empty"):
        load_data(DataConfig(corpus=str(tmp_path / "empty.txt")), seq_len=16)
    with pytest.raises(UserError, match="data.documents='pages'"):
        DataConfig(documents="pages")
    with pytest.raises(UserError):
        DataConfig(val_fraction=1.5)


@pytest.mark.skipif(importlib.util.find_spec("datasets") is not None, reason="datasets is installed")
def test_hf_corpus_without_datasets_is_a_user_error():
    with pytest.raises(UserError, match="datasets"):
        load_data(DataConfig(corpus="hf:wikitext:wikitext-2-raw-v1"), seq_len=16)


def test_missing_tokenizer_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_tokenizer(str(tmp_path / "nope.gguf"))


# --- schedule -------------------------------------------------------------------------------------------------


def rows_table(n: int) -> torch.Tensor:
    return torch.arange(n).unsqueeze(1).repeat(1, 4)  # row i holds i: row ids are readable from the data


def test_shards_disjoint_and_covering():
    sched = MicrobatchSchedule(rows_table(103), microbatch_size=2, microbatches_per_step=6, n_data_nodes=3, seed=5)
    shards = [set(s.tolist()) for s in sched.shards]
    assert sum(len(s) for s in shards) == 103 and set().union(*shards) == set(range(103))
    for step in range(40):  # past an epoch: every node still reads only its own shard
        for rank in range(3):
            ids = {int(mb[i, 0]) for mb in sched.microbatches(step, rank) for i in range(len(mb))}
            assert ids <= shards[rank]


def test_schedule_deterministic_and_reshuffles_epochs():
    a = MicrobatchSchedule(rows_table(64), 4, 2, 2, seed=0)
    b = MicrobatchSchedule(rows_table(64), 4, 2, 2, seed=0)
    # shard of 32 rows, 4 rows per step per node: one epoch = 8 steps
    epoch0 = torch.cat([a.row_ids(s, 1) for s in range(8)])
    epoch1 = torch.cat([a.row_ids(s, 1) for s in range(8, 16)])
    assert sorted(epoch0.tolist()) == sorted(epoch1.tolist()) == sorted(a.shards[1].tolist())
    assert not torch.equal(epoch0, epoch1)
    assert all(torch.equal(x, y) for s in (0, 9) for x, y in zip(a.global_batch(s), b.global_batch(s)))
    c = MicrobatchSchedule(rows_table(64), 4, 2, 2, seed=1)
    assert not torch.equal(a.row_ids(0, 0), c.row_ids(0, 0))


def test_global_batch_is_ranks_in_order():
    sched = MicrobatchSchedule(rows_table(64), 2, 4, 2, seed=0)
    for step in (0, 7, 20):
        expected = sched.microbatches(step, 0) + sched.microbatches(step, 1)
        got = sched.global_batch(step)
        assert len(got) == 4 and all(torch.equal(x, y) for x, y in zip(got, expected))
        assert all(mb.shape == (2, 4) for mb in got)


def test_one_and_two_nodes_see_the_same_rows_per_epoch():
    """The documented set semantics: over an epoch, the global batches of 1 and of 2 data nodes hold every train
    row exactly once (in another order and grouping)."""
    table = rows_table(64)
    one = MicrobatchSchedule(table, 2, 4, 1, seed=0)
    two = MicrobatchSchedule(table, 2, 4, 2, seed=0)
    for sched in (one, two):
        rows = torch.cat([mb[:, 0] for step in range(8) for mb in sched.global_batch(step)])
        assert sorted(rows.tolist()) == list(range(64))


def test_schedule_user_errors():
    with pytest.raises(UserError, match="multiple"):
        MicrobatchSchedule(rows_table(64), 2, 3, 2, seed=0)
    with pytest.raises(UserError, match="cannot be shared by 2 data nodes"):
        MicrobatchSchedule(rows_table(1), 1, 2, 2, seed=0)


def test_a_small_corpus_repeats_its_rows_within_a_step():
    """A fine-tuning corpus smaller than a step (a few notes): each step walks its shard more than once, every row
    as often as the others (give or take one), and each node still reads only its own shard."""
    sched = MicrobatchSchedule(rows_table(10), 4, 4, 2, seed=0)  # shards of 5 rows, 8 rows per node per step
    for rank in range(2):
        ids = sched.row_ids(0, rank).tolist()
        counts = {i: ids.count(i) for i in set(ids)}
        assert set(counts) == set(sched.shards[rank].tolist()) and set(counts.values()) <= {1, 2}


def test_hf_tokenizer_folder(tmp_path):
    """A Hugging Face tokenizer folder (built here, offline) behind the ByteTokenizer interface, packed likewise."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(tmp_path / "tok")
    tok = load_tokenizer(str(tmp_path / "tok"))
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (5, 1, 2, 2)  # no pad token: eos pads
    assert tok.encode("hello world") == [1, 3, 4] and tok.decode([1, 3, 4, 2]) == "hello world"
    assert pack(["hello world", "world"], tok, seq_len=3).tolist() == [[1, 3, 4], [2, 1, 4]]
