"""Text in, token ids out: the documents a capture job reads and how they are packed.

Sources (`load_texts`):
  - ``"stdlib"``: docstrings of a fixed list of Python standard-library modules.
    Always available offline, deterministic for a given Python version, and
    large enough (over 1 MB) for a few hundred thousand tokens.
  - a local ``.txt`` (documents separated by blank lines), ``.jsonl``, ``.json``
    (a list of records or ``{"data": [...]}``) or ``.parquet`` file.
  - anything else is taken as a Hugging Face dataset id, ``"id"`` or
    ``"id:config"``, streamed with the optional ``datasets`` package.

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

import functools
import importlib
import inspect
import json
import subprocess
import sys
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

FILE_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")

# Modules present on every CPython 3.10+ install (no tkinter, no modules
# removed in 3.13), sorted so the document order is fixed.
STDLIB_MODULES = tuple(sorted("""
    argparse array ast asyncio.base_events asyncio.events asyncio.futures
    asyncio.locks asyncio.queues asyncio.streams asyncio.subprocess asyncio.tasks
    asyncio.transports base64 binascii bisect builtins bz2 cProfile calendar cmath
    cmd code codecs codeop collections collections.abc colorsys compileall
    concurrent.futures concurrent.futures.process concurrent.futures.thread
    configparser contextlib contextvars copy csv dataclasses datetime dbm decimal
    difflib dis doctest email.charset email.feedparser email.generator email.header
    email.headerregistry email.message email.parser email.policy email.utils enum
    filecmp fileinput fnmatch fractions ftplib functools gc getopt getpass gettext
    glob graphlib gzip hashlib heapq hmac html html.parser http.client
    http.cookiejar http.cookies http.server imaplib importlib importlib.abc
    importlib.metadata importlib.resources importlib.util inspect io ipaddress
    itertools json json.decoder json.encoder linecache locale logging
    logging.handlers lzma mailbox marshal math mimetypes modulefinder
    multiprocessing.connection multiprocessing.managers multiprocessing.pool
    multiprocessing.queues multiprocessing.shared_memory multiprocessing.synchronize
    netrc numbers operator optparse os os.path pathlib pdb pickle pickletools
    pkgutil platform plistlib poplib pprint profile pstats py_compile pyclbr pydoc
    queue quopri random re reprlib rlcompleter runpy sched secrets selectors shelve
    shlex shutil signal smtplib socket socketserver sqlite3 ssl stat statistics
    string struct subprocess symtable sys sysconfig tarfile tempfile textwrap
    threading time timeit token tokenize trace traceback tracemalloc types typing
    unicodedata unittest.case unittest.loader unittest.mock unittest.runner
    unittest.suite urllib.error urllib.parse urllib.request urllib.response
    urllib.robotparser uuid venv warnings wave weakref wsgiref.handlers
    wsgiref.simple_server xml.dom.expatbuilder xml.dom.minidom xml.etree.ElementTree
    xml.sax.handler xml.sax.saxutils xmlrpc.client zipfile zipimport zlib zoneinfo
""".split()))


class DataError(ValueError):
    """A text source cannot be read or holds too little text."""


def load_texts(source: str, text_field: str = "text", split: str = "train") -> Iterator[str]:
    """Documents of `source` in a deterministic order.

    Bad local paths fail here, at the call; per-record problems (missing
    field, bad JSON line) fail while iterating.
    """
    if source == "stdlib":
        return iter(_stdlib_docs())
    path = Path(source).expanduser()
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


# ---------------------------------------------------------------- stdlib

@functools.cache
def _stdlib_docs() -> tuple[str, ...]:
    """Deduplicated, non-empty docstrings of STDLIB_MODULES, in a fixed order.

    Collected in a bare child interpreter (-I -S: no site-packages, no .pth
    hooks) because libraries patch stdlib objects on import (Ray replaces
    sys.excepthook and inspect.isgenerator); collecting in-process would make
    the text, and every tokenizer and batch built from it, depend on what the
    caller imported first.
    """
    child = subprocess.run([sys.executable, "-I", "-S", __file__], capture_output=True,
                           text=True, encoding="utf-8", check=False)
    if child.returncode != 0:
        raise DataError(f"collecting stdlib docstrings failed: {child.stderr.strip()[-500:]}; "
                        "use a local text file as the source instead")
    return tuple(json.loads(child.stdout))


def collect_stdlib_docs() -> list[str]:
    """The stdlib documents as seen by this interpreter (run in a bare child)."""
    seen: set[str] = set()
    docs: list[str] = []
    with warnings.catch_warnings():
        # Some modules and aliases (typing.io, ...) warn on access; irrelevant here.
        warnings.simplefilter("ignore", DeprecationWarning)
        for name in STDLIB_MODULES:
            docs.extend(_new_docs(name, seen))
    return docs


def _new_docs(name: str, seen: set[str]) -> Iterator[str]:
    """Docstrings of module `name` not yet in `seen` (which is updated)."""
    try:
        module = importlib.import_module(name)
    except ImportError:
        return  # a stripped-down Python build; the other modules still give enough text
    for obj in _documented_objects(module):
        doc = inspect.getdoc(obj)
        if doc and doc.strip() and doc not in seen:
            seen.add(doc)
            yield doc


def _documented_objects(module) -> Iterator[object]:
    """The module, then its public classes and functions, each class followed by its methods."""
    yield module
    for name in _public_names(module):
        value = getattr(module, name, None)
        if inspect.isroutine(value):
            yield value
        elif inspect.isclass(value):
            yield value
            for attr, member in sorted(vars(value).items()):
                if not attr.startswith("_") and (inspect.isroutine(member) or isinstance(member, property)):
                    yield member


def _public_names(module) -> list[str]:
    """`__all__` where defined: some modules (concurrent.futures) add lazily loaded
    names to their globals on first access, so `vars` would depend on what other
    code touched earlier."""
    names = getattr(module, "__all__", None)
    if names is None:
        names = [name for name in vars(module) if not name.startswith("_")]
    return sorted(set(names))


# ---------------------------------------------------------------- local files

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
    dataset_id, _, config = source.partition(":")
    try:
        records = iter(datasets.load_dataset(dataset_id, config or None, split=split, streaming=True))
        first = next(records, None)
    except Exception as err:  # network, auth and not-found errors all share one fix
        raise DataError(f"could not reach Hugging Face dataset {source!r} (split {split!r}): "
                        f"{type(err).__name__}: {err}. Without network access, pass a local "
                        ".txt/.jsonl/.json/.parquet file or 'stdlib' instead") from err
    if first is None:
        return iter(())
    return _record_texts(_prepend(first, records), text_field, source)


def _prepend(first, rest: Iterator) -> Iterator:
    yield first
    yield from rest


if __name__ == "__main__":
    # Child process of _stdlib_docs.
    json.dump(collect_stdlib_docs(), sys.stdout)
