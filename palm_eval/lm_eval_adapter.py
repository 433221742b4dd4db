"""`lm_eval --model palm`: PaLM checkpoints as a model of lm-evaluation-harness 0.4.x.

    lm_eval --model palm --model_args pretrained=palm_150m,max_length=16384,dtype=bf16 --tasks lambada_openai

`pretrained` is anything `palm_eval.load_model` takes (a registered name, a card, a .pt / .safetensors file);
`tokenizer` defaults to the card's; `max_length` (the longest sequence scored in one window) defaults to the
card's training length and can be raised to measure extrapolation; `pos_emb`, `attn_window` (0: none) and
`attention` override the card's; `score_eot=true` scores end-of-text targets in rolling perplexity (the
published models never learnt them). The `palm` name is registered at start-up of every lm_eval process
(palm_eval/_site/palm_eval_lm_eval_plugin.py); importing this module registers it too, for
`lm_eval.simple_evaluate(model="palm", ...)`.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections import defaultdict
from collections.abc import Iterable, Sequence

import palm_eval_lm_eval_plugin
import torch
import torch.distributed as dist
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from palm_eval.errors import PalmEvalError
from palm_eval.model import KVCache, sample
from palm_eval.registry import load_model, resolve_device
from palm_eval.tokenizer import load_tokenizer

logger = logging.getLogger(__name__)

DEFAULT_MAX_LENGTH = 2048  # for a bare checkpoint whose training length nothing records
CPU_AUTO_BATCH_TOKENS = 16384  # batch_size=auto on a CPU: tokens per batch
GEN_KWARGS = ("do_sample", "temperature", "top_k", "top_p")


class TokenizedText(str):
    """Text whose token ids are fixed already: one of palm-eval's evaluation sequences, as an lm-eval request.

    lm-eval requests are strings, and decoding a sequence cut out of a token stream and encoding it again does
    not give the same ids at the cuts. `PalmLM` (with the same tokenizer) scores exactly `tokens`, conditioned
    on the `context` token and leaving out `skip_target` targets, so lm-eval reproduces `run_eval.py` token for
    token; other models see the text.
    """

    tokens: tuple[int, ...]
    context: int
    tokenizer: str
    skip_target: int | None

    def __new__(
        cls, text: str, tokens: Iterable[int], context: int, tokenizer: str, skip_target: int | None
    ) -> TokenizedText:
        self = super().__new__(cls, text)
        self.tokens, self.context = tuple(int(t) for t in tokens), int(context)
        self.tokenizer, self.skip_target = tokenizer, skip_target
        return self

    def __reduce__(self):
        return TokenizedText, (str(self), self.tokens, self.context, self.tokenizer, self.skip_target)


class PalmLM(TemplateLM):
    """A PaLM model for lm-eval: log-likelihoods, rolling perplexity and generation with a key/value cache."""

    def __init__(
        self,
        pretrained: str,
        tokenizer: str | None = None,
        max_length: int | None = None,
        dtype: str | None = None,
        pos_emb: str | None = None,
        attn_window: int | None = None,
        attention: str | None = None,
        score_eot: bool | None = None,
        max_gen_toks: int = 256,
        batch_size: int | str = 1,
        max_batch_size: int | None = None,
        device: str | None = None,
    ) -> None:
        super().__init__()
        self._device = self._setup_device(device)
        overrides = {k: v for k, v in {"pos_emb": pos_emb, "attention": attention}.items() if v is not None}
        if attn_window is not None:  # 0: no window, whatever the card says
            overrides["attn_window"] = attn_window or None
        self.model = load_model(pretrained, device=self._device, dtype=None if dtype == "auto" else dtype, **overrides)
        card = self.model.card
        spec = tokenizer or card.tokenizer
        if spec is None:
            raise PalmEvalError(
                f"{pretrained} names no tokenizer: add tokenizer=<tokenizer.json path or hub id> to --model_args"
            )
        self.tokenizer = load_tokenizer(spec)
        if self.tokenizer.vocab_size > self.model.config.num_tokens:
            raise PalmEvalError(
                f"tokenizer {spec} has {self.tokenizer.vocab_size} tokens but the model only "
                f"{self.model.config.num_tokens}: is it the tokenizer this model was trained with?"
            )
        if max_length is None and card.train_length is None:
            warnings.warn(
                f"{pretrained} records no training length: using max_length={DEFAULT_MAX_LENGTH}; pass max_length "
                "(or a registered name such as palm_150m, whose card gives it)",
                stacklevel=2,
            )
        self._max_length = int(max_length or card.train_length or DEFAULT_MAX_LENGTH)
        self._max_gen_toks = int(max_gen_toks)
        # the published models never learnt to predict end-of-text (their loss ignored id 0): as run_eval.py,
        # rolling perplexity leaves those targets out unless score_eot=True
        ignored = self.model.config.ignore_index
        self.score_eot = bool(score_eot) if score_eot is not None else ignored != self.tokenizer.eos_id
        self._batch_size, self.max_batch_size = self._parse_batch_size(batch_size), int(max_batch_size or 64)
        self._auto_batch_sizes: dict[int, int] = {}
        self._warned_gen_kwargs: set[str] = set()

    # ------------------------------------------------------------------------------------------
    # device and data parallelism (accelerate launch / torchrun start one process per device)

    def _setup_device(self, device: str | None) -> torch.device:
        """The requested device, or under a multi-process launcher this process's own (joining the group)."""
        if int(os.environ.get("WORLD_SIZE", "1")) == 1:
            return resolve_device(device)
        if torch.cuda.is_available():
            own = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(own)
        else:
            own = torch.device("cpu")
        if not dist.is_initialized():
            dist.init_process_group(backend="nccl" if own.type == "cuda" else "gloo")
        self._rank, self._world_size = dist.get_rank(), dist.get_world_size()
        return own

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return tensor
        flat = tensor.reshape(-1)
        parts = [torch.empty_like(flat) for _ in range(self.world_size)]
        dist.all_gather(parts, flat)
        return torch.cat(parts)

    def gather_object(self, obj, dst: int = 0):
        if self.world_size == 1:
            return [obj]
        result = [None] * self.world_size if self.rank == dst else None
        dist.gather_object(obj, result, dst=dst)
        return result

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    # ------------------------------------------------------------------------------------------
    # what lm-eval asks of a model

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int | str:
        return "auto" if self._batch_size is None else self._batch_size

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string)

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(list(tokens))

    def get_model_info(self) -> dict:
        """Recorded in lm-eval's results `config`."""
        config = self.model.config
        return {
            "model_num_parameters": self.model.num_params(),
            "model_dtype": str(next(self.model.parameters()).dtype),
            "train_length": self.model.card.train_length,
            "max_length": self.max_length,
            "pos_emb": config.pos_emb,
            "attn_window": config.attn_window,
            "score_eot": self.score_eot,
            "tokenizer": self.tokenizer.name,
        }

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """log P(continuation | context) and whether greedy decoding gives it, keeping the last max_length tokens."""
        rows = []
        for _, context, continuation in requests:
            whole = (list(context) + list(continuation))[-(self.max_length + 1) :]
            rows.append((whole, min(len(continuation), len(whole) - 1)))
        results = self._score_rows(rows, None, disable_tqdm=disable_tqdm, desc="loglikelihood")
        for (key, _, _), result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", key, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Total log-likelihood of each text in disjoint windows of max_length tokens (lm-eval's definition).

        Returns plain floats: lm-eval's docstring says tuples, which break its aggregation (lm-eval issue #1531).
        A `TokenizedText` from palm-eval's tasks is scored as exactly its tokens after its context token.
        """
        rows, owner, skips = [], [], []
        for i, (string,) in enumerate(req.args for req in requests):
            tokens, prefix, skip = self._rolling_tokens(string, requests[i])
            for context, continuation in map(
                make_disjoint_window, get_rolling_token_windows(tokens, prefix, self.max_length, context_len=1)
            ):
                rows.append((context + continuation, len(continuation)))
                owner.append(i)
                skips.append(skip)
        totals = [0.0] * len(requests)
        for skip in dict.fromkeys(skips):  # plain texts follow score_eot; palm-eval's sequences carry their choice
            chosen = [k for k, s in enumerate(skips) if s == skip]
            scores = self._score_rows([rows[k] for k in chosen], skip, disable_tqdm=disable_tqdm, desc="rolling")
            for k, (ll, _) in zip(chosen, scores):
                totals[owner[k]] += ll
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def _rolling_tokens(self, string: str, request) -> tuple[list[int], int, int | None]:
        """(tokens to score, the token they follow, the target id left out) of one rolling request."""
        if not (isinstance(string, TokenizedText) and string.tokenizer == self.tokenizer.fingerprint):
            return self.tok_encode(string), self.prefix_token_id, None if self.score_eot else self.eot_token_id
        if len(string.tokens) > self.max_length:
            raise PalmEvalError(
                f"{request.task_name}: its sequences have {len(string.tokens)} tokens, more than max_length "
                f"{self.max_length}: add max_length={len(string.tokens)} to --model_args to evaluate at that length"
            )
        return list(string.tokens), string.context, string.skip_target

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Continuations cut before the first `until` string or end-of-text, decoded with a key/value cache.

        Requests with the same generation settings and the same prompt length run as one batch (the model has
        no padding mask); greedy unless do_sample=True.
        """
        eos_text = self.tok_decode([self.eot_token_id])
        groups: dict[tuple, list[int]] = defaultdict(list)
        prompts: list[list[int]] = []
        for i, (context, gen_kwargs) in enumerate(req.args for req in requests):
            kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
            max_new = int(kwargs.pop("max_gen_toks"))
            room = self.max_length - max_new
            if room < 1:
                raise PalmEvalError(f"max_gen_toks {max_new} leaves no room for a prompt in {self.max_length} tokens")
            prompts.append((self.tok_encode(context) if context else [self.eot_token_id])[-room:])
            groups[(len(prompts[-1]), max_new, tuple(until), self._sampling_settings(kwargs))].append(i)

        results: list[str] = [""] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0, desc="generate_until")
        for (length, max_new, until, settings), members in groups.items():
            size = self._rows_per_batch(length + max_new)
            for s in range(0, len(members), size):
                batch = members[s : s + size]
                tokens = torch.tensor([prompts[i] for i in batch], device=self.device)
                for i, text in zip(batch, self._generate(tokens, max_new, list(until), dict(settings))):
                    results[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                bar.update(len(batch))
        bar.close()
        return results

    # ------------------------------------------------------------------------------------------
    # computation

    def _sampling_settings(self, kwargs: dict) -> tuple:
        """(temperature, top_k, top_p) as a hashable key; 0 temperature is greedy."""
        for name in set(kwargs) - set(GEN_KWARGS) - self._warned_gen_kwargs:
            warnings.warn(f"palm: generation option {name!r} is not supported and ignored", stacklevel=3)
            self._warned_gen_kwargs.add(name)
        temperature = float(kwargs.get("temperature") or 0.0) if kwargs.get("do_sample") else 0.0
        return (("temperature", temperature), ("top_k", kwargs.get("top_k")), ("top_p", kwargs.get("top_p")))

    @torch.inference_mode()
    def _generate(self, prompts: torch.Tensor, max_new: int, until: list[str], settings: dict) -> list[str]:
        cache = KVCache()
        logits = self.model.logits(self.model.hidden_states(prompts, cache)[:, -1])
        generated = [[] for _ in range(prompts.shape[0])]
        done = [False] * prompts.shape[0]
        for step in range(max_new):
            nxt = sample(logits.float(), **settings)
            for row, token in enumerate(nxt.tolist()):
                if done[row]:
                    continue
                if token == self.eot_token_id:
                    done[row] = True
                    continue
                generated[row].append(token)
                text = self.tok_decode(generated[row])
                done[row] = any(stop and stop in text for stop in until)
            if all(done) or step == max_new - 1:
                break
            logits = self.model.logits(self.model.hidden_states(nxt[:, None], cache)[:, -1])
        return [postprocess_generated_text(self.tok_decode(tokens), until, None) for tokens in generated]

    @torch.inference_mode()
    def _score_rows(
        self, rows: list[tuple[list[int], int]], skip: int | None, disable_tqdm: bool, desc: str
    ) -> list[tuple[float, bool]]:
        """For each (tokens, n): sum log P(tokens[t] | tokens[:t]) over the last n tokens, and whether all are argmax.

        Rows are batched longest first and right-padded (causal attention: padding never changes a real
        position); targets equal to `skip` are neither scored nor required to be greedy.
        """
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        results: list[tuple[float, bool]] = [(0.0, True)] * len(rows)
        bar = tqdm(total=len(rows), disable=disable_tqdm or self.rank != 0, desc=desc)
        start = 0
        while start < len(order):
            longest = len(rows[order[start]][0]) - 1
            batch = order[start : start + self._rows_per_batch(longest)]
            start += len(batch)
            if longest < 1:
                bar.update(len(batch))
                continue
            tokens = torch.full((len(batch), longest + 1), self.eot_token_id, dtype=torch.long)
            for b, i in enumerate(batch):
                tokens[b, : len(rows[i][0])] = torch.tensor(rows[i][0])
            tokens = tokens.to(self.device)
            nll, greedy = self.model.score(tokens[:, :-1], tokens[:, 1:])
            for b, i in enumerate(batch):
                length, n = len(rows[i][0]) - 1, rows[i][1]
                keep = tokens[b, length - n + 1 : length + 1] != (-1 if skip is None else skip)
                row_nll = nll[b, length - n : length][keep]
                results[i] = (-float(row_nll.double().sum()), bool(greedy[b, length - n : length][keep].all()))
            bar.update(len(batch))
        bar.close()
        return results

    # ------------------------------------------------------------------------------------------
    # batch size

    @staticmethod
    def _parse_batch_size(batch_size: int | str) -> int | None:
        """An int, or None for lm-eval's "auto" / "auto:N" (the N re-detections are not needed here)."""
        if isinstance(batch_size, str) and batch_size.startswith("auto"):
            return None
        try:
            size = int(batch_size)
        except ValueError:
            raise PalmEvalError(f"batch_size must be a positive integer or auto, got {batch_size!r}") from None
        if size < 1:
            raise PalmEvalError(f"batch_size must be a positive integer or auto, got {batch_size!r}")
        return size

    def _rows_per_batch(self, length: int) -> int:
        if self._batch_size is not None:
            return self._batch_size
        bucket = 1 << max(0, length - 1).bit_length()  # detect once per power of two of the length
        if bucket not in self._auto_batch_sizes:
            self._auto_batch_sizes[bucket] = self._detect_batch_size(bucket)
            logger.info("palm: batch size %d for sequences up to %d tokens", self._auto_batch_sizes[bucket], bucket)
        return self._auto_batch_sizes[bucket]

    def _detect_batch_size(self, length: int) -> int:
        """The largest batch that fits: halving from max_batch_size until a trial passes on a GPU; a token
        budget on a CPU, where running out of memory cannot be caught."""
        if self.device.type != "cuda":
            return max(1, min(self.max_batch_size, CPU_AUTO_BATCH_TOKENS // max(1, length)))
        size = self.max_batch_size
        while size > 1:
            try:
                with torch.inference_mode():
                    probe = torch.zeros((size, length), dtype=torch.long, device=self.device)
                    self.model.score(probe, probe)
                break
            except torch.cuda.OutOfMemoryError:
                size //= 2
            finally:
                torch.cuda.empty_cache()
        return size


palm_eval_lm_eval_plugin.register()
