"""LAMBADA (OpenAI's version), scored exactly as lm-evaluation-harness 0.4's `lambada_openai`.

Per document: context = all but the last space-separated word (`text.split(' ')[:-1]` joined by ' '),
target = ' ' + last word. As in lm-eval's `_encode_pair`, trailing spaces of the context move to the
target, then context + target is encoded as one string and split after the context's own encoding.
acc = share of documents whose every target token is the argmax; perplexity = exp(-mean target
log-likelihood). Contexts are not truncated (lm-eval truncates at the model's max length; LAMBADA
contexts are far shorter than any training length here).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from palm_eval.data import fingerprint, read_documents
from palm_eval.errors import PalmEvalError
from palm_eval.tasks import RunContext, Task, resolve_source


def split_document(text: str) -> tuple[str, str]:
    """(context, target) with lm-eval's lambada_openai templates."""
    words = text.split(" ")
    return " ".join(words[:-1]), " " + words[-1]


def encode_pair(tokenizer, context: str, target: str) -> tuple[list[int], list[int]]:
    """lm-eval's TemplateLM._encode_pair for causal models (an empty context becomes end-of-text)."""
    if not context:
        return [tokenizer.eos_id], tokenizer.encode(target)
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, target = context[:-spaces], context[-spaces:] + target
    whole = tokenizer.encode(context + target)
    context_ids = tokenizer.encode(context)
    return context_ids, whole[len(context_ids) :]


class LambadaTask(Task):
    def __init__(self, name: str, config: dict, ctx: RunContext):
        super().__init__(name, config, ctx)
        self.sources = resolve_source(name, config, ctx)
        docs = [d for source in self.sources for d in read_documents(source)][: ctx.limit]
        if not docs:
            raise PalmEvalError(f"{name}: no documents in {', '.join(self.sources)}")
        self.pairs = [encode_pair(ctx.tokenizer, *split_document(d)) for d in docs]
        flat = [t for c, x in self.pairs for t in (*c, -1, *x, -2)]  # separators keep the split in the hash
        self.data_fingerprint = fingerprint(np.array(flat, dtype=np.int64))

    def fingerprint(self) -> dict:
        return {"data": self.data_fingerprint}

    def items(self) -> list[tuple[str, tuple[list[int], list[int]]]]:
        """Longest first (as lm-eval): equal lengths sit together, and memory peaks on the first batch."""
        order = sorted(range(len(self.pairs)), key=lambda i: (-sum(map(len, self.pairs[i])), i))
        return [(str(i), self.pairs[i]) for i in order]

    def evaluate(self, batch: list[tuple[str, tuple[list[int], list[int]]]]) -> list[dict]:
        """Documents of equal token length go through the model together: no padding, so batch size
        changes no number (padding would change the shapes and with them the float rounding)."""
        out = {}
        seqs = [c + x for _, (c, x) in batch]
        for n in dict.fromkeys(map(len, seqs)):
            rows = [i for i, s in enumerate(seqs) if len(s) == n]
            x = torch.tensor([seqs[i] for i in rows], device=next(self.ctx.model.parameters()).device)
            with torch.no_grad():
                nll, greedy = self.ctx.model.score(x[:, :-1], x[:, 1:])
            nll, greedy = nll.double().cpu().numpy(), greedy.cpu().numpy()
            for row, i in enumerate(rows):
                context, target = batch[i][1]
                span = slice(len(context) - 1, n - 1)
                out[i] = {"ll": -math.fsum(nll[row, span]), "greedy": bool(greedy[row, span].all()), "tokens_in": n - 1}
        return [out[i] for i in range(len(batch))]

    def aggregate(self, results: dict[str, dict]) -> tuple[dict, dict]:
        lls = [results[str(i)]["ll"] for i in range(len(self.pairs))]
        hits = [results[str(i)]["greedy"] for i in range(len(self.pairs))]
        finite = [ll for ll in lls if math.isfinite(ll)]
        n = len(hits)
        acc = sum(hits) / n
        mean_ll = math.fsum(finite) / len(finite) if finite else None
        entry = {
            "task_type": "lambada",
            "acc": acc,
            "acc_stderr": math.sqrt(acc * (1 - acc) / (n - 1)) if n > 1 else None,  # lm-eval's mean_stderr
            "perplexity": math.exp(-mean_ll) if mean_ll is not None and -mean_ll < 709 else None,
            "count": n,
            "nonfinite": n - len(finite),
            "data": ", ".join(self.sources),
            "data_fingerprint": self.data_fingerprint,
        }
        return {self.name: entry}, {}
