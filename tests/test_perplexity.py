import math

import numpy as np
import pytest
import torch

from palm_eval import PalmEvalError, load_tokenizer
from palm_eval.data import read_documents, token_stream
from palm_eval.model import PaLM, PaLMConfig
from palm_eval.perplexity import PerplexityTask, plan_windows, position_edges
from palm_eval.tasks import RunContext, format_length, parse_length, task_config

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is fastest

BYTE = load_tokenizer("byte")


def tiny(seed=0, **overrides) -> PaLM:
    torch.manual_seed(seed)
    config = dict(num_tokens=257, dim=32, depth=1, heads=2, dim_head=16, ignore_index=256)
    return PaLM(PaLMConfig(**{**config, **overrides})).eval()


def uniform() -> PaLM:
    """Zero embeddings make every hidden state and every logit 0: each of the 257 ids has probability 1/257."""
    model = tiny()
    with torch.no_grad():
        model.token_emb.weight.zero_()
    return model


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Three documents of printable bytes (no end-of-text inside): 2 x 400 + 456 bytes, 1,259 tokens."""
    root = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    for i, n in enumerate([400, 400, 456]):
        (root / f"doc{i}.txt").write_text("".join(chr(c) for c in rng.integers(32, 127, n)))
    return root


def run(model, source, lengths, batch_size=1, stride=None, limit=None, skip_target=256):
    ctx = RunContext(model=model, tokenizer=BYTE, train_length=64, stride=stride, limit=limit, skip_target=skip_target)
    config = {"task": "t", "task_type": "perplexity", "lengths": lengths, "data": {"source": str(source)}}
    task = PerplexityTask("t", config, ctx)
    items, results = task.items(), {}
    for i in range(0, len(items), batch_size):
        batch = items[i : i + batch_size]
        results.update(zip([k for k, _ in batch], task.evaluate(batch)))
    return task.aggregate(results)


def test_windows_score_every_target_once_with_enough_context():
    for n, length, stride in [(257, 64, 64), (257, 64, 16), (1000, 100, 30), (101, 100, 7)]:
        windows = plan_windows(n, length, stride)
        scored = [w.start + p + 1 for w in windows for p in range(w.score_from, length)]
        assert scored == list(range(1, scored[-1] + 1))  # each target once, in order
        assert n - 1 - scored[-1] < stride  # nothing left that another window could score
        assert all(w.score_from >= length - stride for w in windows[1:])  # >= L - S tokens of context
    with pytest.raises(PalmEvalError, match="needs 65 tokens"):
        plan_windows(64, 64, 64)


def test_position_buckets_are_log_spaced_up_to_the_length():
    edges = position_edges(32768)
    assert edges[0] == 0 and edges[-1] == 32768 and np.all(np.diff(edges) > 0)
    assert {1, 2, 4, 8, 1024, 16384} <= set(edges.tolist())
    assert 4 <= np.sum((edges > 8192) & (edges <= 16384)) <= 5  # four buckets per octave
    assert position_edges(64).tolist()[:10] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 10]


def test_lengths_parse_and_format():
    assert parse_length("2k", None) == 2048 and parse_length(512, None) == 512 and parse_length("4x", 64) == 256
    assert format_length(32768) == "32k" and format_length(500) == "500"
    with pytest.raises(PalmEvalError, match="training length"):
        parse_length("4x", None)
    assert task_config("text_ppl_2k")["lengths"] == ["2k"] and task_config("text_ppl_0.5x")["lengths"] == ["0.5x"]


def test_uniform_model_gives_vocab_size_perplexity_and_log2_vocab_bits_per_byte(corpus):
    entries, details = run(uniform(), corpus, [64])
    r = entries["t"]
    # 1,259 tokens -> 19 windows of 64 = 1,216 targets, 2 of them end-of-text (not scored: ignore_index == eos)
    assert r["sequences"] == 19 and r["scored_tokens"] == 1216 - 2 and r["scored_bytes"] == 1214
    assert r["eot_scored"] is False and r["nonfinite_tokens"] == 0
    assert r["perplexity"] == pytest.approx(257, rel=1e-6)
    assert r["nll"] == pytest.approx(math.log(257), rel=1e-6)
    assert r["bits_per_byte"] == pytest.approx(math.log2(257), rel=1e-6)
    curve = details["t"]["loss_by_position"]
    assert sum(curve["tokens"]) == r["scored_tokens"] and curve["end"][-1] == 64
    assert all(v == pytest.approx(math.log(257), rel=1e-6) for v in curve["nll"])

    scored_eot = run(uniform(), corpus, [64], skip_target=None)[0]["t"]
    assert scored_eot["eot_scored"] is True and scored_eot["scored_tokens"] == 1216
    # end-of-text has no bytes: its loss adds to the numerator only
    assert scored_eot["bits_per_byte"] == pytest.approx(1216 * math.log(257) / math.log(2) / 1214, rel=1e-6)


def test_token_weighted_not_mean_of_window_means(corpus):
    """Strided windows score 64 targets in the first window and 16 in the others: the two means differ."""
    model = tiny()
    entries, _ = run(model, corpus, [64], stride=16)
    stream = token_stream(read_documents(corpus), BYTE)[: 19 * 64 + 1]  # the span: whole sequences of 64
    sums, counts = [], []
    for w in plan_windows(len(stream), 64, 16):
        x = torch.tensor(stream[w.start : w.start + 65].astype(np.int64))[None]
        with torch.no_grad():
            nll, _ = model.score(x[:, :-1], x[:, 1:])
        keep = (torch.arange(64) >= w.score_from) & (x[0, 1:] != 256)
        sums.append(nll[0][keep].double().sum().item())
        counts.append(int(keep.sum()))
    token_weighted = sum(sums) / sum(counts)
    mean_of_means = float(np.mean(np.array(sums) / np.array(counts)))
    assert entries["t"]["nll"] == pytest.approx(token_weighted, rel=1e-9)
    assert entries["t"]["nll"] != pytest.approx(mean_of_means, rel=1e-6)
    assert entries["t"]["scored_tokens"] == sum(counts) == 1216 - 2


def test_batch_size_never_changes_a_number(corpus):
    reference = run(tiny(), corpus, [64, 128], batch_size=1)
    for batch_size in (2, 3, 7):
        assert run(tiny(), corpus, [64, 128], batch_size=batch_size) == reference


def test_strided_and_non_overlapping_agree_where_they_should(tmp_path):
    (tmp_path / "doc.txt").write_text("".join(chr(c) for c in np.random.default_rng(1).integers(32, 127, 256)))
    source = tmp_path / "doc.txt"  # 256 bytes + end-of-text = 257 tokens: 256 targets at every length
    model = tiny()
    assert run(model, source, [64], stride=64) == run(model, source, [64])

    # No positions and a window of 16 keys, one layer: a target's loss depends only on its 15 preceding
    # tokens, so every evaluation that gives each target >= 15 tokens of context (or the stream start)
    # must agree; non-overlapping windows of 64 cut the context at each window start and must not.
    local = tiny(pos_emb="none", attn_window=16)
    full = run(local, source, [256])[0]["t"]
    for length, stride in [(64, 16), (128, 64), (64, 48)]:
        strided = run(local, source, [length], stride=stride)[0]["t"]
        assert strided["stride"] == stride and strided["scored_tokens"] == full["scored_tokens"] == 255
        assert strided["nll"] == pytest.approx(full["nll"], rel=1e-5)
    assert run(local, source, [64])[0]["t"]["nll"] != pytest.approx(full["nll"], rel=1e-4)


def test_sweep_scores_the_same_targets_at_every_length(corpus):
    entries, details = run(tiny(), corpus, ["1x", "2x", 256])
    assert list(entries) == ["t_1x", "t_2x", "t_256"]
    assert {e["scored_tokens"] for e in entries.values()} == {1024 - 2}  # 4 x 256 targets, two end-of-text
    assert [e["sequences"] for e in entries.values()] == [16, 8, 4]
    assert len({e["data_fingerprint"] for e in entries.values()}) == 1


def test_nonfinite_losses_are_counted_never_averaged(corpus, monkeypatch):
    model = uniform()
    score = model.score

    def nan_at_position_5(tokens, targets):
        nll, greedy = score(tokens, targets)
        nll[:, 5] = float("nan")
        return nll, greedy

    monkeypatch.setattr(model, "score", nan_at_position_5)
    entries, details = run(model, corpus, [64])
    r = entries["t"]
    assert r["nonfinite_tokens"] == 19 and r["scored_tokens"] == 1214 - 19
    assert r["perplexity"] == pytest.approx(257, rel=1e-6)
    curve = details["t"]["loss_by_position"]
    assert curve["nonfinite"][curve["start"].index(5)] == 19 and sum(curve["nonfinite"]) == 19


def test_a_length_the_data_cannot_fill_is_a_clear_error(corpus):
    with pytest.raises(PalmEvalError, match=r"fewer than one sequence of 2,048 .*shorter length"):
        run(tiny(), corpus, ["2k"])
