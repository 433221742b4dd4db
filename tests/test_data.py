import gzip
import json
import unicodedata

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from palm_eval import PalmEvalError, load_tokenizer
from palm_eval.data import (
    BLOCK_SIZE,
    builtin_documents,
    builtin_fingerprint,
    fingerprint,
    load_token_stream,
    read_documents,
    read_pretokenized,
    token_stream,
)


@pytest.fixture(scope="module")
def c4_docs(shared_data):
    return list(read_documents(shared_data("c4-validation-sample.parquet")))[:150]


def test_builtin_split_is_deterministic_disjoint_and_small():
    heldout, train = builtin_documents("heldout"), builtin_documents("train")
    assert heldout == builtin_documents("heldout")
    assert 0.02 < len(heldout) / (len(heldout) + len(train)) < 0.10
    assert not set(heldout) & set(train)
    assert builtin_fingerprint("heldout") == builtin_fingerprint("heldout") != builtin_fingerprint("train")
    assert list(read_documents("builtin:heldout")) == heldout
    with pytest.raises(PalmEvalError, match="builtin:heldout"):
        builtin_documents("test")


def test_token_stream_appends_eos_after_every_document():
    tok = load_tokenizer("byte")
    stream = token_stream(["ab", "", "c"], tok)
    assert stream.tolist() == [97, 98, 256, 256, 99, 256]
    assert token_stream(["ab", "c"], tok, append_eos=False).tolist() == [97, 98, 99]
    assert tok.token_byte_lengths()[stream].sum() == 3


def test_read_documents_formats(tmp_path, c4_docs):
    docs = c4_docs[:5]
    pq.write_table(pa.table({"text": docs, "url": ["u"] * 5}), tmp_path / "a.parquet")
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    with gzip.open(tmp_path / "c.json.gz", "wt") as f:
        f.write("".join(json.dumps({"text": d, "timestamp": 0}) + "\n" for d in docs))
    (tmp_path / "d.txt").write_text("one whole document\n\nwith paragraphs")
    for name in ("a.parquet", "b.jsonl", "c.json.gz"):
        assert list(read_documents(tmp_path / name)) == docs
    assert list(read_documents(tmp_path / "d.txt")) == ["one whole document\n\nwith paragraphs"]
    assert list(read_documents(tmp_path)) == [*docs, *docs, *docs, "one whole document\n\nwith paragraphs"]


def test_bad_sources_raise_one_line(tmp_path):
    with pytest.raises(PalmEvalError, match="data not found"):
        list(read_documents(tmp_path / "missing.jsonl"))
    (tmp_path / "bad.jsonl").write_text('{"txt": "x"}\n')
    with pytest.raises(PalmEvalError, match="no string `text` field"):
        list(read_documents(tmp_path / "bad.jsonl"))
    pq.write_table(pa.table({"input_ids": [[1, 2]]}), tmp_path / "ids.parquet")
    with pytest.raises(PalmEvalError, match="no `text` column"):
        list(read_documents(tmp_path / "ids.parquet"))
    (tmp_path / "broken.parquet").write_bytes(b"not parquet")
    with pytest.raises(PalmEvalError, match="not a readable parquet"):
        read_pretokenized(tmp_path / "broken.parquet")


def test_raw_and_pretokenized_paths_give_the_same_stream(tmp_path, c4_docs, neox_tokenizer):
    stream = token_stream(c4_docs, neox_tokenizer)
    assert stream[neox_tokenizer.eos_id == stream].size == len(c4_docs)
    blocks = len(stream) // BLOCK_SIZE
    assert blocks >= 2, "need several blocks to test joining"
    rows = stream[: blocks * BLOCK_SIZE].reshape(blocks, BLOCK_SIZE).astype(np.int64)  # the published layout
    table = pa.table({"input_ids": [r.tolist() for r in rows], "attention_mask": [[1] * BLOCK_SIZE] * blocks})
    pq.write_table(table, tmp_path / "c4-pretok.parquet")
    pretok = read_pretokenized(tmp_path / "c4-pretok.parquet")
    assert np.array_equal(pretok, stream[: blocks * BLOCK_SIZE])
    assert fingerprint(pretok) == fingerprint(stream[: blocks * BLOCK_SIZE].astype(np.int64))
    assert fingerprint(pretok) != fingerprint(stream[1 : blocks * BLOCK_SIZE + 1])
    # what the evaluator reads: a parquet of `input_ids` is taken as pre-tokenized, one of `text` is tokenized
    pq.write_table(pa.table({"text": c4_docs}), tmp_path / "c4-raw.parquet")
    raw = load_token_stream(tmp_path / "c4-raw.parquet", neox_tokenizer, max_tokens=BLOCK_SIZE + 1)
    assert np.array_equal(load_token_stream(tmp_path / "c4-pretok.parquet", neox_tokenizer, BLOCK_SIZE + 1), raw)


def test_token_bytes_sum_to_the_normalized_text_bytes(c4_docs, neox_tokenizer):
    stream = token_stream(c4_docs, neox_tokenizer)
    lengths = neox_tokenizer.token_byte_lengths()
    assert lengths[neox_tokenizer.eos_id] == 0
    expected = sum(len(unicodedata.normalize("NFC", d).encode("utf-8")) for d in c4_docs)
    assert lengths[stream].sum() == expected
