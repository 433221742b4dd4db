"""Models by name: one YAML card per model in `models/`, and `load_model` for names, cards and files.

A card holds the architecture (`config`), the training length, the tokenizer and where the weights are:
`weights.path` (a file beside the card) or `weights.hf_repo` + `weights.filename` (a Hugging Face repo).
Hub weights are looked for in `$PALM_EVAL_WEIGHTS_DIR` (default ~/.cache/palm_eval), then in the
Hugging Face cache, then downloaded. Adding a model is adding one card.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import torch
import yaml

from palm_eval.checkpoint import PICKLE_SUFFIXES, config_from_metadata, infer_config, load_weights, read_state_dict
from palm_eval.errors import PalmEvalError
from palm_eval.hub import hub_file
from palm_eval.model import PaLM, PaLMConfig

CONFIG_FIELDS = {f.name for f in fields(PaLMConfig)}
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def resource_dir(name: str) -> Path:
    """`models` or `tasks`: inside the installed wheel, else at the repository root (editable installs)."""
    bundled = Path(__file__).parent / "_bundled" / name
    return bundled if bundled.is_dir() else Path(__file__).resolve().parent.parent / name


@dataclass
class ModelCard:
    name: str
    config: dict
    source: str  # the card file, or the checkpoint a card was made up for
    aliases: list[str] = field(default_factory=list)
    description: str = ""
    train_length: int | None = None
    tokenizer: str | None = None
    weights: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)  # everything else the card says (parameters, data, command...)

    @classmethod
    def from_file(cls, path: Path) -> "ModelCard":
        try:
            raw = yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as e:
            raise PalmEvalError(f"cannot read model card {path}: {e}") from None
        if not isinstance(raw, dict) or "name" not in raw or not isinstance(raw.get("config"), dict):
            raise PalmEvalError(f"model card {path} needs at least `name:` and a `config:` mapping")
        unknown = set(raw["config"]) - CONFIG_FIELDS
        if unknown:
            raise PalmEvalError(f"model card {path}: unknown config fields {sorted(unknown)}")
        known = {f.name for f in fields(cls)} - {"source", "extra"}
        return cls(
            source=str(path),
            **{k: v for k, v in raw.items() if k in known},
            extra={k: v for k, v in raw.items() if k not in known},
        )

    def to_dict(self) -> dict:
        return {"name": self.name, "aliases": self.aliases, "description": self.description, "config": self.config,
                "train_length": self.train_length, "tokenizer": self.tokenizer, "weights": self.weights,
                "source": self.source, **self.extra}


def registered_cards() -> dict[str, ModelCard]:
    """Every card in `models/`, by name and by alias."""
    cards: dict[str, ModelCard] = {}
    for path in sorted(resource_dir("models").glob("*.yaml")):
        card = ModelCard.from_file(path)
        for key in [card.name, *card.aliases]:
            cards[key] = card
    return cards


def get_card(name_or_path: str | os.PathLike) -> ModelCard:
    """A registered name or alias, a card file, or a checkpoint file (a card is made up for it)."""
    spec = str(name_or_path)
    path = Path(spec).expanduser()
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise PalmEvalError(f"model card not found: {path}")
        return ModelCard.from_file(path)
    if path.suffix in (*PICKLE_SUFFIXES, ".safetensors"):
        if not path.is_file():
            raise PalmEvalError(f"checkpoint not found: {path}")
        weights = {"path": str(path.resolve())}
        for card in registered_cards().values():  # a published file keeps its card: training length, tokenizer
            if card.weights.get("filename") == path.name:
                return replace(card, source=str(path), weights=weights)
        return ModelCard(name=path.stem, config={}, source=str(path), weights=weights)
    cards = registered_cards()
    if spec not in cards:
        names = sorted({c.name for c in cards.values()})
        raise PalmEvalError(
            f"unknown model {spec!r}: registered models are {', '.join(names)}; "
            "or pass a card (.yaml) or a checkpoint (.pt / .safetensors) path"
        )
    return cards[spec]


def weights_dir() -> Path:
    return Path(os.environ.get("PALM_EVAL_WEIGHTS_DIR", Path.home() / ".cache" / "palm_eval")).expanduser()


def resolve_weights(card: ModelCard) -> Path:
    """The local file holding the card's weights, downloading it from the hub if needed and possible."""
    if "path" in card.weights:
        path = Path(card.weights["path"])
        if not path.is_absolute():
            path = Path(card.source).parent / path
        if not path.is_file():
            raise PalmEvalError(f"weights of {card.name} not found at {path}")
        return path
    repo, filename = card.weights.get("hf_repo"), card.weights.get("filename")
    if not (repo and filename):
        raise PalmEvalError(f"model card {card.source} says nowhere where its weights are (weights.path or hf_repo + filename)")
    local = weights_dir() / filename
    if local.is_file():
        return local
    try:
        return Path(hub_file(repo, filename))
    except PalmEvalError as e:
        raise PalmEvalError(
            f"weights of {card.name} are not on this machine ({e}): download "
            f"https://huggingface.co/{repo}/resolve/main/{filename} and place it at {local} "
            "(or set PALM_EVAL_WEIGHTS_DIR to its folder, or pass the file path as the model)"
        ) from None


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise PalmEvalError(f"unknown dtype {dtype!r}: use fp32 or bf16 (or fp16)")
    return DTYPES[dtype]


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The requested device; a CUDA device on a machine without one falls back to the CPU with a warning."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError:
        raise PalmEvalError(f"unknown device {device!r}: use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        warnings.warn(f"device {device} requested but CUDA is not available; running on the CPU", stacklevel=2)
        return torch.device("cpu")
    return device


def load_model(
    name_or_path: str | os.PathLike,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    pretrained: bool = True,
    gamma_offset: bool | None = None,
    **overrides,
) -> PaLM:
    """A PaLM from a registered name, a card, or a checkpoint file, in eval mode.

    overrides change config fields that need no retraining, e.g. pos_emb="rope", attn_window=2048,
    attention="eager". The returned model carries its card as `model.card`.
    """
    card = get_card(name_or_path)
    unknown = set(overrides) - CONFIG_FIELDS
    if unknown:
        raise PalmEvalError(f"unknown model options {sorted(unknown)}; valid: {', '.join(sorted(CONFIG_FIELDS))}")
    overrides = {k: v for k, v in overrides.items() if v is not None or k == "attn_window"}
    if pretrained:
        path = resolve_weights(card)
        state, metadata = read_state_dict(path)
        stored = config_from_metadata(metadata) or infer_config(state)
        if not card.config and not stored:
            raise PalmEvalError(f"{path} does not look like a PaLM state dict (no token_emb / layers.0.fn.* tensors)")
        config = PaLMConfig(**{**stored, **card.config, **overrides})
        with torch.device("meta"):
            model = PaLM(config)
        load_weights(model, state, str(path), gamma_offset=gamma_offset)
        if card.train_length is None and "train_length" in metadata:
            card.train_length = int(metadata["train_length"])
        if card.tokenizer is None and "tokenizer" in metadata:
            card.tokenizer = metadata["tokenizer"]
    else:
        model = PaLM(PaLMConfig(**{**card.config, **overrides}))
    model.card = card
    return model.to(device=resolve_device(device), dtype=resolve_dtype(dtype) or torch.float32).eval()
