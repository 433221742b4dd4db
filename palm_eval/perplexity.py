"""Perplexity of a token stream cut into evaluation sequences of exactly L tokens.

Window k feeds stream[k*S : k*S + L] and predicts the next token at every position. With S = L
(the default) windows do not overlap and every target is scored once; with S < L only the last S
targets of each window after the first are scored, so every one of them has at least L - S tokens of
context (the fair comparison of the ALiBi paper; HF's "perplexity of fixed-length models").

Every metric is token-weighted: sums over scored tokens divided by their count, never a mean of
per-window means. Non-finite token losses are counted and left out of every sum. Sums are made per
window in float64 and combined in window order, so batch size and sharding never change a number.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from palm_eval.errors import PalmEvalError
from palm_eval.model import PaLM
from palm_eval.data import fingerprint
from palm_eval.tasks import RunContext, Task, data_flag, format_length, parse_length, resolve_source


@dataclass(frozen=True)
class Window:
    start: int  # stream index of the first input token
    score_from: int  # first scored target position within the window


def plan_windows(n_tokens: int, length: int, stride: int) -> list[Window]:
    """Windows over a stream of n_tokens (inputs and targets) that score every target after the first token once."""
    if not 0 < stride <= length:
        raise PalmEvalError(f"stride must be between 1 and the length {length}, got {stride}")
    if n_tokens < length + 1:
        raise PalmEvalError(f"a sequence of {length:,} tokens needs {length + 1:,} tokens of data, got {n_tokens:,}")
    count = (n_tokens - 1 - length) // stride + 1
    return [Window(k * stride, 0 if k == 0 else length - stride) for k in range(count)]


def position_edges(length: int) -> np.ndarray:
    """Log-spaced bucket edges over target positions 0..length: 0, 1, 2, 3, 4, 5, 6, 7, 8, 10, ..., length.

    Four buckets per octave, so the curve beyond the training length has several points per doubling.
    """
    powers = {round(2 ** (i / 4)) for i in range(4 * math.ceil(math.log2(max(length, 2))) + 1)}
    return np.array(sorted({0, length} | {p for p in powers if p < length}), dtype=np.int64)


def score_windows(
    model: PaLM,
    stream: np.ndarray,
    windows: list[Window],
    length: int,
    byte_lengths: np.ndarray,
    skip_target: int | None,
) -> list[dict]:
    """Score one batch of windows; per window: finite nll sum, counts, bytes and per-bucket sums."""
    rows = np.stack([stream[w.start : w.start + length + 1] for w in windows]).astype(np.int64)
    x = torch.from_numpy(rows).to(next(model.parameters()).device)
    with torch.no_grad():
        nll, _ = model.score(x[:, :-1], x[:, 1:])
    nll = nll.double().cpu().numpy()
    targets = rows[:, 1:]
    edges = position_edges(length)
    positions = np.arange(length)
    out = []
    for row, w in enumerate(windows):
        scored = positions >= w.score_from
        if skip_target is not None:
            scored &= targets[row] != skip_target
        finite = scored & np.isfinite(nll[row])
        values = np.where(finite, nll[row], 0.0)
        out.append(
            {
                "nll_sum": math.fsum(values[finite]),
                "tokens": int(finite.sum()),
                "nonfinite": int((scored & ~finite).sum()),
                "bytes": int(byte_lengths[targets[row][finite]].sum()),
                "b_nll": np.add.reduceat(values, edges[:-1]).tolist(),
                "b_tok": np.add.reduceat(finite.astype(np.int64), edges[:-1]).tolist(),
                "b_nf": np.add.reduceat((scored & ~finite).astype(np.int64), edges[:-1]).tolist(),
                "tokens_in": length,
            }
        )
    return out


def summarize(results: list[dict], length: int) -> tuple[dict, dict]:
    """Metrics and loss-by-position of one length from its windows' results (in window order)."""
    nll_sum = math.fsum(r["nll_sum"] for r in results)
    tokens = sum(r["tokens"] for r in results)
    nbytes = sum(r["bytes"] for r in results)
    nll = nll_sum / tokens if tokens else None
    metrics = {
        "nll": nll,
        "perplexity": math.exp(nll) if nll is not None and nll < 709 else None,  # exp overflows float64 above 709
        "bits_per_byte": nll_sum / math.log(2) / nbytes if nbytes else None,
        "scored_tokens": tokens,
        "scored_bytes": nbytes,
        "nonfinite_tokens": sum(r["nonfinite"] for r in results),
        "sequences": len(results),
    }
    edges = position_edges(length)
    b_sum = [math.fsum(r["b_nll"][i] for r in results) for i in range(len(edges) - 1)]
    b_tok = [sum(r["b_tok"][i] for r in results) for i in range(len(edges) - 1)]
    loss_by_position = {
        "start": edges[:-1].tolist(),
        "end": edges[1:].tolist(),
        "nll": [s / t if t else None for s, t in zip(b_sum, b_tok)],
        "tokens": b_tok,
        "nonfinite": [sum(r["b_nf"][i] for r in results) for i in range(len(edges) - 1)],
    }
    return metrics, loss_by_position


class PerplexityTask(Task):
    """One or more lengths over the same tokens: the span is a whole number of the longest sequences.

    `limit` (option or task config) is the number of longest sequences; shorter lengths (and strided
    windows) cover exactly the same targets, so a sweep compares lengths on identical text.
    """

    def __init__(self, name: str, config: dict, ctx: RunContext):
        super().__init__(name, config, ctx)
        self.lengths = [(str(spec), parse_length(spec, ctx.train_length, name)) for spec in config["lengths"]]
        self.sources = resolve_source(name, config, ctx)
        longest = max(length for _, length in self.lengths)
        limit = ctx.limit if ctx.limit is not None else config.get("limit")
        stream = ctx.token_stream(self.sources, None if limit is None else limit * longest + 1)
        sequences = (len(stream) - 1) // longest
        if sequences == 0:
            raise PalmEvalError(
                f"{name}: the data ({', '.join(self.sources)}) gives {len(stream):,} tokens, fewer than one "
                f"sequence of {longest:,} needs ({longest + 1:,}); give more text "
                f"({data_flag(config) or 'a larger source'}) or a shorter length"
            )
        if limit is not None and sequences < limit:
            ctx.warn(f"{name}: the data fills only {sequences} sequences of {longest:,} tokens (--limit {limit})")
        self.stream = stream[: sequences * longest + 1]
        self.data_fingerprint = fingerprint(self.stream)
        self.skip_target = ctx.skip_target
        self.strides = {length: min(ctx.stride or length, length) for _, length in self.lengths}
        self.windows = {n: plan_windows(len(self.stream), n, stride) for n, stride in self.strides.items()}

    def entry_name(self, spec: str, length: int) -> str:
        if len(self.lengths) == 1:
            return self.name
        return f"{self.name}_{spec if spec.endswith('x') else format_length(length)}"

    def fingerprint(self) -> dict:
        return {"data": self.data_fingerprint}

    def items(self) -> list[tuple[str, tuple[int, Window]]]:
        return [(f"{n}:{i}", (n, w)) for n, windows in self.windows.items() for i, w in enumerate(windows)]

    def evaluate(self, batch: list[tuple[str, tuple[int, Window]]]) -> list[dict]:
        out = []
        for length in dict.fromkeys(length for _, (length, _) in batch):  # a batch may straddle two lengths
            windows = [w for _, (n, w) in batch if n == length]
            out += score_windows(self.ctx.model, self.stream, windows, length, self.ctx.byte_lengths, self.skip_target)
        return out

    def aggregate(self, results: dict[str, dict]) -> tuple[dict, dict]:
        entries, details = {}, {}
        for spec, length in self.lengths:
            windows = self.windows[length]
            metrics, by_position = summarize([results[f"{length}:{i}"] for i in range(len(windows))], length)
            name = self.entry_name(spec, length)
            entries[name] = {
                "task_type": "perplexity",
                "task": self.name,
                "family": self.config.get("family", self.name),
                "length": length,
                "stride": self.strides[length],
                **metrics,
                "eot_scored": self.skip_target is None,
                "data": ", ".join(self.sources),
                "data_fingerprint": self.data_fingerprint,
            }
            details[name] = {"loss_by_position": by_position}
        return entries, details
