"""torch.hub entry points, named as in the original PaLM repository.

    model = torch.hub.load("path/or/github/repo", "palm_410m_8k_v0")            # pretrained weights
    model = torch.hub.load(".", "palm_150m_8k_v0", source="local", pretrained=False)  # random init

Keyword arguments go to `palm_eval.load_model` (device, dtype, pos_emb, attn_window, ...).
"""

dependencies = ["torch", "safetensors", "tokenizers", "huggingface_hub", "yaml"]


def _load(name: str, pretrained: bool = True, **kwargs):
    from palm_eval import load_model

    return load_model(name, pretrained=pretrained, **kwargs)


def palm_150m_8k_v0(pretrained: bool = True, **kwargs):
    """PaLM 150m (dim 768, depth 12), trained on C4 at 8,192 tokens with xPos."""
    return _load("palm_150m_8k_v0", pretrained, **kwargs)


def palm_410m_8k_v0(pretrained: bool = True, **kwargs):
    """PaLM 410m (dim 1024, depth 24), trained on C4 at 8,192 tokens with xPos."""
    return _load("palm_410m_8k_v0", pretrained, **kwargs)


def palm_1b_8k_v0(pretrained: bool = True, **kwargs):
    """PaLM 1b (dim 2048, depth 16), trained on C4 at 8,192 tokens with xPos."""
    return _load("palm_1b_8k_v0", pretrained, **kwargs)


def palm_2b_8k_v0(pretrained: bool = True, **kwargs):
    """PaLM 2b (dim 2560, depth 24), trained on C4 at 8,192 tokens with xPos."""
    return _load("palm_2b_8k_v0", pretrained, **kwargs)
