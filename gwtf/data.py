"""Training data: tokenizers, corpora, packing into fixed-length rows, and the microbatch schedule.

The pipeline, from text to microbatches:

1. A corpus is a list of *documents*. Corpora: "embedded" (a fixed snapshot of Python standard library sources
   shipped with the package, see below), a text file or a folder of text files, fine-tuning rows (JSON lines,
   JSON, CSV or Parquet files, or a folder `datasets.save_to_disk` wrote: gwtf.records), or "hf:NAME[:CONFIG]"
   (the `datasets` package, online). In a folder each file is a document; a single text file is cut into its
   paragraphs (`data.documents`); any document is cut at line boundaries into pieces of at most `DOC_CHARS`
   characters. A row with chat `messages` or a `prompt`/`completion` pair is an `Example` with a loss mask.
2. Documents are split into train and validation BY DOCUMENT with a seeded permutation, so no validation text
   is ever trained on. A file corpus of few documents (under MIN_SPLIT_DOCS, or whose split leaves a side
   without a row: one file, a few notes) is held out BY TOKENS instead: a seeded share of the packed rows.
3. Each side is tokenized as `bos + text + eos` per document, concatenated in order, and cut into rows of
   `seq_len` tokens (the tail that does not fill a row is dropped); an Example's untrained tokens get the label
   IGNORE (-100) in a labels tensor beside the rows, which the data node's loss skips. The packed tensors are
   cached under `~/.cache/gwtf/data/` (or `$GWTF_CACHE_DIR/data/`) keyed by everything that determines them.
4. `MicrobatchSchedule` deals train rows to data nodes: each node owns a disjoint shard and walks it in a
   fresh seeded order every epoch.

The embedded corpus is `gwtf/resources/embedded_corpus.tar.xz` (PSF-licensed, notice beside it): 106 .py files,
2,001,578 bytes, of CPython 3.11.7's Lib/ (tests and site-packages left out), in the order in which a folder corpus
is sampled (by hash of the relative path), taken whole until EMBEDDED_BYTES. It is read like a folder: files in
that order until `data.max_bytes`, the last one in part; so any max_bytes up to EMBEDDED_BYTES gives the documents
that reading 3.11.7's own Lib/ gave, and the same corpus on every interpreter build. `write_embedded_corpus`
rebuilds the snapshot from an interpreter's Lib/ (a new snapshot changes every figure measured on the corpus).
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import lzma
import os
import re
import sysconfig
import tarfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from gwtf.errors import UserError
from gwtf.records import ChatRender, Document, is_saved_dataset, load_records, record_documents, record_files

logger = logging.getLogger(__name__)

DOC_CHARS = 32_768  # longest document; longer files are cut at line boundaries
TEXT_SUFFIXES = {
    ".txt", ".md", ".rst", ".py", ".pyi", ".c", ".h", ".cpp", ".rs", ".go", ".js", ".ts", ".java",
    ".toml", ".json", ".yaml", ".yml", ".html", ".css", ".sh", ".tex",
}  # fmt: skip
_SKIPPED_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}
_CACHE_VERSION = 2  # bump when the packing rule changes, so old caches are not reused
EMBEDDED_CORPUS = Path(__file__).resolve().parent / "resources" / "embedded_corpus.tar.xz"
EMBEDDED_BYTES = 2_000_000  # the snapshot holds whole files until at least this many bytes (DataConfig's default)
MIN_SPLIT_DOCS = 10  # a file corpus of fewer documents is held out by rows of tokens (a split by document would hold
# out far more than data.val_fraction, or a document too short to fill a row)
IGNORE = -100  # label of a token the loss skips (models.staged.IGNORE_INDEX)
DOCUMENT_RULES = ("auto", "files", "paragraphs", "windows")
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")


# ---------------------------------------------------------------------------------------------------------------
# Tokenizers


class Tokenizer(Protocol):
    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int

    def encode(self, text: str, add_bos: bool = True) -> list[int]: ...
    def decode(self, ids: list[int]) -> str: ...
    def identity(self) -> str: ...
    def chat_render(self) -> ChatRender | None: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255, plus bos=256, eos=257, pad=258. Needs no files and never fails."""

    vocab_size = 259
    bos_id = 256
    eos_id = 257
    pad_id = 258

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = list(text.encode("utf-8"))
        return [self.bos_id, *ids] if add_bos else ids

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def identity(self) -> str:
        return "byte"

    def chat_render(self) -> ChatRender | None:
        return None  # bytes have no chat template


class HFTokenizer:
    """A Hugging Face tokenizer behind the same small interface as ByteTokenizer."""

    def __init__(self, tok: Any, spec: str):
        self._tok = tok
        self._spec = spec
        self.vocab_size = len(tok)
        # Models without a pad (or bos) token use eos: padding is masked out and bos only marks a start.
        self.eos_id = _first_id(tok.eos_token_id, tok.sep_token_id, default=0)
        self.bos_id = _first_id(tok.bos_token_id, tok.cls_token_id, default=self.eos_id)
        self.pad_id = _first_id(tok.pad_token_id, default=self.eos_id)

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = list(self._tok.encode(text, add_special_tokens=False))
        return [self.bos_id, *ids] if add_bos else ids

    def decode(self, ids: list[int]) -> str:
        return str(self._tok.decode(ids, skip_special_tokens=True))

    def chat_render(self) -> ChatRender | None:
        """The tokenizer's chat template as text (messages, add_generation_prompt) -> str, or None without one."""
        if not getattr(self._tok, "chat_template", None):
            return None

        def render(messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
            return str(self._tok.apply_chat_template(messages, tokenize=False,
                                                     add_generation_prompt=add_generation_prompt))  # fmt: skip

        return render

    def identity(self) -> str:
        # The vocabulary itself, not the path, decides the tokens: two copies of a tokenizer share a cache.
        vocab = json.dumps(sorted(self._tok.get_vocab().items()), ensure_ascii=False)
        template = str(getattr(self._tok, "chat_template", None) or "")  # renders chat rows: part of the data
        return f"hf:{hashlib.sha256((vocab + template).encode()).hexdigest()[:16]}:{self.bos_id}:{self.eos_id}"


def _first_id(*candidates: int | None, default: int) -> int:
    return next((int(c) for c in candidates if c is not None), default)


def load_tokenizer(spec: str) -> ByteTokenizer | HFTokenizer:
    """ "byte", a Hugging Face tokenizer directory, or a GGUF file (its embedded tokenizer)."""
    if spec == "byte":
        return ByteTokenizer()
    path = Path(spec).expanduser()
    if not path.exists():
        raise UserError(f"tokenizer {spec!r} not found; use 'byte', a Hugging Face tokenizer folder or a .gguf file")
    from transformers import AutoTokenizer

    try:
        if path.is_file() and path.suffix == ".gguf":
            tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        else:
            tok = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError, ImportError) as exc:
        raise UserError(f"cannot load tokenizer from {spec!r}: {exc}") from exc
    return HFTokenizer(tok, spec)


# ---------------------------------------------------------------------------------------------------------------
# Corpora


@dataclass
class DataConfig:
    corpus: str = "embedded"  # "embedded" | a text file or folder | rows (.jsonl .json .csv .parquet, a saved
    # dataset folder) | "hf:NAME[:CONFIG]"
    tokenizer: str = "byte"  # "byte" | Hugging Face tokenizer folder | .gguf file
    max_bytes: int = 2_000_000  # cap on the corpus bytes read (keeps the debug preset fast)
    val_fraction: float = 0.05  # share of documents (or, with few documents, of rows) held out for validation
    seed: int = 0  # seeds the train/validation split
    text_field: str = "text"  # the column of plain text in rows (JSON, CSV, Parquet, a saved dataset)
    # How text files become documents: "files" (one per file), "paragraphs" (split at blank lines), "windows"
    # (one stream, held out by rows of tokens), "auto" (paragraphs for a single file, files for a folder)
    documents: str = "auto"

    def __post_init__(self) -> None:
        if self.documents not in DOCUMENT_RULES:
            raise UserError(f"data.documents={self.documents!r} is unknown; choose one of {', '.join(DOCUMENT_RULES)}")
        if self.max_bytes <= 0:
            raise UserError(f"data.max_bytes must be positive, got {self.max_bytes}")
        if not 0.0 < self.val_fraction < 1.0:
            raise UserError(f"data.val_fraction must be in (0, 1), got {self.val_fraction}")


@functools.cache
def _embedded_snapshot() -> bytes:
    try:
        return EMBEDDED_CORPUS.read_bytes()
    except OSError as exc:
        raise UserError(f"the embedded corpus {EMBEDDED_CORPUS} is missing ({exc}); reinstall gwtf") from exc


@functools.cache
def embedded_corpus() -> tuple[tuple[str, bytes], ...]:
    """The embedded corpus: (path relative to Lib/, content) per file, in reading order (module docstring)."""
    files = []
    try:
        with tarfile.open(fileobj=io.BytesIO(_embedded_snapshot()), mode="r:xz") as tar:
            for member in tar:
                fh = tar.extractfile(member) if member.isfile() else None
                if fh is not None:
                    files.append((member.name, fh.read()))
    except (OSError, EOFError, tarfile.TarError) as exc:
        raise UserError(f"the embedded corpus {EMBEDDED_CORPUS} is unreadable ({exc}); reinstall gwtf") from exc
    return tuple(files)


def embedded_corpus_id() -> str:
    """sha256 of the snapshot file: what the data cache is keyed by for the embedded corpus."""
    return hashlib.sha256(_embedded_snapshot()).hexdigest()


def _embedded_documents(max_bytes: int) -> list[str]:
    """The embedded corpus's files in order until max_bytes, the last one in part: what `_select_files` and
    `_file_documents` make of a folder."""
    docs, total = [], 0
    for _, content in embedded_corpus():
        if total >= max_bytes:
            break
        size = min(len(content), max_bytes - total)
        if size > 0:
            docs.extend(_split_document(content[:size].decode("utf-8", errors="replace")))
            total += size
    if total < max_bytes:
        logger.info("the embedded corpus holds %d bytes, less than data.max_bytes=%d: all of it is read", total,
                    max_bytes)  # fmt: skip
    return [d for d in docs if d.strip()]


def write_embedded_corpus(out: Path = EMBEDDED_CORPUS, stdlib: Path | None = None,
                          min_bytes: int = EMBEDDED_BYTES) -> int:  # fmt: skip
    """Rebuild the snapshot from an interpreter's Lib/ (the running one by default); returns its bytes of text.

    Maintenance only: nothing at run time reads the interpreter's own files. The archive is `embedded_tar`'s,
    xz-compressed (the compressed bytes may differ with another liblzma; the tar inside does not)."""
    tar, total = embedded_tar(Path(stdlib or sysconfig.get_paths()["stdlib"]), min_bytes)
    Path(out).write_bytes(lzma.compress(tar, format=lzma.FORMAT_XZ, preset=9))
    return total


def embedded_tar(root: Path, min_bytes: int = EMBEDDED_BYTES) -> tuple[bytes, int]:
    """The snapshot's uncompressed tar from a Lib/ folder, and its bytes of text: the .py files (test folders and
    installed packages left out) in `_select_files` order, whole, until min_bytes; no times, owners or modes of the
    machine, so the same files give the same bytes."""
    chosen = _select_files(root, _text_files(root, suffixes={".py"}), max_bytes=min_bytes)
    buf, total = io.BytesIO(), 0
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for path, _ in chosen:
            content = path.read_bytes()  # whole: the last file too, so any max_bytes up to min_bytes is covered
            info = tarfile.TarInfo(path.relative_to(root).as_posix())
            info.size, info.mode, info.mtime = len(content), 0o644, 0
            tar.addfile(info, io.BytesIO(content))
            total += len(content)
    return buf.getvalue(), total


def _text_files(root: Path, suffixes: set[str]) -> list[Path]:
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Prune in place so skipped trees (site-packages, tests, .git) are never walked.
        dirnames[:] = [d for d in dirnames if d not in _SKIPPED_DIRS and not d.startswith(".")]
        for name in filenames:
            if not name.startswith(".") and os.path.splitext(name)[1] in suffixes:
                files.append(Path(dirpath) / name)
    return sorted(files)


def _corpus_files(cfg: DataConfig) -> tuple[Path, list[Path]]:
    path = Path(cfg.corpus).expanduser()
    if path.is_file():
        if path.stat().st_size == 0:
            raise UserError(f"corpus file {path} is empty; put the text to fine-tune on in it")
        return path.parent, [path]
    if path.is_dir():
        files = _text_files(path, TEXT_SUFFIXES)
        if not files:
            raise UserError(f"corpus folder {cfg.corpus!r} holds no text files ({', '.join(sorted(TEXT_SUFFIXES))})")
        return path, files
    raise UserError(f"corpus {cfg.corpus!r} is not a file or folder; use 'embedded', a path, or 'hf:NAME[:CONFIG]'")


def _select_files(root: Path, files: list[Path], max_bytes: int) -> list[tuple[Path, int]]:
    """Files in a stable pseudo-random order (by hash of their relative path, so a capped corpus samples all of
    a folder rather than its alphabetical head), until max_bytes; the last file is read only in part."""
    order = sorted(files, key=lambda f: hashlib.sha1(f.relative_to(root).as_posix().encode()).hexdigest())
    chosen, total = [], 0
    for f in order:
        if total >= max_bytes:
            break
        size = min(f.stat().st_size, max_bytes - total)
        if size > 0:
            chosen.append((f, size))
            total += size
    return chosen


def _split_document(text: str) -> list[str]:
    """Cut a long text at line boundaries into pieces of at most DOC_CHARS characters."""
    pieces, start = [], 0
    while len(text) - start > DOC_CHARS:
        cut = text.rfind("\n", start, start + DOC_CHARS)
        end = cut + 1 if cut > start else start + DOC_CHARS
        pieces.append(text[start:end])
        start = end
    if start < len(text):
        pieces.append(text[start:])
    return pieces


def _file_documents(chosen: list[tuple[Path, int]], paragraphs: bool = False) -> list[str]:
    docs = []
    for path, size in chosen:
        with open(path, "rb") as fh:
            text = fh.read(size).decode("utf-8", errors="replace")
        for part in split_paragraphs(text) if paragraphs else [text]:
            docs.extend(_split_document(part))
    return [d for d in docs if d.strip()]


def split_paragraphs(text: str) -> list[str]:
    """A text's paragraphs (separated by blank lines), each with its trailing newline, surrounding blanks dropped."""
    return [p.strip("\n") + "\n" for p in _PARAGRAPH_BREAK.split(text) if p.strip()]


def _hf_documents(spec: str, max_bytes: int) -> Iterator[str]:
    name, _, config = spec.removeprefix("hf:").partition(":")
    try:
        import datasets  # type: ignore[import-not-found]
    except ImportError as exc:
        raise UserError(f"corpus {spec!r} needs the `datasets` package (pip install datasets)") from exc
    try:
        ds = datasets.load_dataset(name, config or None, split="train", streaming=True)
    except Exception as exc:  # datasets raises many types (network, missing config); all mean "cannot load"
        raise UserError(f"cannot load Hugging Face dataset {spec!r} (needs network access): {exc}") from exc
    total = 0
    for row in ds:
        text = row.get("text") if isinstance(row, dict) else None
        if not isinstance(text, str):
            raise UserError(f"dataset {spec!r} has no 'text' column")
        total += len(text.encode("utf-8"))
        yield from _split_document(text)
        if total >= max_bytes:
            return


# ---------------------------------------------------------------------------------------------------------------
# Packing and the cache


@dataclass
class PackedData:
    train: torch.Tensor  # (N, seq_len) int64
    val: torch.Tensor  # (M, seq_len) int64
    corpus_hash: str  # sha256 of the packed train and val tokens: equal hashes mean equal data everywhere
    # The targets beside the rows where some tokens are not trained on (IGNORE: a prompt, a user turn); None where
    # every token is (plain text). Same shapes as train and val.
    train_labels: torch.Tensor | None = None
    val_labels: torch.Tensor | None = None


def split_documents(docs: list[Document], val_fraction: float, seed: int) -> tuple[list[Document], list[Document]]:
    """Seeded split by document; both sides keep the corpus order. At least one document on each side."""
    if len(docs) < 2:
        raise UserError(f"the corpus has {len(docs)} document(s); at least 2 are needed for a validation split")
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(docs), generator=gen).tolist()
    n_val = min(max(1, round(val_fraction * len(docs))), len(docs) - 1)
    val_ids = set(perm[:n_val])
    train = [d for i, d in enumerate(docs) if i not in val_ids]
    val = [d for i, d in enumerate(docs) if i in val_ids]
    return train, val


def pack(docs: list[Document], tokenizer: Tokenizer, seq_len: int) -> torch.Tensor:
    """bos + text + eos per document, concatenated, cut into rows of seq_len tokens; the tail is dropped."""
    return pack_labeled(docs, tokenizer, seq_len)[0]


def pack_labeled(docs: list[Document], tokenizer: Tokenizer, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`pack`'s rows and their labels: the token itself where it is trained on, IGNORE where not."""
    ids: list[int] = []
    labels: list[int] = []
    for doc in docs:
        doc_ids, trained = encode_document(doc, tokenizer)
        ids.extend(doc_ids)
        labels.extend(i if t else IGNORE for i, t in zip(doc_ids, trained, strict=True))
    n = len(ids) // seq_len * seq_len
    rows = torch.tensor(ids[:n], dtype=torch.long).view(-1, seq_len)
    return rows, torch.tensor(labels[:n], dtype=torch.long).view(-1, seq_len)


def encode_document(doc: Document, tokenizer: Tokenizer) -> tuple[list[int], list[bool]]:
    """A document's tokens and whether each is trained on. Text: bos + text + eos, all trained (bos is never a
    target anyway: no token predicts the first of a document). A prompt/completion pair: bos (not trained), the prompt
    (not trained), the completion and an eos (trained: the model learns to stop). A conversation: its template's
    rendering alone (the template starts it and ends every turn), the assistant turns trained."""
    if isinstance(doc, str):
        ids = [*tokenizer.encode(doc, add_bos=True), tokenizer.eos_id]
        return ids, [True] * len(ids)
    # a conversation starts as its template starts it (SmolLM2's bos is its <|im_start|>: no second one)
    ids, trained = ([], []) if doc.chat else ([tokenizer.bos_id], [False])
    for text, train in doc.segments:
        seg = tokenizer.encode(text, add_bos=False)
        ids.extend(seg)
        trained.extend([train] * len(seg))
    if not doc.chat:
        ids.append(tokenizer.eos_id)
        trained.append(doc.segments[-1][1])
    return ids, trained


def _cache_dir() -> Path:
    base = os.environ.get("GWTF_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "gwtf")
    return Path(base) / "data"


def _cache_key(cfg: DataConfig, seq_len: int, tokenizer: Tokenizer, source: Any) -> str:
    key = {"v": _CACHE_VERSION, "cfg": asdict(cfg), "seq_len": seq_len, "tok": tokenizer.identity(), "src": source}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]


def _tensor_hash(*tensors: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(str(tuple(t.shape)).encode())
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()


def load_data(cfg: DataConfig, seq_len: int, tokenizer: Tokenizer | None = None, use_cache: bool = True) -> PackedData:
    """Read, split, tokenize and pack the corpus; deterministic from (cfg, seq_len, tokenizer)."""
    tokenizer = tokenizer or load_tokenizer(cfg.tokenizer)
    source, read, by_tokens = _corpus_reader(cfg, tokenizer)
    cache_path = _cache_dir() / f"{_cache_key(cfg, seq_len, tokenizer, source)}.pt"
    if use_cache and cache_path.exists():
        try:
            blob = torch.load(cache_path, weights_only=True)
            return PackedData(blob["train"], blob["val"], blob["corpus_hash"], blob.get("train_labels"),
                              blob.get("val_labels"))  # fmt: skip
        except (OSError, RuntimeError, KeyError) as exc:  # a torn or foreign file: rebuild it
            logger.warning("ignoring unreadable data cache %s: %s", cache_path, exc)
    data = _pack_split(read(), cfg, seq_len, tokenizer, by_tokens)
    if use_cache:
        _save_cache(cache_path, data)
    return data


def _corpus_reader(cfg: DataConfig, tokenizer: Tokenizer) -> tuple[Any, Any, bool | None]:
    """(what the cache is keyed by, a function reading the documents, whether to hold out by tokens: True, False,
    or None for "when there are few documents"). The embedded and hf corpora are always split by document (the
    rows every figure measured on them used)."""
    if cfg.corpus.startswith("hf:"):
        # a remote dataset cannot be stat'ed: keyed by name only
        return cfg.corpus, lambda: list(_hf_documents(cfg.corpus, cfg.max_bytes)), False
    if cfg.corpus == "embedded":  # the snapshot's own hash: the same on every interpreter
        return ["embedded", embedded_corpus_id()], lambda: _embedded_documents(cfg.max_bytes), False
    path = Path(cfg.corpus).expanduser()
    files = record_files(path)
    if files is not None or is_saved_dataset(path):
        stat = files if files is not None else sorted(p for p in path.rglob("*") if p.is_file())
        source = [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in stat]

        def read_records() -> list[Document]:
            rows = load_records(path, files)
            return list(record_documents(rows, path, cfg.text_field, tokenizer.chat_render(), cfg.max_bytes))

        return source, read_records, None
    root, text_files = _corpus_files(cfg)
    chosen = _select_files(root, text_files, cfg.max_bytes)
    rule = cfg.documents if cfg.documents != "auto" else ("paragraphs" if path.is_file() else "files")
    # Sizes and mtimes of what is read: an edited corpus is packed again.
    source = [(str(f), s, f.stat().st_mtime_ns) for f, s in chosen]
    return source, lambda: _file_documents(chosen, paragraphs=rule == "paragraphs"), True if rule == "windows" else None


def _pack_split(docs: list[Document], cfg: DataConfig, seq_len: int, tokenizer: Tokenizer,
                by_tokens: bool | None = False) -> PackedData:  # fmt: skip
    """Hold out documents, or rows of tokens (`by_tokens`; None: when there are few documents); pack each side."""
    if not docs:
        raise UserError(f"corpus {cfg.corpus!r} holds no text; give it some (a file, a folder of notes, rows)")
    if by_tokens is False or (by_tokens is None and len(docs) >= MIN_SPLIT_DOCS):
        train_docs, val_docs = split_documents(docs, cfg.val_fraction, cfg.seed)
        (train, train_labels), (val, val_labels) = (pack_labeled(d, tokenizer, seq_len) for d in (train_docs, val_docs))
        if (len(train) and len(val)) or by_tokens is False:
            if not (len(train) and len(val)):
                raise UserError(
                    f"corpus {cfg.corpus!r} is too small for seq_len {seq_len}: {len(train)} train and {len(val)} "
                    "validation rows; raise data.max_bytes or data.val_fraction, or use a larger corpus"
                )
            logger.info("packed %d train and %d validation rows of %d tokens from %d documents", len(train), len(val),
                        seq_len, len(docs))  # fmt: skip
            return _packed(train, val, train_labels, val_labels)
        logger.info("the held-out documents fill no row of %d tokens: holding out rows instead", seq_len)
    rows, labels = pack_labeled(docs, tokenizer, seq_len)
    if len(rows) < 2:
        raise UserError(
            f"corpus {cfg.corpus!r} is too small for seq_len {seq_len}: {len(rows)} row(s) of tokens, at least 2 "
            "are needed (one to train on, one to validate); give more text or a shorter model.seq_len"
        )
    # Few documents (one file, a handful of notes): a seeded share of the rows is validation. Rows do not overlap,
    # so no validation token is trained on.
    perm = torch.randperm(len(rows), generator=torch.Generator().manual_seed(cfg.seed))
    n_val = min(max(1, round(cfg.val_fraction * len(rows))), len(rows) - 1)
    val_ids, train_ids = perm[:n_val].sort().values, perm[n_val:].sort().values
    logger.info("%d document(s): held out %d of %d rows of %d tokens for validation", len(docs), n_val, len(rows),
                seq_len)  # fmt: skip
    return _packed(rows[train_ids], rows[val_ids], labels[train_ids], labels[val_ids])


def _packed(train: torch.Tensor, val: torch.Tensor, train_labels: torch.Tensor,
            val_labels: torch.Tensor) -> PackedData:  # fmt: skip
    """PackedData with the labels kept only where some token is not trained on (plain text has none)."""
    if not bool((train_labels == IGNORE).any() or (val_labels == IGNORE).any()):
        return PackedData(train, val, _tensor_hash(train, val))
    if not bool((train_labels != IGNORE).any()):
        raise UserError("no token of the training rows is trained on (every row is a prompt); give completions")
    return PackedData(train, val, _tensor_hash(train, val, train_labels, val_labels), train_labels, val_labels)


def _save_cache(path: Path, data: PackedData) -> None:
    # Write then rename: several processes of a local swarm may build the same cache at once.
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        blob = {"train": data.train, "val": data.val, "corpus_hash": data.corpus_hash}
        if data.train_labels is not None:
            blob.update(train_labels=data.train_labels, val_labels=data.val_labels)
        torch.save(blob, tmp)
        os.replace(tmp, path)
    except OSError as exc:  # a read-only home is no reason to stop training
        logger.warning("cannot write data cache %s: %s", path, exc)


# ---------------------------------------------------------------------------------------------------------------
# Microbatch schedule


class MicrobatchSchedule:
    """Which train rows each data node feeds at each step.

    The rows are permuted once with `seed` and cut into `n_data_nodes` contiguous, disjoint shards that cover
    all rows (sizes differ by at most one). Data node `rank` reads its shard as an endless stream: epoch e is
    the shard in a permutation seeded by (seed, rank, e). At every step it takes the next
    `microbatches_per_step / n_data_nodes` microbatches of `microbatch_size` rows from its stream.

    The global batch of a step is the concatenation over ranks, in rank order, of their microbatches: that is
    exactly the set of microbatches a swarm with these data nodes processes in that step. With one data node
    the global batch walks all train rows once per epoch; with n nodes each epoch of each shard does the same
    for that shard, so the union over nodes still sees every row once per (shard) epoch.
    """

    def __init__(self, train: torch.Tensor, microbatch_size: int, microbatches_per_step: int, n_data_nodes: int,
                 seed: int, labels: torch.Tensor | None = None):  # fmt: skip
        if n_data_nodes < 1 or microbatches_per_step % n_data_nodes != 0:
            raise UserError(
                f"train.microbatches_per_step ({microbatches_per_step}) must be a multiple of the number of data "
                f"nodes ({n_data_nodes}); change one of them"
            )
        self.train = train
        self.labels = labels  # PackedData.train_labels: the loss's targets where some tokens are not trained on
        self.microbatch_size = microbatch_size
        self.per_node = microbatches_per_step // n_data_nodes  # microbatches per node per step
        self.n_data_nodes = n_data_nodes
        self.seed = seed
        perm = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
        self.shards = [s.clone() for s in torch.tensor_split(perm, n_data_nodes)]  # row ids, disjoint, covering
        need = self.per_node * microbatch_size
        smallest = min(len(s) for s in self.shards)
        if smallest == 0:
            raise UserError(
                f"{len(train)} train rows cannot be shared by {n_data_nodes} data nodes; use a larger corpus or "
                "fewer data nodes"
            )
        if smallest < need:  # a small fine-tuning corpus: a step reads its rows more than once (several epochs)
            logger.warning("a data node's shard holds %d rows and a step reads %d: rows repeat within a step",
                           smallest, need)  # fmt: skip
        self._epoch_cache: dict[tuple[int, int], torch.Tensor] = {}

    def _epoch_order(self, rank: int, epoch: int) -> torch.Tensor:
        key = (rank, epoch)
        if key not in self._epoch_cache:
            if len(self._epoch_cache) > 4 * self.n_data_nodes:  # only the current epochs are needed
                self._epoch_cache.clear()
            gen = torch.Generator().manual_seed(hash_seed(self.seed, rank, epoch))
            shard = self.shards[rank]
            self._epoch_cache[key] = shard[torch.randperm(len(shard), generator=gen)]
        return self._epoch_cache[key]

    def row_ids(self, step: int, rank: int) -> torch.Tensor:
        """Train row indices data node `rank` uses at `step`, in microbatch order."""
        if not 0 <= rank < self.n_data_nodes:
            raise ValueError(f"rank {rank} out of range for {self.n_data_nodes} data nodes")
        size = len(self.shards[rank])
        need = self.per_node * self.microbatch_size
        positions = range(step * need, (step + 1) * need)
        return torch.stack([self._epoch_order(rank, p // size)[p % size] for p in positions])

    def microbatches(self, step: int, rank: int) -> list[torch.Tensor]:
        """The microbatches, each (microbatch_size, seq_len), that data node `rank` handles at `step`."""
        rows = self.train[self.row_ids(step, rank)]
        return list(rows.split(self.microbatch_size))

    def microbatch_labels(self, step: int, rank: int) -> list[torch.Tensor]:
        """The targets of `microbatches(step, rank)`: the rows themselves, or their labels (IGNORE where a token is
        not trained on) when the corpus has a loss mask."""
        if self.labels is None:
            return self.microbatches(step, rank)
        return list(self.labels[self.row_ids(step, rank)].split(self.microbatch_size))

    def global_batch(self, step: int) -> list[torch.Tensor]:
        """All microbatches of `step`: the concatenation over ranks, in rank order, of `microbatches`."""
        return [mb for rank in range(self.n_data_nodes) for mb in self.microbatches(step, rank)]


def hash_seed(*parts: int) -> int:
    """A 63-bit seed from integers; stable across processes and Python versions (unlike hash())."""
    digest = hashlib.sha256(",".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
