"""Passkey retrieval (Mohtashami & Jaggi 2023, "Landmark Attention"), seeded.

A random 5-digit key is hidden at a relative depth (0 = right after the instructions, 1 = just before
the question) in repeated filler text, and the prompt ends by asking for it. The prompt is assembled
from separately tokenized pieces that all start with a space, so its length is exact: as much filler
as fits in `length` tokens together with the answer.

Two scores per trial: greedy decoding reproduces every token of the key (what a user would see), and
the key's log-likelihood beats every distractor key (chance 1 / (1 + distractors)), which gives a
signal for models too small to generate the key.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from palm_eval.errors import PalmEvalError
from palm_eval.model import KVCache
from palm_eval.tasks import RunContext, Task, parse_length

INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
    "I will quiz you about the important information there."
)
FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = " What is the pass key? The pass key is"


def build_trial(tokenizer, length: int, depth: float, keys: list[int]) -> tuple[list[int], list[list[int]]]:
    """(prompt ids, answer ids of keys[0] then of each distractor) with prompt + answer <= length tokens."""
    enc = tokenizer.encode
    intro, filler, needle, question = enc(INTRO), enc(FILLER), enc(NEEDLE.format(key=keys[0])), enc(QUESTION)
    answers = [enc(f" {k}") for k in keys]
    fixed = len(intro) + len(needle) + len(question) + len(answers[0])
    fill = (length - fixed) // len(filler)
    if fill < 1:
        needed = fixed + len(filler)
        raise PalmEvalError(f"passkey: length {length} is too short; the prompt needs at least {needed} tokens")
    before = round(depth * fill)
    prompt = intro + filler * before + needle + filler * (fill - before) + question
    return prompt, answers


@torch.no_grad()
def score_trial(model, prompt: list[int], answers: list[list[int]]) -> tuple[bool, list[float]]:
    """Greedy match of answers[0], and the log-likelihood of every answer, from one pass over the prompt."""
    device = next(model.parameters()).device
    cache = KVCache()
    hidden = model.hidden_states(torch.tensor([prompt], device=device), cache)[:, -1]
    first = model.logits(hidden).float().log_softmax(dim=-1)[0]

    def continue_from(tokens: list[int]) -> torch.Tensor:
        """log-probs after each of `tokens`, continuing the prompt (the prompt's cache is shared, not changed)."""
        branch = KVCache(layers=list(cache.layers))
        h = model.hidden_states(torch.tensor([tokens], device=device), branch)
        return model.logits(h).float().log_softmax(dim=-1)[0]

    lls = []
    for answer in answers:
        ll = [first[answer[0]].item()]
        if len(answer) > 1:
            rest = torch.tensor(answer[1:], device=device)[:, None]
            ll += continue_from(answer[:-1]).gather(-1, rest).flatten().tolist()
        lls.append(math.fsum(ll))

    generated = [int(first.argmax())]
    branch = KVCache(layers=list(cache.layers))
    while len(generated) < len(answers[0]):
        h = model.hidden_states(torch.tensor([[generated[-1]]], device=device), branch)[:, -1]
        generated.append(int(model.logits(h).argmax()))
    return generated == answers[0], lls


class PasskeyTask(Task):
    def __init__(self, name: str, config: dict, ctx: RunContext):
        super().__init__(name, config, ctx)
        self.lengths = [parse_length(spec, ctx.train_length, name) for spec in config["lengths"]]
        self.depths = [float(d) for d in config["depths"]]
        self.trials = min(int(config.get("trials", 3)), ctx.limit or math.inf)  # --limit bounds the trials per cell
        self.distractors = int(config.get("distractors", 9))
        for length in self.lengths:  # fail before any work when a length cannot hold the prompt
            build_trial(ctx.tokenizer, length, 0.0, [10000])

    def fingerprint(self) -> dict:
        return {"seed": self.ctx.seed, "trials": self.trials}

    def keys(self, length: int, depth: float, trial: int) -> list[int]:
        """The key then the distractors: distinct, seeded per trial (independent of sharding and order)."""
        rng = np.random.default_rng([self.ctx.seed, length, round(depth * 1000), trial])
        return (rng.choice(90000, size=1 + self.distractors, replace=False) + 10000).tolist()

    def items(self) -> list[tuple[str, tuple[int, float, int]]]:
        cells = [(n, d, t) for n in self.lengths for d in self.depths for t in range(self.trials)]
        return [(f"{n}:{d}:{t}", (n, d, t)) for n, d, t in cells]

    def evaluate(self, batch: list[tuple[str, tuple[int, float, int]]]) -> list[dict]:
        out = []
        for _, (length, depth, trial) in batch:
            keys = self.keys(length, depth, trial)
            prompt, answers = build_trial(self.ctx.tokenizer, length, depth, keys)
            greedy, lls = score_trial(self.ctx.model, prompt, answers)
            best_distractor = max(lls[1:], default=-math.inf)
            out.append(
                {
                    "key": keys[0],
                    "greedy": greedy,
                    "loglik": bool(lls[0] > best_distractor),  # NaN compares False
                    "tokens_in": len(prompt) + sum(len(a) for a in answers),
                }
            )
        return out

    def aggregate(self, results: dict[str, dict]) -> tuple[dict, dict]:
        cells = []
        for length in self.lengths:
            for depth in self.depths:
                rs = [results[f"{length}:{depth}:{t}"] for t in range(self.trials)]
                cells.append(
                    {
                        "length": length,
                        "depth": depth,
                        "acc_greedy": sum(r["greedy"] for r in rs) / len(rs),
                        "acc_loglik": sum(r["loglik"] for r in rs) / len(rs),
                        "trials": len(rs),
                    }
                )
        everything = list(results.values())
        entry = {
            "task_type": "passkey",
            "acc_greedy": sum(r["greedy"] for r in everything) / len(everything),
            "acc_loglik": sum(r["loglik"] for r in everything) / len(everything),
            "trials": len(everything),
            "distractors": self.distractors,
            "chance_loglik": 1 / (1 + self.distractors),
            "seed": self.ctx.seed,
        }
        return {self.name: entry}, {self.name: {"cells": cells}}
