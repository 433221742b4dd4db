"""The model against the reference implementation (palm-rlhf-pytorch 0.2.3) and its own invariants."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import palm_eval
from palm_eval.model import PaLM, PaLMConfig, rotary_tables, xpos_factors

palm_rlhf = pytest.importorskip("palm_rlhf_pytorch")

REFERENCE_CONFIGS = [
    dict(num_tokens=300, dim=64, depth=2, dim_head=32, heads=4, qk_rmsnorm=False),
    dict(num_tokens=257, dim=96, depth=3, dim_head=16, heads=8, qk_rmsnorm=True),
    dict(num_tokens=128, dim=48, depth=1, dim_head=64, heads=1, qk_rmsnorm=False, ff_mult=2),
]


def reference_model(seed: int, **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    ref = palm_rlhf.PaLM(**kwargs).eval()
    with torch.no_grad():  # random gains so LayerNorm and qk-rmsnorm scales are exercised, not left at 1
        for name, p in ref.named_parameters():
            if name.endswith(("gamma", "q_scale", "k_scale")):
                p.uniform_(0.5, 1.5)
    return ref


@pytest.fixture(scope="module", params=range(len(REFERENCE_CONFIGS)), ids=lambda i: f"config{i}")
def reference_pair(request, tmp_path_factory):
    kwargs = REFERENCE_CONFIGS[request.param]
    ref = reference_model(request.param, **kwargs)
    path = tmp_path_factory.mktemp("ref") / "model.pt"
    torch.save(ref.state_dict(), path)
    return ref, palm_eval.load_model(path, device="cpu"), kwargs


@pytest.mark.parametrize("length", [1, 17, 256, 700])
def test_logits_match_reference(reference_pair, length):
    ref, ours, kwargs = reference_pair
    tokens = torch.randint(0, kwargs["num_tokens"], (2, length), generator=torch.Generator().manual_seed(length))
    with torch.no_grad():
        expected = ref(tokens)
        for attention in ("sdpa", "eager"):
            ours.config.attention = attention
            torch.testing.assert_close(ours(tokens), expected, atol=1e-5, rtol=1e-5)
    ours.config.attention = "sdpa"


def test_config_inferred_from_reference_file(reference_pair):
    _, ours, kwargs = reference_pair
    for key, value in kwargs.items():
        assert getattr(ours.config, key) == value
    assert ours.config.pos_emb == "xpos"


def test_loss_matches_reference(reference_pair):
    ref, ours, kwargs = reference_pair
    tokens = torch.randint(0, kwargs["num_tokens"], (3, 129), generator=torch.Generator().manual_seed(1))
    tokens[:, ::7] = 0  # id 0 is the ignored target in the reference (GPT-NeoX end-of-text)
    with torch.no_grad():
        torch.testing.assert_close(ours.loss(tokens), ref(tokens, return_loss=True), atol=1e-5, rtol=1e-5)


def tiny(**overrides) -> PaLM:
    torch.manual_seed(0)
    config = dict(num_tokens=97, dim=32, depth=2, heads=4, dim_head=16)
    return PaLM(PaLMConfig(**{**config, **overrides})).eval()


def test_score_equals_cross_entropy_of_full_logits(monkeypatch):
    model = tiny()
    monkeypatch.setattr("palm_eval.model.LOGITS_CHUNK_BYTES", 97 * 4 * 3 * 5)  # force chunks of 5 positions
    tokens = torch.randint(0, 97, (3, 50))
    targets = torch.randint(0, 97, (3, 50))
    with torch.no_grad():
        nll, greedy = model.score(tokens, targets)
        logits = model(tokens)
    expected = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    torch.testing.assert_close(nll, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(greedy, logits.argmax(-1) == targets)


def test_chunked_loss_gradients_equal_plain_loss(monkeypatch):
    model = tiny(ignore_index=3)
    monkeypatch.setattr("palm_eval.model.LOGITS_CHUNK_BYTES", 97 * 4 * 2 * 7)
    tokens = torch.randint(0, 97, (2, 40))
    tokens[:, 5] = 3
    model.loss(tokens).backward()
    chunked = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    logits = model(tokens[:, :-1])
    F.cross_entropy(logits.transpose(1, 2), tokens[:, 1:], ignore_index=3).backward()
    for a, p in zip(chunked, model.parameters()):
        torch.testing.assert_close(a, p.grad, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("pos_emb", ["xpos", "rope"])
def test_window_equals_running_on_the_last_window_only(pos_emb):
    """With one layer, position i under attn_window=W sees exactly tokens (i-W, i]: relative positions only."""
    window = 8
    full = tiny(depth=1, pos_emb=pos_emb)
    windowed = tiny(depth=1, pos_emb=pos_emb, attn_window=window)
    windowed.load_state_dict(full.state_dict())
    tokens = torch.randint(0, 97, (1, 37))
    with torch.no_grad():
        logits = windowed(tokens)
        for i in (3, window - 1, window, 20, 36):
            alone = full(tokens[:, max(0, i - window + 1) : i + 1])[:, -1]
            torch.testing.assert_close(logits[:, i], alone, atol=1e-5, rtol=1e-5)


def test_window_at_or_above_length_changes_nothing():
    model = tiny()
    tokens = torch.randint(0, 97, (2, 30))
    with torch.no_grad():
        expected = model(tokens)
        model.config.attn_window = 30
        torch.testing.assert_close(model(tokens), expected)


@pytest.mark.parametrize("pos_emb,window", [("xpos", None), ("rope", None), ("none", None), ("xpos", 5), ("rope", 6)])
def test_cached_greedy_equals_uncached(pos_emb, window):
    model = tiny(pos_emb=pos_emb, attn_window=window)
    prompt = torch.randint(0, 97, (2, 7))
    cached = model.generate(prompt, 25, temperature=0, use_cache=True)
    uncached = model.generate(prompt, 25, temperature=0, use_cache=False)
    assert cached.shape == (2, 25)
    assert torch.equal(cached, uncached)


def test_generation_stops_at_eos_and_pads():
    model = tiny()
    prompt = torch.randint(0, 97, (1, 4))
    free = model.generate(prompt, 10, temperature=0)
    eos = int(free[0, 2])
    stopped = model.generate(prompt, 10, temperature=0, eos_id=eos)
    first = free[0].tolist().index(eos)
    assert stopped[0].tolist() == free[0, : first + 1].tolist()


def test_sampling_respects_top_k_and_seed():
    from palm_eval.model import sample, top_k_from_filter_thres

    logits = torch.arange(10.0)[None].repeat(500, 1)
    picks = sample(logits, temperature=1.0, top_k=3, generator=torch.Generator().manual_seed(0))
    assert set(picks.tolist()) <= {7, 8, 9}
    again = sample(logits, temperature=1.0, top_k=3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(picks, again)
    assert top_k_from_filter_thres(0.9, 50304) == 5031  # ceil(0.1 * 50304), as the seed's top_k
    nucleus = sample(torch.tensor([[10.0, 9.0, -10.0, -10.0]]).repeat(200, 1), top_p=0.5)
    assert set(nucleus.tolist()) == {0}


def test_bad_tokens_give_clear_errors():
    model = tiny()
    with pytest.raises(palm_eval.PalmEvalError, match=r"token ids must lie in \[0, 97\)"):
        model(torch.tensor([[1, 2, 97]]))
    with pytest.raises(palm_eval.PalmEvalError, match="batch, seq"):
        model(torch.tensor([1, 2, 3]))
    with pytest.raises(palm_eval.PalmEvalError, match="pos_emb must be one of"):
        PaLMConfig(pos_emb="alibi")


def test_position_tables_are_float32_and_exact_at_32k():
    config = PaLMConfig(dim_head=128)
    cos, sin = rotary_tables(config, 32760, 8, torch.device("cpu"))
    assert cos.dtype == torch.float32
    inv_freq = 1.0 / 10000 ** (torch.arange(0, 128, 2, dtype=torch.float64) / 128)
    exact = torch.cos(torch.tensor(32767.0, dtype=torch.float64) * inv_freq)
    torch.testing.assert_close(cos[-1, :64].double(), exact, atol=1e-7, rtol=0)
    # xPos: q factor at i times k factor at j is zeta ** ((i - j) / 512) however far both are from the centre
    positions = torch.tensor([0, 5, 16384, 32767])
    factors = xpos_factors(config, positions, centre=16384).double()
    zeta = (torch.arange(0, 128, 2, dtype=torch.float64) + 0.4 * 128) / (1.4 * 128)
    product = factors[3, :64] / factors[0, :64]
    torch.testing.assert_close(product, zeta ** (32767 / 512), rtol=1e-5, atol=0)
    assert torch.isfinite(factors).all() and factors.max() < 1e18


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("pos_emb,window", [("xpos", None), ("rope", None), ("xpos", 2048)], ids=["xpos", "rope", "window"])
def test_forward_at_32k_is_finite(dtype, pos_emb, window):
    """The palm_150m head layout (8 heads of 128) at 32,768 tokens, with a small width to keep it quick."""
    torch.manual_seed(0)
    model = PaLM(PaLMConfig(num_tokens=64, dim=64, depth=1, heads=8, dim_head=128, pos_emb=pos_emb, attn_window=window))
    model = model.to(dtype).eval()
    tokens = torch.randint(0, 64, (1, 32768))
    with torch.no_grad():
        logits = model(tokens).float()  # a 64-token vocabulary keeps full logits small
    assert torch.isfinite(logits).all()
    nll = F.cross_entropy(logits[0, :-1], tokens[0, 1:])
    assert abs(nll.item() - math.log(64)) < 0.5  # random weights: close to uniform over 64 ids


def test_flash_attn_backend_explains_what_it_needs():
    model = tiny(attention="flash_attn")
    with pytest.raises(palm_eval.PalmEvalError, match="flash-attn|CUDA"):
        model(torch.randint(0, 97, (1, 8)))


@pytest.mark.parametrize("pos_emb,window", [("xpos", None), ("rope", None), ("none", None), ("xpos", 16), ("rope", 12)])
def test_long_inputs_in_pieces_equal_one_piece(monkeypatch, pos_emb, window):
    """Without gradients, inputs longer than BLOCK_ROWS run through each block in pieces (to bound memory)."""
    model = tiny(pos_emb=pos_emb, attn_window=window, qk_rmsnorm=pos_emb == "rope")
    tokens = torch.randint(0, 97, (2, 45))
    targets = torch.randint(0, 97, (2, 45))
    with torch.no_grad():
        expected, (nll, _) = model(tokens), model.score(tokens, targets)
        cache = palm_eval.KVCache()
        model.hidden_states(tokens[:, :20], cache)
        expected_next = model(tokens[:, 20:], cache)
        monkeypatch.setattr("palm_eval.model.BLOCK_ROWS", 7)
        torch.testing.assert_close(model(tokens), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.score(tokens, targets)[0], nll, atol=1e-5, rtol=1e-5)
        cache = palm_eval.KVCache()
        model.hidden_states(tokens[:, :20], cache)
        torch.testing.assert_close(model(tokens[:, 20:], cache), expected_next, atol=1e-5, rtol=1e-5)
