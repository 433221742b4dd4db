"""The PaLM model, readable top to bottom.

Same architecture and parameter layout as the published checkpoints (palm-rlhf-pytorch 0.2.1-0.2.3):
one pre-LayerNorm (no bias) per block feeding a single fused projection into multi-query attention
(q for every head, one shared k and v head) and a SwiGLU feed-forward that run in parallel,
`x + attn_out(attn) + ff_out(ff)`; rotary embeddings (half split, base 10000) with optional xPos decay;
final LayerNorm; output projection tied to the token embedding.

What differs from the reference, on purpose:
- position handling (`pos_emb`), attention kernel (`attention`) and windowed attention (`attn_window`)
  are config fields that can be changed when a checkpoint is loaded, without retraining;
- rotary angles and xPos factors are computed in float64 and applied in float32 whatever the model
  dtype (the reference builds them in the model dtype, so bf16 rounds positions to steps of 128 at 32k);
- xPos factors are centred per block of queries, so they stay finite at any length with a window;
- the loss and per-token scores are computed over chunks of positions, so a [tokens, vocab] float32
  logits tensor is never materialized (32k x 50,304 would be 6.6 GB);
- without gradients, long inputs go through each block in pieces of BLOCK_ROWS positions, updating the
  residual stream in place (palm_150m scores 32k tokens in float32 within ~0.6 GB beyond its weights);
  docs/benchmarks.md has the measurements behind these choices;
- generation uses a key/value cache (tiny with multi-query: one k and one v head per layer).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from palm_eval.errors import PalmEvalError

POS_EMBS = ("xpos", "rope", "none")
ATTENTIONS = ("sdpa", "flash_attn", "eager")
LOGITS_CHUNK_BYTES = 128 * 2**20  # float32 logits held at once while scoring or computing the loss (>= 512 rows
# of the 50,304-token vocabulary: smaller chunks make the logits matmul ~25% slower on CPU)
SDPA_GQA = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5)  # scaled_dot_product_attention(enable_gqa=)
BLOCK_ROWS = 2048  # without gradients, longer inputs go through each block's projections this many positions at a time


@dataclass
class PaLMConfig:
    num_tokens: int = 50304
    dim: int = 768
    depth: int = 12
    heads: int = 8
    dim_head: int = 128
    ff_mult: int = 4
    qk_rmsnorm: bool = False
    pos_emb: str = "xpos"  # xpos | rope | none
    rotary_base: float = 10000.0
    xpos_scale_base: float = 512.0
    attention: str = "sdpa"  # sdpa | flash_attn | eager
    attn_window: int | None = None  # each query sees at most this many most recent keys (itself included)
    ignore_index: int | None = 0  # target id the loss never scores (GPT-NeoX end-of-text for the published models)

    def __post_init__(self) -> None:
        if self.pos_emb not in POS_EMBS:
            raise PalmEvalError(f"pos_emb must be one of {', '.join(POS_EMBS)}, got {self.pos_emb!r}")
        if self.attention not in ATTENTIONS:
            raise PalmEvalError(f"attention must be one of {', '.join(ATTENTIONS)}, got {self.attention!r}")
        if self.attn_window is not None and self.attn_window < 1:
            raise PalmEvalError(f"attn_window must be a positive number of tokens or None, got {self.attn_window}")
        for name in ("num_tokens", "dim", "depth", "heads", "dim_head", "ff_mult"):
            if getattr(self, name) < 1:
                raise PalmEvalError(f"{name} must be positive, got {getattr(self, name)}")
        if self.dim_head % 2:
            raise PalmEvalError(f"dim_head must be even for rotary embeddings, got {self.dim_head}")

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------------------------
# positions: rotary angles and xPos factors, always float64 -> float32


def rotary_tables(config: PaLMConfig, start: int, length: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """cos and sin of the rotary angles for positions start..start+length, float32 [length, dim_head]."""
    d = config.dim_head
    inv_freq = 1.0 / config.rotary_base ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    positions = torch.arange(start, start + length, dtype=torch.float64)
    angles = torch.outer(positions, inv_freq)
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos().float().to(device), angles.sin().float().to(device)


def xpos_factors(config: PaLMConfig, positions: Tensor, centre: int) -> Tensor:
    """xPos factors zeta_i ** ((t - centre) / scale_base), float32 [len(positions), dim_head].

    Queries are multiplied by these and keys by their inverse, so q.k decays with the distance between
    positions; only differences matter, and the centre only keeps the factors inside the float range.
    """
    d = config.dim_head
    zeta = (torch.arange(0, d, 2, dtype=torch.float64) + 0.4 * d) / (1.4 * d)
    power = (positions.to("cpu", torch.float64) - centre) / config.xpos_scale_base
    factors = torch.exp(torch.outer(power, zeta.log()))
    return torch.cat((factors, factors), dim=-1).float().to(positions.device)


@dataclass
class Positions:
    """Everything position-dependent in one forward pass, computed once and shared by every layer.

    New tokens sit at positions start..start+length; keys at 0..start+length (the cache, then the new ones).
    Attention runs in `blocks` of queries (rows s..e of the new tokens over keys from `first_key`): one block,
    or blocks of `attn_window` queries. Rotary tables are float32 and half width ([n, dim_head / 2]: the
    angles repeat over the two halves of a head). With xPos, each query's factor (centred on its block) is
    folded into the query tables, and `key_scales[i]` holds the inverse factors of block i's keys.
    """

    start: int
    length: int
    blocks: list[tuple[int, int, int]]
    cos: Tensor | None = None  # rotary of the new keys
    sin: Tensor | None = None
    q_cos: Tensor | None = None  # rotary of the new queries, times their xPos factors
    q_sin: Tensor | None = None
    key_scales: list[Tensor | None] = field(default_factory=list)
    large_factors: bool = False  # xPos factors beyond 1e30: q and k times them may overflow, check them


def make_positions(config: PaLMConfig, start: int, length: int, device: torch.device) -> Positions:
    """The position tables of `length` new tokens after `start` cached ones (float64 math, float32 tables)."""
    window = config.attn_window
    block = length if window is None else window
    blocks = [
        (s, min(length, s + block), 0 if window is None else max(0, start + s - window + 1))
        for s in range(0, max(length, 1), max(block, 1))
    ]
    pos = Positions(start, length, blocks, key_scales=[None] * len(blocks))
    if config.pos_emb == "none":
        return pos
    half = config.dim_head // 2
    cos, sin = (t[:, :half].contiguous() for t in rotary_tables(config, start, length, device))
    pos.cos, pos.sin, pos.q_cos, pos.q_sin = cos, sin, cos, sin
    if config.pos_emb == "xpos":
        q_factors, key_scales = [], []
        for s, e, first_key in blocks:
            centre = start + s + (e - s) // 2
            q_factors.append(xpos_factors(config, torch.arange(start + s, start + e, device=device), centre)[:, :half])
            key_scales.append(1 / xpos_factors(config, torch.arange(first_key, start + e, device=device), centre))
        q_factors = torch.cat(q_factors)
        largest = max(float(f.max()) for f in (q_factors, *key_scales))  # inf or nan when they overflow
        if not math.isfinite(largest):
            raise _xpos_overflow(start + length)
        pos.q_cos, pos.q_sin, pos.key_scales = cos * q_factors, sin * q_factors, key_scales
        pos.large_factors = largest > 1e30  # from about 56k tokens without a window
    return pos


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary embedding `x * cat(cos, cos) + rotate_half(x) * cat(sin, sin)` of x [..., dim_head] with
    half-width tables that broadcast against x's halves: computed in float32, returned in x's dtype."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((torch.addcmul(x1 * cos, x2, sin, value=-1), torch.addcmul(x2 * cos, x1, sin)), dim=-1).to(x.dtype)


def _xpos_overflow(length: int) -> PalmEvalError:
    return PalmEvalError(
        f"xPos factors overflow float32 over {length} keys without a window: "
        f"set attn_window (e.g. the training length) or evaluate shorter sequences"
    )


# ----------------------------------------------------------------------------------------------
# attention over blocks of queries


def _allowed(q_pos: Tensor, k_pos: Tensor, window: int | None) -> Tensor:
    """Boolean [nq, nk] mask: key j is visible to query i when i - window < j <= i."""
    allowed = k_pos[None, :] <= q_pos[:, None]
    if window is not None:
        allowed &= k_pos[None, :] > q_pos[:, None] - window
    return allowed


def _attend(q: Tensor, k: Tensor, v: Tensor, q_start: int, k_start: int, window: int | None, backend: str) -> Tensor:
    """Causal (optionally windowed) multi-query attention for one block.

    q: [b, heads, nq, d] at positions q_start..; k, v: [b, nk, d] at positions k_start.., ending with the
    last query's position.
    """
    b, h, nq, d = q.shape
    nk = k.shape[1]
    if backend == "flash_attn":
        try:
            from flash_attn import flash_attn_func
        except ImportError:
            raise PalmEvalError(
                "attention='flash_attn' needs the flash-attn package on a CUDA GPU (pip install 'palm-eval[gpu]'); "
                "use attention='sdpa' elsewhere"
            ) from None
        if not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16):
            raise PalmEvalError(f"attention='flash_attn' runs on CUDA in bf16/fp16 only (got {q.device}, {q.dtype})")
        out = flash_attn_func(
            q.transpose(1, 2), k[:, :, None], v[:, :, None], causal=True, window_size=(window - 1 if window else -1, 0)
        )
        return out.transpose(1, 2)

    square_causal = nq == nk and (window is None or window >= nk)
    last_query_only = nq == 1 and (window is None or window >= nk)
    mask = None
    if not (square_causal or last_query_only):
        q_pos = torch.arange(q_start, q_start + nq, device=q.device)
        k_pos = torch.arange(k_start, k_start + nk, device=q.device)
        mask = _allowed(q_pos, k_pos, window)

    if backend == "eager":
        scores = torch.einsum("bhid,bjd->bhij", q.float(), k.float()) * d**-0.5
        if mask is None and square_causal:
            mask = torch.ones(nq, nk, dtype=torch.bool, device=q.device).tril()
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        return torch.einsum("bhij,bjd->bhid", scores.softmax(dim=-1), v.float()).to(q.dtype)

    if SDPA_GQA:  # the one key/value head is shared by all query heads inside the kernel (CPU: ~12% faster in bf16)
        k, v, gqa = k[:, None], v[:, None], {"enable_gqa": True}
    else:
        k, v, gqa = k[:, None].expand(b, h, nk, d), v[:, None].expand(b, h, nk, d), {}
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=square_causal and nq > 1, **gqa)


def attention(q: Tensor, k: Tensor, v: Tensor, pos: Positions, config: PaLMConfig) -> Tensor:
    """Attention of the new queries [b, heads, n, d] (rotated, xPos applied) over keys and values [b, nk, d]
    (rotated keys: the cache, then the new ones), one block of queries at a time (see `Positions`): with
    `attn_window` W, blocks of W queries each over only the keys they may see, so memory grows linearly
    with length and xPos factors (centred per block) never leave the float range.
    """
    k_start = pos.start + pos.length - k.shape[1]  # position of the first key held
    outputs = []
    for (s, e, first_key), key_scale in zip(pos.blocks, pos.key_scales):
        ks, ke = first_key - k_start, pos.start + e - k_start
        q_blk, k_blk, v_blk = q[:, :, s:e], k[:, ks:ke], v[:, ks:ke]
        if key_scale is not None:
            k_blk = (k_blk.float() * key_scale).to(v.dtype)
            if pos.large_factors and not (torch.isfinite(q_blk).all() and torch.isfinite(k_blk).all()):
                raise _xpos_overflow(k.shape[1])
        outputs.append(_attend(q_blk, k_blk, v_blk, pos.start + s, first_key, config.attn_window, config.attention))
    return torch.cat(outputs, dim=2) if len(outputs) > 1 else outputs[0]


# ----------------------------------------------------------------------------------------------
# the network


class LayerNorm(nn.Module):
    """LayerNorm with a learned gain and no bias; `beta` is a zero buffer so checkpoints load strictly."""

    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))
        self.register_buffer("beta", torch.zeros(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, x.shape[-1:], self.gamma, self.beta)


class ParallelBlock(nn.Module):
    def __init__(self, config: PaLMConfig):
        super().__init__()
        self.config = config
        attn_inner, ff_inner = config.heads * config.dim_head, config.dim * config.ff_mult
        self.fused_dims = (attn_inner, config.dim_head, config.dim_head, 2 * ff_inner)
        self.norm = LayerNorm(config.dim)
        self.fused_attn_ff_proj = nn.Linear(config.dim, sum(self.fused_dims), bias=False)
        self.attn_out = nn.Linear(attn_inner, config.dim, bias=False)
        self.ff_out = nn.Linear(ff_inner, config.dim, bias=False)
        if config.qk_rmsnorm:
            self.q_scale = nn.Parameter(torch.ones(config.dim_head))
            self.k_scale = nn.Parameter(torch.ones(config.dim_head))

    def forward(
        self, x: Tensor, pos: Positions, past: tuple[Tensor, Tensor] | None
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """Returns the block output and this layer's keys and values (past included) for the cache."""
        if x.shape[1] > BLOCK_ROWS and not torch.is_grad_enabled():
            return self.forward_long(x, pos, past)
        q, k, v, ff = self.project(self.norm(x), pos, 0)
        k, v = _extend(past, k, v)
        out = attention(q.transpose(1, 2), k, v, pos, self.config)
        return x + self.attn_out(out.transpose(1, 2).flatten(2)) + ff, (k, v)

    def project(self, normed: Tensor, pos: Positions, s: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """For the normed inputs at rows s..: rotated queries [b, n, heads, d], rotated keys and values
        [b, n, d], and the feed-forward branch's output [b, n, dim]."""
        b, n, _ = normed.shape
        q, k, v, ff = self.fused_attn_ff_proj(normed).split(self.fused_dims, dim=-1)
        q = q.view(b, n, self.config.heads, self.config.dim_head)
        if self.config.qk_rmsnorm:
            q = F.normalize(q, dim=-1) * self.q_scale
            k = F.normalize(k, dim=-1) * self.k_scale
        if pos.cos is not None:
            q = rotate(q, pos.q_cos[s : s + n, None], pos.q_sin[s : s + n, None])
            k = rotate(k, pos.cos[s : s + n], pos.sin[s : s + n])
        ff_x, gate = ff.chunk(2, dim=-1)  # SwiGLU; without gradients in place, in the projection's output
        hidden = F.silu(gate) * ff_x if torch.is_grad_enabled() else F.silu(gate, inplace=True).mul_(ff_x)
        return q, k, v, self.ff_out(hidden)

    def forward_long(
        self, x: Tensor, pos: Positions, past: tuple[Tensor, Tensor] | None
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """`forward` without gradients for long inputs, in memory that stays small at 32k tokens: the norm,
        the fused projection and the output projections run over pieces of BLOCK_ROWS positions (the whole
        fused projection of 32k positions would be 970 MB in float32), and `x` is updated in place (rows
        s.. are normed before the feed-forward output is added to them, and no later piece reads them)."""
        b, n, _ = x.shape
        q = x.new_empty(b, n, self.config.heads, self.config.dim_head)
        k, v = x.new_empty(b, n, self.config.dim_head), x.new_empty(b, n, self.config.dim_head)
        for s in range(0, n, BLOCK_ROWS):
            e = min(n, s + BLOCK_ROWS)
            q_rows, k_rows, v_rows, ff = self.project(self.norm(x[:, s:e]), pos, s)
            q[:, s:e], k[:, s:e], v[:, s:e] = q_rows, k_rows, v_rows
            x[:, s:e] += ff
            del q_rows, k_rows, v_rows, ff
        k, v = _extend(past, k, v)
        out = attention(q.transpose(1, 2), k, v, pos, self.config).transpose(1, 2).flatten(2)
        del q
        for s in range(0, n, BLOCK_ROWS):
            x[:, s : s + BLOCK_ROWS] += self.attn_out(out[:, s : s + BLOCK_ROWS])
        return x, (k, v)


def _extend(past: tuple[Tensor, Tensor] | None, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    if past is None:
        return k, v
    return torch.cat((past[0], k), dim=1), torch.cat((past[1], v), dim=1)


@dataclass
class KVCache:
    """Keys and values of every layer for the tokens seen so far (multi-query: [batch, tokens, dim_head])."""

    layers: list[tuple[Tensor, Tensor] | None] = field(default_factory=list)

    @property
    def length(self) -> int:
        return self.layers[0][0].shape[1] if self.layers and self.layers[0] is not None else 0


class PaLM(nn.Module):
    def __init__(self, config: PaLMConfig):
        super().__init__()
        self.config = config
        self.token_emb = nn.Embedding(config.num_tokens, config.dim)
        self.layers = nn.ModuleList(ParallelBlock(config) for _ in range(config.depth))
        self.norm = LayerNorm(config.dim)
        nn.init.normal_(self.token_emb.weight, std=0.02)

    def num_params(self) -> int:
        """Parameters with the tied embedding counted once."""
        return sum(p.numel() for p in self.parameters())

    def hidden_states(self, tokens: Tensor, cache: KVCache | None = None) -> Tensor:
        """Final-norm hidden states [batch, seq, dim]; with a cache, tokens continue the cached ones."""
        if tokens.ndim != 2:
            raise PalmEvalError(f"tokens must be [batch, seq] integer ids, got shape {tuple(tokens.shape)}")
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.config.num_tokens):
            raise PalmEvalError(
                f"token ids must lie in [0, {self.config.num_tokens}); got {int(tokens.min())}..{int(tokens.max())}"
                " (is the tokenizer the one this model was trained with?)"
            )
        start = cache.length if cache is not None else 0
        n = tokens.shape[1]
        pos = make_positions(self.config, start, n, tokens.device)
        if cache is not None and not cache.layers:
            cache.layers = [None] * len(self.layers)
        x = self.token_emb(tokens)
        for i, layer in enumerate(self.layers):
            x, kv = layer(x, pos, cache.layers[i] if cache is not None else None)
            if cache is not None:
                cache.layers[i] = kv
        return self.norm(x)

    def logits(self, hidden: Tensor) -> Tensor:
        return hidden @ self.token_emb.weight.t()

    def forward(self, tokens: Tensor, cache: KVCache | None = None) -> Tensor:
        """Logits [batch, seq, vocab] in the model dtype. For long inputs prefer `score` or `loss`."""
        return self.logits(self.hidden_states(tokens, cache))

    def _chunk_rows(self, batch: int) -> int:
        return max(1, LOGITS_CHUNK_BYTES // (4 * self.config.num_tokens * batch))

    @torch.no_grad()
    def score(self, tokens: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """Per-position negative log-likelihood of `targets` and whether each is the argmax (no gradients).

        targets[:, t] is the token predicted after tokens[:, :t+1]. Returns float32 nll [batch, seq]
        and bool greedy [batch, seq]. Logits are computed over chunks of positions into two buffers reused
        by every chunk (model dtype and float32), and log-sum-exp is taken in float32 in place.
        """
        if targets.shape != tokens.shape:
            raise PalmEvalError(f"targets shape {tuple(targets.shape)} must equal tokens shape {tuple(tokens.shape)}")
        hidden = self.hidden_states(tokens)
        b, n = tokens.shape
        nll = torch.empty((b, n), dtype=torch.float32, device=tokens.device)
        greedy = torch.empty((b, n), dtype=torch.bool, device=tokens.device)
        rows = min(n, self._chunk_rows(b))
        logits_buf = hidden.new_empty((b * rows, self.config.num_tokens))
        float_buf = logits_buf if hidden.dtype == torch.float32 else torch.empty_like(logits_buf, dtype=torch.float32)
        for s in range(0, n, rows):
            e = min(n, s + rows)
            h = hidden[:, s:e].reshape(-1, self.config.dim)
            logits = torch.mm(h, self.token_emb.weight.t(), out=logits_buf[: len(h)])
            target = targets[:, s:e].reshape(-1, 1)
            target_logit = logits.gather(-1, target).float()
            best, best_id = logits.max(dim=-1, keepdim=True)  # best_id: the first index of the maximum, as argmax
            shifted = logits if float_buf is logits_buf else float_buf[: len(h)].copy_(logits)
            lse = shifted.sub_(best).exp_().sum(dim=-1, keepdim=True).log_() + best
            nll[:, s:e] = (lse - target_logit).view(b, e - s)
            greedy[:, s:e] = (best_id == target).view(b, e - s)
        return nll, greedy

    def loss(self, tokens: Tensor) -> Tensor:
        """Mean next-token cross-entropy over tokens[:, 1:], skipping `ignore_index` targets (training loss).

        Chunked, and with gradients each chunk's logits are recomputed in backward instead of kept.
        """
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        hidden = self.hidden_states(inputs)
        ignore = -100 if self.config.ignore_index is None else self.config.ignore_index
        total = hidden.new_zeros((), dtype=torch.float32)
        rows = self._chunk_rows(tokens.shape[0])
        for s in range(0, inputs.shape[1], rows):
            args = (hidden[:, s : s + rows], targets[:, s : s + rows], ignore)
            if torch.is_grad_enabled() and rows < inputs.shape[1]:  # one chunk: nothing to save
                total = total + checkpoint(self._chunk_loss_sum, *args, use_reentrant=False)
            else:
                total = total + self._chunk_loss_sum(*args)
        count = (targets != ignore).sum()
        return total / count.clamp(min=1)

    def _chunk_loss_sum(self, hidden: Tensor, targets: Tensor, ignore: int) -> Tensor:
        logits = self.logits(hidden).float()
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=ignore, reduction="sum")

    @torch.no_grad()
    def generate(
        self,
        prompt: Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_id: int | None = None,
        use_cache: bool = True,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Continue `prompt` [batch, n]; returns only the new tokens [batch, <= max_new_tokens].

        temperature 0 is greedy. Generation stops early once every row has produced `eos_id`; a row that
        finished earlier is padded with `eos_id`.
        """
        if prompt.ndim == 1:
            prompt = prompt[None]
        if prompt.shape[1] == 0:
            raise PalmEvalError("generate needs a prompt of at least one token")
        cache = KVCache() if use_cache else None
        tokens = prompt
        last = self.logits(self.hidden_states(prompt, cache)[:, -1])
        new, done = [], torch.zeros(prompt.shape[0], dtype=torch.bool, device=prompt.device)
        for _ in range(max_new_tokens):
            nxt = sample(last.float(), temperature, top_k, top_p, generator)
            if eos_id is not None:
                nxt = nxt.masked_fill(done, eos_id)
                done |= nxt == eos_id
            new.append(nxt)
            if bool(done.all()) or len(new) == max_new_tokens:
                break
            if use_cache:
                last = self.logits(self.hidden_states(nxt[:, None], cache)[:, -1])
            else:
                tokens = torch.cat((tokens, nxt[:, None]), dim=1)
                last = self.logits(self.hidden_states(tokens)[:, -1])
        return torch.stack(new, dim=1) if new else prompt.new_zeros((prompt.shape[0], 0))


def sample(
    logits: Tensor,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Next token ids [batch] from logits [batch, vocab]: greedy at temperature 0, else top-k / top-p sampling."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative - sorted_logits.softmax(dim=-1) >= top_p  # keep the smallest prefix reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def top_k_from_filter_thres(filter_thres: float, vocab: int) -> int:
    """The seed's `filter_thres`: keep k = ceil((1 - thres) * vocab) logits."""
    return max(1, math.ceil((1 - filter_thres) * vocab))
