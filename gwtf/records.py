"""Fine-tuning data as it comes: JSON lines, JSON, CSV and Parquet files and `datasets.save_to_disk` folders, read
through Hugging Face `datasets` (local files only: nothing here reads the network), and their rows as documents.

A row becomes a document by the columns it has, first match wins:

    messages              [{"role": ..., "content": ...}, ...]: a conversation, rendered with the tokenizer's chat
                          template; only the assistant turns are trained on (the loss mask), as TRL's
                          `assistant_only_loss` does
    prompt, completion    two strings: the loss is on the completion only (TRL's `completion_only_loss`)
    data.text_field       plain text ("text" unless set): every token is trained on

A document with a loss mask is an `Example`: its text in segments, each trained on or not. Rendering a conversation
one turn at a time (the template of messages[:i] is a prefix of that of messages[:i+1], as every common template
keeps it) gives each turn's segment without a template that marks generations (`{% generation %}`), which most
models' templates lack.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gwtf.errors import UserError

log = logging.getLogger(__name__)

# file suffix -> the `datasets` builder that reads it
RECORD_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
SAVED_DATASET_FILES = ("dataset_info.json", "state.json", "dataset_dict.json")  # what save_to_disk writes


@dataclass(frozen=True)
class Example:
    """A document with a loss mask: (text, trained) segments, in order."""

    segments: tuple[tuple[str, bool], ...]
    chat: bool = False  # a rendered conversation: its template marks the end of every turn (no eos added)

    def text(self) -> str:
        return "".join(t for t, _ in self.segments)


Document = str | Example
ChatRender = Callable[[list[dict[str, str]], bool], str]  # (messages, add_generation_prompt) -> text


def is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and any((path / name).is_file() for name in SAVED_DATASET_FILES)


def record_files(path: Path) -> list[Path] | None:
    """The record files a corpus path names (a file of a record format, or a folder holding only such files), or
    None when it is text (or a saved dataset, see `is_saved_dataset`)."""
    if path.is_file():
        suffix = path.suffix.lower()
        records = suffix in RECORD_FORMATS and (suffix != ".json" or _is_records_json(path))
        return [path] if records else None
    if path.is_dir() and not is_saved_dataset(path):
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
        if files and all(p.suffix.lower() in RECORD_FORMATS for p in files):
            return files
    return None


def _is_records_json(path: Path) -> bool:
    """A .json file holding rows (a list of objects, or one object per line), not a text document that happens to
    be JSON: decided from its first non-blank character."""
    with open(path, "rb") as fh:
        head = fh.read(4096).lstrip()
    return head[:1] in (b"[", b"{")


def load_records(path: Path, files: list[Path] | None) -> Any:
    """A `datasets.Dataset` of the rows in `files` (all of one format), or of the dataset saved at `path`."""
    import datasets

    datasets.disable_progress_bars()
    if files is None:
        return _load_saved(path)
    for f in files:
        if f.stat().st_size == 0:
            raise UserError(f'{f} is empty; put one row per line in it (e.g. {{"text": "..."}}) or remove it')
    formats = {RECORD_FORMATS[f.suffix.lower()] for f in files}
    if len(formats) != 1:
        raise UserError(f"{path} mixes {', '.join(sorted(formats))} files; keep one format per corpus folder")
    cache = Path(os.environ.get("GWTF_CACHE_DIR") or Path.home() / ".cache" / "gwtf") / "datasets"
    try:
        return datasets.load_dataset(formats.pop(), data_files=[str(f) for f in files], split="train",
                                     cache_dir=str(cache))  # fmt: skip
    except Exception as exc:  # noqa: BLE001 (pyarrow and datasets raise many types for a malformed file)
        raise UserError(f"cannot read {path} as {RECORD_FORMATS[files[0].suffix.lower()]} rows: "
                        f"{_one_line(exc)}; check the file's format") from exc  # fmt: skip


def _load_saved(path: Path) -> Any:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as exc:  # noqa: BLE001 (a damaged or foreign folder surfaces as many types)
        raise UserError(f"cannot load the saved dataset {path}: {_one_line(exc)}") from exc
    if isinstance(ds, datasets.DatasetDict):  # a dict of splits: train on "train" (or the only one)
        split = "train" if "train" in ds else next(iter(ds))
        log.info("%s holds splits %s: reading %r", path, list(ds), split)
        ds = ds[split]
    return ds


def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


def record_documents(ds: Any, where: Path, text_field: str, render: ChatRender | None,
                     max_bytes: int) -> Iterator[Document]:  # fmt: skip
    """The rows of `ds` as documents (module docstring), until max_bytes of their text."""
    columns = set(ds.column_names)
    to_doc = _row_reader(columns, where, text_field, render)
    total, skipped = 0, 0
    for row in ds:
        doc = to_doc(row)
        if doc is None:
            skipped += 1
            continue
        yield doc
        total += len((doc if isinstance(doc, str) else doc.text()).encode("utf-8"))
        if total >= max_bytes:
            break
    if skipped:
        log.warning("%s: %d row(s) with an empty or missing value were skipped", where, skipped)


def _row_reader(columns: set[str], where: Path, text_field: str,
                render: ChatRender | None) -> Callable[[dict], Document | None]:  # fmt: skip
    if "messages" in columns:
        if render is None:
            raise UserError(
                f"{where} holds chat `messages` but the tokenizer has no chat template; fine-tune an instruct "
                "model (its tokenizer has one) or give the rows a `text` column"
            )
        return lambda row: _chat(row["messages"], render, where)
    if {"prompt", "completion"} <= columns:
        return _prompt_completion
    if text_field in columns:
        return lambda row: row[text_field] if isinstance(row[text_field], str) and row[text_field].strip() else None
    raise UserError(
        f"{where} has no `{text_field}`, `messages` or `prompt`/`completion` column (it has "
        f"{', '.join(sorted(columns)) or 'none'}); name its text column with --set data.text_field=COLUMN"
    )


def _prompt_completion(row: dict) -> Example | None:
    prompt, completion = row["prompt"], row["completion"]
    if not isinstance(prompt, str) or not isinstance(completion, str) or not completion:
        return None
    return Example(((prompt, False), (completion, True)))


def _chat(messages: Any, render: ChatRender, where: Path) -> Example | None:
    if not messages:
        return None
    if not isinstance(messages, list) or not all(isinstance(m, dict) and {"role", "content"} <= set(m)
                                                 for m in messages):  # fmt: skip
        raise UserError(f'{where}: `messages` must be a list of {{"role": ..., "content": ...}}; got {messages!r:.80}')
    turns = [{"role": str(m["role"]), "content": str(m["content"])} for m in messages]
    return Example(tuple(chat_segments(turns, render, where)), chat=True)


def chat_segments(messages: list[dict[str, str]], render: ChatRender, where: Path) -> list[tuple[str, bool]]:
    """The conversation rendered turn by turn: (the template's text for each turn, trained on?). An assistant turn
    is split into its header (what `add_generation_prompt` adds: not trained) and its reply with the template's end
    of turn (trained)."""
    segments: list[tuple[str, bool]] = []
    done = ""
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            header = render(messages[:i], True)
            segments.append((_suffix(done, header, where), False))
            done = header
        text = render(messages[: i + 1], False)
        segments.append((_suffix(done, text, where), message["role"] == "assistant"))
        done = text
    return [(t, trained) for t, trained in segments if t]


def _suffix(prefix: str, text: str, where: Path) -> str:
    if not text.startswith(prefix):
        raise UserError(
            f"{where}: the tokenizer's chat template does not render a conversation as a prefix of its continuation, "
            "so turns cannot be told apart; give the rows as `prompt`/`completion` or `text` instead"
        )
    return text[len(prefix) :]
