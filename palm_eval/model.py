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
LOGITS_CHUNK_BYTES = 64 * 2**20  # float32 logits held at once while scoring or computing the loss


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


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate in float32 (the result stays float32; the caller casts back)."""
    x = x.float()
    return x * cos + rotate_half(x) * sin


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

    k = k[:, None].expand(b, h, nk, d)
    v = v[:, None].expand(b, h, nk, d)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=square_causal and nq > 1)


def attention(q: Tensor, k: Tensor, v: Tensor, q_start: int, config: PaLMConfig) -> Tensor:
    """Attention of queries at positions q_start.. over keys that end at the last query.

    q arrives rotated in float32, k and v rotated in the model dtype. Without a window this is one block;
    with `attn_window` W, queries are processed in blocks of W, each over only the keys it may see, so
    memory grows linearly with length and xPos factors (centred per block) never leave the float range.
    """
    nq, nk = q.shape[2], k.shape[1]
    k_start = q_start + nq - nk
    window = config.attn_window
    block = nq if window is None else window
    outputs = []
    for s in range(0, nq, block):
        e = min(nq, s + block)
        first_key = k_start if window is None else max(k_start, q_start + s - window + 1)
        ks, ke = first_key - k_start, q_start + e - k_start
        q_blk, k_blk, v_blk = q[:, :, s:e], k[:, ks:ke], v[:, ks:ke]
        if config.pos_emb == "xpos":
            q_pos = torch.arange(q_start + s, q_start + e, device=q.device)
            k_pos = torch.arange(first_key, q_start + e, device=q.device)
            centre = q_start + s + (e - s) // 2
            q_blk = q_blk * xpos_factors(config, q_pos, centre)
            k_blk = k_blk.float() / xpos_factors(config, k_pos, centre)
            _check_finite_xpos(q_blk, k_blk, nk, config)
        dtype = v.dtype
        outputs.append(_attend(q_blk.to(dtype), k_blk.to(dtype), v_blk, q_start + s, first_key, window, config.attention))
    return torch.cat(outputs, dim=2) if len(outputs) > 1 else outputs[0]


def _check_finite_xpos(q: Tensor, k: Tensor, length: int, config: PaLMConfig) -> None:
    if not (torch.isfinite(k).all() and torch.isfinite(q).all()):
        raise PalmEvalError(
            f"xPos factors overflow float32 over {length} keys without a window: "
            f"set attn_window (e.g. the training length) or evaluate shorter sequences"
        )


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
        self, x: Tensor, start: int, rope: tuple[Tensor, Tensor] | None, past: tuple[Tensor, Tensor] | None
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """Returns the block output and this layer's keys and values (past included) for the cache."""
        b, n, _ = x.shape
        q, k, v, ff = self.fused_attn_ff_proj(self.norm(x)).split(self.fused_dims, dim=-1)
        q = q.view(b, n, self.config.heads, self.config.dim_head).transpose(1, 2)
        if self.config.qk_rmsnorm:
            q = F.normalize(q, dim=-1) * self.q_scale
            k = F.normalize(k, dim=-1) * self.k_scale
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope).to(x.dtype)
        if past is not None:
            k, v = torch.cat((past[0], k), dim=1), torch.cat((past[1], v), dim=1)
        out = attention(q, k, v, start, self.config)
        out = out.transpose(1, 2).reshape(b, n, -1)
        ff_x, gate = ff.chunk(2, dim=-1)
        return x + self.attn_out(out) + self.ff_out(F.silu(gate) * ff_x), (k, v)


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
        rope = None if self.config.pos_emb == "none" else rotary_tables(self.config, start, n, tokens.device)
        if cache is not None and not cache.layers:
            cache.layers = [None] * len(self.layers)
        x = self.token_emb(tokens)
        for i, layer in enumerate(self.layers):
            x, kv = layer(x, start, rope, cache.layers[i] if cache is not None else None)
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

    def score(self, tokens: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """Per-position negative log-likelihood of `targets` and whether each is the argmax.

        targets[:, t] is the token predicted after tokens[:, :t+1]. Returns float32 nll [batch, seq]
        and bool greedy [batch, seq], computed over chunks of positions in float32.
        """
        if targets.shape != tokens.shape:
            raise PalmEvalError(f"targets shape {tuple(targets.shape)} must equal tokens shape {tuple(tokens.shape)}")
        hidden = self.hidden_states(tokens)
        nll = torch.empty(targets.shape, dtype=torch.float32, device=tokens.device)
        greedy = torch.empty(targets.shape, dtype=torch.bool, device=tokens.device)
        rows = self._chunk_rows(tokens.shape[0])
        for s in range(0, tokens.shape[1], rows):
            logits = self.logits(hidden[:, s : s + rows]).float()
            target = targets[:, s : s + rows, None]
            nll[:, s : s + rows] = (logits.logsumexp(dim=-1, keepdim=True) - logits.gather(-1, target)).squeeze(-1)
            greedy[:, s : s + rows] = logits.argmax(dim=-1) == target.squeeze(-1)
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
            if torch.is_grad_enabled():
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
