"""Text in, token ids out: the documents a capture job reads and how they are packed.

Sources (`load_texts`):
  - ``"stdlib"``: docstrings of a fixed list of Python standard-library modules.
    Always available offline, deterministic for a given Python version, and
    large enough (over 1 MB) for a few hundred thousand tokens.
  - a local ``.txt`` (documents separated by blank lines), ``.jsonl``, ``.json``
    (a list of records or ``{"data": [...]}``) or ``.parquet`` file.
  - anything else is taken as a Hugging Face dataset id, ``"id"`` or
    ``"id:config"``, streamed with the optional ``datasets`` package; a local
    directory (``"dir"`` or ``"dir:config"``) is streamed the same way, as a
    downloaded copy of a hub dataset (data files, or a ``save_to_disk`` folder).

Packing (`pack_sequences`):
  Each document is tokenized without the tokenizer's own special tokens, then
  laid out as ``[bos] doc [eos]``. BOS is prepended only when the tokenizer
  defines ``bos_token_id`` (Llama/Mixtral style); tokenizers without one
  (Qwen, OLMoE) start documents directly, as those models saw in training.
  EOS is appended after every document so the model sees a real boundary
  between unrelated documents. The laid-out documents are concatenated into
  one stream and cut into consecutive ``seq_len`` windows; a document may
  span two sequences, and the tail beyond the last full window is dropped.
  Texts are read only until enough tokens exist, so streamed sources are
  consumed lazily.

Order (`shuffle_documents`, ``data.shuffle_seed``):
  Sources are read in a fixed order. With a seed, documents pass through a
  buffer of ``buffer`` documents from which one is drawn at random for each one
  read (as HF streaming's ``shuffle`` does), so a streamed source is shuffled
  without being read whole; the same seed gives the same sequences.
"""
from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cluster.stdlib_text import stdlib_docs
from common.config import positive
from common.errors import DataError

if TYPE_CHECKING:
    import torch

FILE_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")


@dataclass(frozen=True)
class DataConfig:
    """The `data:` config section: which text, and how much of it."""

    source: str = "stdlib"
    """'stdlib' (standard-library docstrings), a local .txt/.jsonl/.json/.parquet, an HF dataset id,
    or a local dataset directory."""
    text_field: str = "text"
    """Record field holding the text (jsonl/json/parquet/HF datasets)."""
    split: str = "train"
    """HF dataset split."""
    num_sequences: int = 16
    """Sequences to run."""
    shuffle_seed: int | None = None
    """Shuffle documents (buffered, like HF streaming) with this seed; empty keeps source order."""
    seq_len: int = 2048
    """Tokens per packed sequence."""

    def __post_init__(self):
        positive("data.num_sequences", self.num_sequences)
        positive("data.seq_len", self.seq_len)


def load_texts(source: str, text_field: str = "text", split: str = "train") -> Iterator[str]:
    """Documents of `source` in a deterministic order.

    Bad local paths fail here, at the call; per-record problems (missing
    field, bad JSON line) fail while iterating.
    """
    if source == "stdlib":
        return iter(_stdlib_texts())
    path = Path(source).expanduser()
    if path.is_file():  # an existing file wins over the `DIR:config` reading of a colon in its path
        return _file_texts(path, text_field)
    folder = source.rpartition(":")[0]
    if path.is_dir() or (folder and Path(folder).expanduser().is_dir()):
        return _hub_texts(source, text_field, split)  # a local dataset directory, streamed the same way
    if path.suffix.lower() in FILE_SUFFIXES or path.exists() or _looks_like_path(source):
        return _file_texts(path, text_field)
    return _hub_texts(source, text_field, split)


def pack_sequences(tokenizer, texts: Iterable[str], num_sequences: int, seq_len: int,
                   *, source: str = "the given texts") -> torch.LongTensor:
    """Pack documents into `num_sequences` consecutive windows of `seq_len` tokens.

    Returns a LongTensor  # [num_sequences, seq_len]
    `source` only names the texts in the too-little-text error.
    """
    for key, value in (("num_sequences", num_sequences), ("seq_len", seq_len)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise DataError(f"{key}={value!r} must be a positive integer")
    import torch  # imported here so the stdlib collector child runs without site-packages

    needed = num_sequences * seq_len
    stream: list[int] = []
    num_docs = 0
    for batch in _batches(texts, size=32):
        # Batched calls are much faster with fast tokenizers; the batch stays
        # small so streamed sources are not over-read.
        encoded = tokenizer(batch, add_special_tokens=False)["input_ids"]
        for ids in encoded:
            stream.extend(_frame_document(tokenizer, ids))
            num_docs += 1
        if len(stream) >= needed:
            return torch.tensor(stream[:needed], dtype=torch.long).view(num_sequences, seq_len)
    raise DataError(
        f"{source} gave only {len(stream)} tokens from {num_docs} documents, but "
        f"num_sequences * seq_len = {num_sequences} * {seq_len} = {needed} are needed; "
        "lower num_sequences or seq_len, or give more text")


def _frame_document(tokenizer, ids: list[int]) -> list[int]:
    """One document laid out as [bos] ids [eos], each only if the tokenizer has it."""
    bos = getattr(tokenizer, "bos_token_id", None)
    eos = getattr(tokenizer, "eos_token_id", None)
    head = [bos] if bos is not None else []
    tail = [eos] if eos is not None else []
    return head + list(ids) + tail


def shuffle_documents(texts: Iterable[str], seed: int, buffer: int = 1000) -> Iterator[str]:
    """`texts` in a seeded buffered-shuffle order: every document once, same seed same order."""
    import random

    rng = random.Random(seed)
    pool: list[str] = []
    for text in texts:
        if len(pool) < buffer:
            pool.append(text)
            continue
        pick = rng.randrange(buffer)
        yield pool[pick]
        pool[pick] = text
    rng.shuffle(pool)
    yield from pool


def _batches(texts: Iterable[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for text in texts:
        batch.append(text)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


# ---------------------------------------------------------------- local files

def _stdlib_texts() -> tuple[str, ...]:
    try:
        return stdlib_docs()
    except RuntimeError as err:
        raise DataError(f"{err}; use a local text file as data.source instead") from None


def _looks_like_path(source: str) -> bool:
    return source.startswith(("/", "./", "../", "~")) or "\\" in source


def _file_texts(path: Path, text_field: str) -> Iterator[str]:
    if not path.is_file():
        raise DataError(f"text file {str(path)!r} does not exist; check the path, "
                        "or use source='stdlib' for built-in offline text")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return _txt_documents(path)
    if suffix == ".jsonl":
        return _record_texts(_jsonl_records(path), text_field, str(path))
    if suffix == ".json":
        return _record_texts(iter(_json_records(path)), text_field, str(path))
    if suffix == ".parquet":
        return _parquet_texts(path, text_field)
    raise DataError(f"cannot read {str(path)!r}: unsupported file type {suffix!r}; "
                    f"use one of {', '.join(FILE_SUFFIXES)}")


def _txt_documents(path: Path) -> Iterator[str]:
    """Paragraphs of a text file: documents are separated by blank lines."""
    lines: list[str] = []
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                lines.append(line.rstrip("\n"))
            elif lines:
                yield "\n".join(lines)
                lines = []
    if lines:
        yield "\n".join(lines)


def _jsonl_records(path: Path) -> Iterator[dict]:
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}: line {number} is not valid JSON ({err.msg}); "
                                "each line must hold one JSON record") from err


def _json_records(path: Path) -> list:
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(f"{path} is not valid JSON ({err}); fix the file or use .jsonl") from err
    if isinstance(payload, dict) and isinstance(payload.get("data"), list):
        return payload["data"]
    if isinstance(payload, list):
        return payload
    found = f"an object with keys {sorted(payload)[:10]}" if isinstance(payload, dict) else \
        f"a {type(payload).__name__}"
    raise DataError(f"{path} must hold a list of records or {{\"data\": [...]}}, not {found}")


def _parquet_texts(path: Path, text_field: str) -> Iterator[str]:
    import pyarrow.parquet as pq  # only parquet sources need pyarrow

    parquet = pq.ParquetFile(path)
    fields = parquet.schema_arrow.names
    if text_field not in fields:
        raise _missing_field(text_field, fields, str(path))
    return _parquet_column(parquet, text_field)


def _parquet_column(parquet, text_field: str) -> Iterator[str]:
    for batch in parquet.iter_batches(columns=[text_field], batch_size=1024):
        for text in batch.column(0).to_pylist():
            if text:
                yield text


# ---------------------------------------------------------------- records (files and hub)

def _record_texts(records: Iterator, text_field: str, source: str) -> Iterator[str]:
    """The `text_field` of each record; empty texts are skipped."""
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise DataError(f"{source}: record {index} is a {type(record).__name__}, "
                            "not an object with a text field")
        if text_field not in record:
            raise _missing_field(text_field, list(record), source)
        text = record[text_field]
        if not isinstance(text, str):
            raise DataError(f"{source}: record {index} field {text_field!r} is a "
                            f"{type(text).__name__}, not a string; pass text_field= a string field")
        if text:
            yield text


def _missing_field(text_field: str, fields: list[str], source: str) -> DataError:
    return DataError(f"{source} has no field {text_field!r}; fields present: "
                     f"{sorted(fields)}; pass text_field= one of them")


# ---------------------------------------------------------------- Hugging Face datasets

def _hub_texts(source: str, text_field: str, split: str) -> Iterator[str]:
    try:
        import datasets  # optional: only hub sources need it
    except ImportError as err:
        raise DataError(f"source {source!r} is a Hugging Face dataset id, which needs the "
                        "optional 'datasets' package: pip install 'moe-outliers[datasets]' "
                        "(or use a local .txt/.jsonl/.json/.parquet file or 'stdlib')") from err
    dataset_id, config = _dataset_and_config(source)
    try:
        records = iter(_stream(datasets, dataset_id, config, split))
        first = next(records, None)
    except Exception as err:  # network, auth and not-found errors all share one fix
        raise DataError(f"could not read Hugging Face dataset {source!r} (split {split!r}): "
                        f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}. "
                        "Without network access, pass a local copy (a dataset directory or a "
                        ".txt/.jsonl/.json/.parquet file) or 'stdlib' instead") from None
    if first is None:
        return iter(())
    return _record_texts(_prepend(first, records), text_field, source)


def _dataset_and_config(source: str) -> tuple[str, str | None]:
    """'id', 'id:config', 'dir' or 'dir:config' -> (id or dir, config or None)."""
    if Path(source).expanduser().is_dir():
        return str(Path(source).expanduser()), None
    folder, _, config = source.rpartition(":")
    if folder and Path(folder).expanduser().is_dir():
        return str(Path(folder).expanduser()), config or None
    dataset_id, _, config = source.partition(":")
    return dataset_id, config or None


def _stream(datasets, dataset_id: str, config: str | None, split: str):
    """The split's records, streamed; a `save_to_disk` folder is read from its Arrow files."""
    folder = Path(dataset_id)
    if folder.is_dir() and ((folder / "state.json").exists() or (folder / "dataset_dict.json").exists()):
        saved = datasets.load_from_disk(str(folder))
        saved = saved[split] if isinstance(saved, datasets.DatasetDict) else saved
        return saved.to_iterable_dataset()
    return datasets.load_dataset(dataset_id, config, split=split, streaming=True)


def _prepend(first, rest: Iterator) -> Iterator:
    yield first
    yield from rest
