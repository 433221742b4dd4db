"""Reading and writing PaLM weights without ever running pickled code.

On disk, weights use the key names of palm-rlhf-pytorch 0.2.1-0.2.3, the implementation the published
checkpoints were saved from (`layers.{i}.fn.fused_attn_ff_proj.weight`, `layers.{i}.fn.ff_out.2.weight`,
...), so files move freely between the two. `.pt` files are read with `torch.load(weights_only=True)`;
`.safetensors` files carry the model config in their metadata.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import tempfile
from pathlib import Path

import torch
from torch import Tensor

from palm_eval.errors import PalmEvalError
from palm_eval.model import PaLM, PaLMConfig

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
FORMAT_TAG = "palm-eval"


def _reference_key(key: str) -> str:
    key = re.sub(r"^layers\.(\d+)\.", r"layers.\1.fn.", key)
    return key.replace(".fn.ff_out.weight", ".fn.ff_out.2.weight")


def _our_key(key: str) -> str:
    key = key.replace(".fn.ff_out.2.weight", ".fn.ff_out.weight")
    return re.sub(r"^layers\.(\d+)\.fn\.", r"layers.\1.", key)


def reference_state_dict(model: PaLM, include_derived: bool = False) -> dict[str, Tensor]:
    """The model's weights under palm-rlhf-pytorch 0.2.3 key names.

    include_derived adds what that package also saves and can be recomputed: the tied `to_logits.weight`
    and each layer's rotary `inv_freq` / xPos `scale` buffers, so that `PaLM.load_state_dict` of the
    reference accepts the result strictly.
    """
    state = {_reference_key(k): v.detach() for k, v in model.state_dict().items()}
    if include_derived:
        state["to_logits.weight"] = state["token_emb.weight"]
        for i in range(model.config.depth):
            for name, value in _rotary_buffers(model.config).items():
                state[f"layers.{i}.fn.rotary_emb.{name}"] = value
    return state


def _rotary_buffers(config: PaLMConfig) -> dict[str, Tensor]:
    """The per-layer buffers the reference saves: rotary `inv_freq` and xPos `scale` (zeta), float32."""
    d = config.dim_head
    return {
        "inv_freq": 1.0 / (config.rotary_base ** (torch.arange(0, d, 2).float() / d)),
        "scale": (torch.arange(0, d, 2) + 0.4 * d) / (1.4 * d),
    }


def read_state_dict(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Tensors and metadata from a `.safetensors` or a pickled (`.pt`, `.pth`, `.bin`) state dict."""
    path = Path(path)
    if not path.is_file():
        raise PalmEvalError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
        except Exception as e:
            raise PalmEvalError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}") from None
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=False)
    except pickle.UnpicklingError as e:
        reason = str(e).strip().splitlines()[-1][:200]
        raise PalmEvalError(
            f"refusing to load {path}: it is a pickle that would import or run code ({reason}); palm-eval only "
            "loads plain tensors. If you trust the file, re-save its state_dict() with torch.save or convert it "
            "to .safetensors where it was made."
        ) from None
    except Exception as e:
        raise PalmEvalError(
            f"{path} is not a readable PyTorch checkpoint (truncated or corrupt?): {str(e).splitlines()[0][:200]}; "
            "download it again"
        ) from None
    for wrapper in ("state_dict", "model", "module"):  # accept common single-level wrappers
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise PalmEvalError(f"{path} does not hold a state dict of tensors (found {type(obj).__name__})")
    return obj, {}


def infer_config(state: dict[str, Tensor]) -> dict:
    """Architecture fields recovered from tensor shapes (reference key names)."""
    try:
        num_tokens, dim = state["token_emb.weight"].shape
        depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"layers\.(\d+)\.", k)))
        fused_rows = state["layers.0.fn.fused_attn_ff_proj.weight"].shape[0]
        attn_inner = state["layers.0.fn.attn_out.weight"].shape[1]
        ff_inner = state["layers.0.fn.ff_out.2.weight"].shape[1]
    except (KeyError, ValueError, IndexError):
        return {}
    dim_head = (fused_rows - attn_inner - 2 * ff_inner) // 2
    if dim_head <= 0 or attn_inner % dim_head or ff_inner % dim:
        return {}
    return dict(
        num_tokens=num_tokens,
        dim=dim,
        depth=depth,
        heads=attn_inner // dim_head,
        dim_head=dim_head,
        ff_mult=ff_inner // dim,
        qk_rmsnorm="layers.0.fn.q_scale" in state,
    )


def _describe(cfg: dict) -> str:
    keys = ("num_tokens", "dim", "depth", "heads", "dim_head", "ff_mult", "qk_rmsnorm")
    return " ".join(f"{k}={cfg[k]}" for k in keys if k in cfg)


def _short(keys: list[str]) -> str:
    return ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")


def load_weights(model: PaLM, state: dict[str, Tensor], source: str, gamma_offset: bool | None = None) -> None:
    """Load reference-named tensors into `model` strictly (assigning them: `model` may live on "meta").

    gamma_offset: palm-rlhf-pytorch >= 0.2.4 stores LayerNorm gains as offsets from 1 under the same
    names. None detects such files and refuses them; True adds 1; False loads as is.
    """
    state = dict(state)
    rotary = {k: state.pop(k) for k in [k for k in state if ".rotary_emb." in k]}  # derived: checked below
    tied = state.pop("to_logits.weight", None)
    if tied is not None and "token_emb.weight" in state and not torch.equal(tied, state["token_emb.weight"]):
        raise PalmEvalError(f"{source}: to_logits.weight differs from token_emb.weight; only tied embeddings are supported")

    expected_shapes = {_reference_key(k): v.shape for k, v in model.state_dict().items()}
    found = infer_config(state)
    held = f"; the file holds {_describe(found)}" if found else ""
    wanted = f"the model expects {_describe(model.config.to_dict())}"
    missing = sorted(set(expected_shapes) - set(state))
    unexpected = sorted(set(state) - set(expected_shapes))
    if missing or unexpected:
        parts = ([f"missing keys {_short(missing)}"] if missing else []) + (
            [f"unexpected keys {_short(unexpected)}"] if unexpected else []
        )
        raise PalmEvalError(f"{source} does not fit this model: {'; '.join(parts)}; {wanted}{held}")
    wrong = [k for k, shape in expected_shapes.items() if state[k].shape != shape]
    if wrong:
        k = wrong[0]
        raise PalmEvalError(
            f"{source} does not fit this model: {k} has shape {tuple(state[k].shape)}, expected {tuple(expected_shapes[k])}"
            f" ({len(wrong)} tensors differ); {wanted}{held}"
        )

    d = model.config.dim_head
    derived = _rotary_buffers(model.config)
    for key, stored in rotary.items():
        expected = derived[key.rsplit(".", 1)[1]]
        if stored.shape != expected.shape or not torch.allclose(stored.float(), expected, rtol=1e-3):
            raise PalmEvalError(f"{source}: {key} does not match a rotary embedding of dim_head={d}, base 10000")

    gains = torch.cat([v.float().flatten() for k, v in state.items() if k.endswith("norm.gamma")])
    if gamma_offset is None and gains.median().abs() < 0.5:
        raise PalmEvalError(
            f"{source} looks saved by palm-rlhf-pytorch >= 0.2.4, which stores LayerNorm gains as offsets from 1 "
            f"(median gain {gains.median().item():.3f}); load it with gamma_offset=True (or gamma_offset=False if "
            "it really comes from <= 0.2.3)"
        )
    if gamma_offset:
        state = {k: v + 1 if k.endswith("norm.gamma") else v for k, v in state.items()}
    model.load_state_dict({_our_key(k): v for k, v in state.items()}, strict=True, assign=True)


def save_safetensors(model: PaLM, path: str | os.PathLike, metadata: dict | None = None) -> Path:
    """Write weights (reference key names, tied embedding once) with the config in the metadata, atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {k: v.contiguous().cpu() for k, v in reference_state_dict(model).items()}
    meta = {"format": FORMAT_TAG, "config": json.dumps(model.config.to_dict())}
    meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()})
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
    return path


def config_from_metadata(metadata: dict[str, str]) -> dict:
    return json.loads(metadata["config"]) if metadata.get("format") == FORMAT_TAG and "config" in metadata else {}


def atomic_write(path: Path, write) -> None:
    """Call write(tmp_path) on a temporary file beside `path`, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; results and weights are meant to be shared
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def convert_to_safetensors(
    src: str | os.PathLike, dst: str | os.PathLike | None = None, gamma_offset: bool | None = None
) -> Path:
    """Convert a .pt state dict (read with weights_only, so safe for untrusted files) to .safetensors."""
    src = Path(src)
    dst = Path(dst) if dst else src.with_suffix(".safetensors")
    state, metadata = read_state_dict(src)
    cfg = infer_config(state) or config_from_metadata(metadata)
    if not cfg:
        raise PalmEvalError(f"{src} does not look like a PaLM state dict (no token_emb / layers.0.fn.* tensors)")
    with torch.device("meta"):
        model = PaLM(PaLMConfig(**cfg))
    load_weights(model, state, str(src), gamma_offset=gamma_offset)
    return save_safetensors(model, dst, {"converted_from": src.name})
