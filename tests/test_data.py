"""Tests for cluster.data: text sources and sequence packing."""
import inspect
import itertools
import json
import sys
import types

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import given, settings, strategies as st

from cluster import stdlib_text
from cluster.data import load_texts, pack_sequences
from common.errors import DataError

BOS, EOS = 1, 2


class CharTokenizer:
    """One token per character (its code point), so positions are easy to predict."""

    def __init__(self, bos_token_id=BOS, eos_token_id=EOS):
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id

    def __call__(self, texts, add_special_tokens=True):
        assert add_special_tokens is False  # packing adds its own boundaries
        return {"input_ids": [[ord(c) for c in text] for text in texts]}


def framed(texts, bos=True):
    """The token stream packing should produce for `texts`."""
    stream = []
    for text in texts:
        stream += ([BOS] if bos else []) + [ord(c) for c in text] + [EOS]
    return stream


# ---------------------------------------------------------------- stdlib

def test_stdlib_is_large_deterministic_and_deduplicated(monkeypatch):
    docs = list(load_texts("stdlib"))
    # Libraries such as Ray patch stdlib functions; the text must not change.
    monkeypatch.setattr(inspect, "isgenerator", lambda obj: False)
    fresh = list(stdlib_text.stdlib_docs.__wrapped__())  # recomputed, bypassing the cache
    assert docs == fresh
    assert sum(len(doc) for doc in docs) >= 1_000_000
    assert len(set(docs)) == len(docs)
    assert all(doc.strip() for doc in docs)


# ---------------------------------------------------------------- local files

def test_txt_documents_are_split_on_blank_lines(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("first line\nstill first\n\n\n  \nsecond\n\nthird\n")
    assert list(load_texts(str(path))) == ["first line\nstill first", "second", "third"]


def test_an_existing_file_with_a_colon_in_its_path_is_read_as_that_file(tmp_path):
    # `DIR:config` names a dataset directory and its config; an existing file must not be read so
    # even when the part before its colon is a directory (timestamps, `granitemoe:embedding...`).
    (tmp_path / "runs").mkdir()
    corpus = tmp_path / "runs:2026-12-03" / "corpus.txt"  # "runs" before the colon is a directory
    corpus.parent.mkdir()
    corpus.write_text("first document\n\nsecond document\n")
    assert list(load_texts(str(corpus))) == ["first document", "second document"]


def test_jsonl_records_with_custom_field(tmp_path):
    path = tmp_path / "corpus.jsonl"
    rows = [{"body": "alpha", "id": 1}, {"body": "", "id": 2}, {"body": "beta", "id": 3}]
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n\n")
    assert list(load_texts(str(path), text_field="body")) == ["alpha", "beta"]


@pytest.mark.parametrize("payload", [
    [{"text": "one"}, {"text": "two"}],
    {"data": [{"text": "one"}, {"text": "two"}]},
])
def test_json_list_and_data_wrapper(tmp_path, payload):
    path = tmp_path / "corpus.json"
    path.write_text(json.dumps(payload))
    assert list(load_texts(str(path))) == ["one", "two"]


def test_json_with_other_shape_is_rejected(tmp_path):
    path = tmp_path / "corpus.json"
    path.write_text(json.dumps({"rows": []}))
    with pytest.raises(DataError, match=r"list of records.*keys \['rows'\]"):
        load_texts(str(path))


def test_parquet_records(tmp_path):
    path = tmp_path / "corpus.parquet"
    pq.write_table(pa.table({"text": ["a", "b", "c"], "n": [1, 2, 3]}), path)
    assert list(load_texts(str(path))) == ["a", "b", "c"]


def test_parquet_missing_field_lists_fields(tmp_path):
    path = tmp_path / "corpus.parquet"
    pq.write_table(pa.table({"content": ["a"], "lang": ["en"]}), path)
    with pytest.raises(DataError, match=r"no field 'text'.*\['content', 'lang'\].*text_field"):
        load_texts(str(path))


def test_jsonl_missing_field_lists_fields(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text(json.dumps({"content": "x", "url": "u"}) + "\n")
    with pytest.raises(DataError, match=r"no field 'text'.*\['content', 'url'\]"):
        list(load_texts(str(path)))


def test_bad_jsonl_line_names_line(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(DataError, match="line 2 is not valid JSON"):
        list(load_texts(str(path)))


@pytest.mark.parametrize("name", ["missing.jsonl", "missing.txt", "missing.parquet"])
def test_missing_file_is_named(tmp_path, name):
    path = tmp_path / name
    with pytest.raises(DataError, match=rf"{name}.*does not exist"):
        load_texts(str(path))


def test_relative_path_without_suffix_is_a_missing_file():
    with pytest.raises(DataError, match="does not exist"):
        load_texts("./no/such/corpus")


def test_unsupported_suffix(tmp_path):
    path = tmp_path / "corpus.csv"
    path.write_text("text\nhello\n")
    with pytest.raises(DataError, match=r"unsupported file type '.csv'.*\.jsonl"):
        load_texts(str(path))


# ---------------------------------------------------------------- Hugging Face datasets

def test_hub_source_without_datasets_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(DataError, match=r"pip install 'moe-outliers\[datasets\]'"):
        load_texts("HuggingFaceFW/fineweb-edu")


def fake_datasets(load_dataset):
    module = types.ModuleType("datasets")
    module.load_dataset = load_dataset
    return module


def test_hub_source_unreachable(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("no route to host")

    monkeypatch.setitem(sys.modules, "datasets", fake_datasets(offline))
    with pytest.raises(DataError, match=r"could not read.*fineweb-edu.*no route to host.*local copy"):
        load_texts("HuggingFaceFW/fineweb-edu")


def test_hub_source_streams_records_with_config(monkeypatch):
    calls = []

    def load_dataset(name, config, split, streaming):
        calls.append((name, config, split, streaming))
        return iter([{"text": "x"}, {"text": "y"}])

    monkeypatch.setitem(sys.modules, "datasets", fake_datasets(load_dataset))
    assert list(load_texts("org/set:sample-10BT", split="validation")) == ["x", "y"]
    assert calls == [("org/set", "sample-10BT", "validation", True)]


def local_dataset(root, files: int = 2, docs: int = 30):
    """A dataset directory as a user copies one from the hub: data files under data/."""
    (root / "data").mkdir(parents=True)
    for i in range(files):
        records = [{"id": i * docs + j, "text": f"Document {i * docs + j}: " + "words " * (j % 7 + 3)}
                   for j in range(docs)]
        (root / "data" / f"train-{i:05d}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return root


@pytest.fixture
def offline(monkeypatch):
    """No hub: datasets and huggingface_hub told to stay offline, as without network access."""
    import datasets

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)


def test_a_local_dataset_directory_is_streamed_with_the_real_package(tmp_path, offline):
    import datasets

    folder = local_dataset(tmp_path / "fineweb-copy")
    texts = load_texts(str(folder))
    assert not isinstance(texts, list)  # a lazy stream, not a list read whole
    want = [r["text"] for f in sorted((folder / "data").glob("*.jsonl"))
            for r in map(json.loads, f.read_text().splitlines())]
    assert list(texts) == want
    assert list(load_texts(f"{folder}:default")) == want  # 'dir:config' as 'id:config'
    with pytest.raises(DataError, match=r"has no field 'body'.*'id', 'text'"):
        list(load_texts(str(folder), text_field="body"))
    saved = tmp_path / "saved"
    datasets.Dataset.from_dict({"text": ["one", "two", "three"]}).save_to_disk(str(saved))
    assert list(load_texts(str(saved))) == ["one", "two", "three"]
    with pytest.raises(DataError, match=r"could not read.*split 'test'"):
        load_texts(str(folder), split="test")


def test_a_dataset_id_not_cached_fails_offline_in_one_line(offline):
    with pytest.raises(DataError, match=r"could not read Hugging Face dataset 'org/no-such-set'.*local copy"):
        load_texts("org/no-such-set")


# ---------------------------------------------------------------- packing

def test_packing_places_bos_and_eos_at_document_boundaries():
    ids = pack_sequences(CharTokenizer(), ["abc", "de", "fghij"], num_sequences=2, seq_len=5)
    a, b, c, d, e = (ord(ch) for ch in "abcde")
    assert ids.dtype == torch.long and ids.shape == (2, 5)
    assert ids.tolist() == [[BOS, a, b, c, EOS], [BOS, d, e, EOS, BOS]]


def test_packing_without_bos_token_only_appends_eos():
    tokenizer = CharTokenizer(bos_token_id=None)
    ids = pack_sequences(tokenizer, ["ab", "cd"], num_sequences=1, seq_len=6)
    assert ids.tolist() == [[ord("a"), ord("b"), EOS, ord("c"), ord("d"), EOS]]


@settings(max_examples=50, deadline=None)
@given(texts=st.lists(st.text(alphabet="xyz", max_size=9), min_size=1, max_size=12),
       num_sequences=st.integers(1, 4), seq_len=st.integers(1, 7))
def test_packing_is_the_framed_stream_cut_into_windows(texts, num_sequences, seq_len):
    stream = framed(texts)
    needed = num_sequences * seq_len
    if len(stream) < needed:
        with pytest.raises(DataError):
            pack_sequences(CharTokenizer(), texts, num_sequences, seq_len)
        return
    ids = pack_sequences(CharTokenizer(), texts, num_sequences, seq_len)
    assert ids.shape == (num_sequences, seq_len)
    assert ids.flatten().tolist() == stream[:needed]


def test_packing_stops_reading_once_enough_tokens_exist():
    endless = (f"doc {i}" for i in itertools.count())
    ids = pack_sequences(CharTokenizer(), endless, num_sequences=3, seq_len=16)
    assert ids.shape == (3, 16)


def test_packing_stdlib_is_deterministic():
    first = pack_sequences(CharTokenizer(), load_texts("stdlib"), 4, 64)
    second = pack_sequences(CharTokenizer(), load_texts("stdlib"), 4, 64)
    assert torch.equal(first, second)
    assert first[0, 0].item() == BOS


def test_too_little_text_names_source_counts_and_fix():
    with pytest.raises(DataError, match=r"corpus.txt gave only 9 tokens from 2 documents.*"
                                        r"2 \* 8 = 16.*lower num_sequences or seq_len"):
        pack_sequences(CharTokenizer(), ["abc", "de"], 2, 8, source="corpus.txt")


@pytest.mark.parametrize("key, args", [("num_sequences", (0, 4)), ("seq_len", (2, -1))])
def test_packing_rejects_non_positive_sizes(key, args):
    with pytest.raises(DataError, match=rf"{key}=-?\d+ must be a positive integer"):
        pack_sequences(CharTokenizer(), ["abc"], *args)
