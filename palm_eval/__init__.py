"""palm-eval: evaluation and length-extrapolation benchmarks for PaLM-family language models."""

from palm_eval.errors import PalmEvalError
from palm_eval.model import KVCache, PaLM, PaLMConfig
from palm_eval.registry import get_card, load_model, registered_cards
from palm_eval.tokenizer import load_tokenizer

__version__ = "0.1.0"

__all__ = [
    "KVCache",
    "PaLM",
    "PaLMConfig",
    "PalmEvalError",
    "get_card",
    "load_model",
    "load_tokenizer",
    "registered_cards",
]
