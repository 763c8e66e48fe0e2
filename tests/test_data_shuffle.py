"""Seeded document order (`data.shuffle_seed`): a permutation, the same for a seed, lazy on streams."""

from __future__ import annotations

import itertools
import json

import torch
from hypothesis import given, settings, strategies as st

from cluster.config import load_config
from cluster.data import load_texts, pack_sequences, shuffle_documents
from cluster.run import prepare


class CharTokenizer:
    """One id per character; BOS 1 and EOS 2 frame each document."""

    bos_token_id, eos_token_id = 1, 2

    def __call__(self, texts, **_):
        return {"input_ids": [[ord(c) for c in text] for text in texts]}


@settings(max_examples=50, deadline=None)
@given(count=st.integers(0, 40), buffer=st.integers(1, 10), seed=st.integers(0, 2**31))
def test_shuffle_is_a_permutation_fixed_by_the_seed(count, buffer, seed):
    docs = [f"doc {i}" for i in range(count)]
    once = list(shuffle_documents(docs, seed, buffer))
    assert sorted(once) == sorted(docs)
    assert once == list(shuffle_documents(iter(docs), seed, buffer))


def test_different_seeds_give_different_orders():
    docs = [f"doc {i}" for i in range(50)]
    orders = {tuple(shuffle_documents(docs, seed, buffer=20)) for seed in range(5)}
    assert len(orders) == 5 and tuple(docs) not in orders


def test_shuffle_reads_an_endless_stream_lazily():
    endless = (f"doc {i}" for i in itertools.count())
    first = list(itertools.islice(shuffle_documents(endless, seed=0, buffer=8), 5))
    assert len(set(first)) == 5
    assert all(int(doc.split()[1]) < 8 + 5 for doc in first)  # drawn from the buffer so far


def test_packing_a_local_jsonl_file_is_deterministic_for_a_seed(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": f"document number {i}"}) + "\n" for i in range(60)))

    def packed(seed):
        texts = load_texts(str(path))
        if seed is not None:
            texts = shuffle_documents(texts, seed, buffer=16)
        return pack_sequences(CharTokenizer(), texts, num_sequences=4, seq_len=32)

    assert torch.equal(packed(1), packed(1))
    assert not torch.equal(packed(1), packed(2))
    assert not torch.equal(packed(1), packed(None))


def test_run_prepare_applies_the_configured_seed(tiny_checkpoint, tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": f"doc {i} " * 5}) + "\n" for i in range(400)))

    def tokens(**data):
        config = load_config({"model": {"path": tiny_checkpoint("qwen3_moe"), "dtype": "float32"},
                              "data": {"source": str(path), "num_sequences": 4, "seq_len": 16, **data}})
        return prepare(config).tokens

    assert torch.equal(tokens(shuffle_seed=3), tokens(shuffle_seed=3))
    assert not torch.equal(tokens(shuffle_seed=3), tokens())
