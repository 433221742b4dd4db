"""Checkpoint files: strict loading, clear errors, no pickled code, safetensors round trips."""

from __future__ import annotations

import pickle
import subprocess
import sys

import pytest
import torch

import palm_eval
from palm_eval.checkpoint import read_state_dict, reference_state_dict, save_safetensors
from palm_eval.model import PaLM, PaLMConfig

palm_rlhf = pytest.importorskip("palm_rlhf_pytorch")
CONFIG = dict(num_tokens=200, dim=64, depth=2, dim_head=32, heads=4)


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    return palm_rlhf.PaLM(**CONFIG).eval()


@pytest.fixture()
def reference_file(reference, tmp_path):
    path = tmp_path / "palm.pt"
    torch.save(reference.state_dict(), path)
    return path


def tokens():
    return torch.randint(0, CONFIG["num_tokens"], (1, 50), generator=torch.Generator().manual_seed(0))


def test_reference_file_without_rotary_buffers_loads(reference, tmp_path):
    state = {k: v for k, v in reference.state_dict().items() if "rotary_emb" not in k and k != "to_logits.weight"}
    torch.save(state, tmp_path / "bare.pt")
    model = palm_eval.load_model(tmp_path / "bare.pt")
    with torch.no_grad():
        torch.testing.assert_close(model(tokens()), reference(tokens()), atol=1e-5, rtol=1e-5)


def test_safetensors_round_trip_keeps_config_and_outputs(reference_file, tmp_path):
    model = palm_eval.load_model(reference_file, pos_emb="rope")
    path = save_safetensors(model, tmp_path / "m.safetensors", {"train_length": 64, "tokenizer": "byte"})
    again = palm_eval.load_model(path)
    assert again.config == model.config  # the config, pos_emb included, travels in the metadata
    assert (again.card.train_length, again.card.tokenizer) == (64, "byte")
    with torch.no_grad():
        assert torch.equal(again(tokens()), model(tokens()))


def test_export_loads_strictly_into_the_reference(reference_file, tmp_path):
    model = palm_eval.load_model(reference_file)
    torch.save(reference_state_dict(model, include_derived=True), tmp_path / "export.pt")
    torch.manual_seed(1)
    ref = palm_rlhf.PaLM(**CONFIG).eval()
    ref.load(tmp_path / "export.pt")  # the reference's own loader: strict load_state_dict
    with torch.no_grad():
        torch.testing.assert_close(ref(tokens()), model(tokens()), atol=1e-5, rtol=1e-5)


def test_convert_command(reference, reference_file, tmp_path):
    from palm_eval.cli import main

    out = tmp_path / "converted.safetensors"
    assert main(["convert", str(reference_file), str(out)]) == 0
    model = palm_eval.load_model(out)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens()), reference(tokens()), atol=1e-5, rtol=1e-5)


def test_missing_and_unexpected_keys_are_named(reference, tmp_path):
    state = reference.state_dict()
    del state["layers.1.fn.attn_out.weight"]
    state["layers.1.fn.extra.weight"] = torch.zeros(3)
    torch.save(state, tmp_path / "broken.pt")
    with pytest.raises(palm_eval.PalmEvalError) as err:
        palm_eval.load_model(tmp_path / "broken.pt")
    message = str(err.value)
    assert "missing keys layers.1.fn.attn_out.weight" in message
    assert "unexpected keys layers.1.fn.extra.weight" in message
    assert "\n" not in message


def test_wrong_shapes_report_the_config_the_file_holds(reference_file, tmp_path):
    card = tmp_path / "card.yaml"
    card.write_text(
        f"name: wrong\nconfig: {{num_tokens: 200, dim: 64, depth: 2, dim_head: 16, heads: 8}}\n"
        f"weights: {{path: {reference_file}}}\n"
    )
    with pytest.raises(palm_eval.PalmEvalError, match=r"the file holds num_tokens=200 dim=64 depth=2 heads=4 dim_head=32"):
        palm_eval.load_model(card)


def test_truncated_files_are_refused(reference_file, tmp_path):
    data = reference_file.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(palm_eval.PalmEvalError, match="truncated or corrupt"):
        palm_eval.load_model(tmp_path / "cut.pt")
    model = palm_eval.load_model(reference_file)
    good = save_safetensors(model, tmp_path / "good.safetensors")
    (tmp_path / "cut.safetensors").write_bytes(good.read_bytes()[:1000])
    with pytest.raises(palm_eval.PalmEvalError, match="truncated or corrupt"):
        palm_eval.load_model(tmp_path / "cut.safetensors")


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (subprocess.call, ([sys.executable, "-c", f"open({str(self.marker)!r}, 'w').write('pwned')"],))


def test_pickles_that_run_code_are_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"token_emb.weight": _RunsCode(marker)}, f)
    with pytest.raises(palm_eval.PalmEvalError, match="refusing to load"):
        read_state_dict(path)
    assert not marker.exists()


def test_offset_layernorm_files_are_detected(reference, tmp_path):
    """palm-rlhf-pytorch >= 0.2.4 stores gamma - 1 under the same names: refuse unless told."""
    state = {k: (v - 1 if k.endswith("norm.gamma") else v) for k, v in reference.state_dict().items()}
    torch.save(state, tmp_path / "new.pt")
    with pytest.raises(palm_eval.PalmEvalError, match="gamma_offset=True"):
        palm_eval.load_model(tmp_path / "new.pt")
    model = palm_eval.load_model(tmp_path / "new.pt", gamma_offset=True)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens()), reference(tokens()), atol=1e-5, rtol=1e-5)


def test_untied_output_weights_are_refused(reference, tmp_path):
    state = dict(reference.state_dict())
    state["to_logits.weight"] = state["to_logits.weight"].clone() + 1
    torch.save(state, tmp_path / "untied.pt")
    with pytest.raises(palm_eval.PalmEvalError, match="only tied embeddings"):
        palm_eval.load_model(tmp_path / "untied.pt")


def test_not_a_state_dict(tmp_path):
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(palm_eval.PalmEvalError, match="does not hold a state dict"):
        palm_eval.load_model(tmp_path / "list.pt")
    with pytest.raises(palm_eval.PalmEvalError, match="checkpoint not found"):
        palm_eval.load_model(tmp_path / "absent.pt")


def test_wrapped_state_dicts_load(reference, tmp_path):
    torch.save({"model": reference.state_dict()}, tmp_path / "wrapped.pt")
    model = palm_eval.load_model(tmp_path / "wrapped.pt")
    assert isinstance(model, PaLM) and model.config.depth == CONFIG["depth"]


def test_random_model_saved_and_loaded_in_bf16(tmp_path):
    model = PaLM(PaLMConfig(num_tokens=50, dim=32, depth=1, heads=2, dim_head=16)).to(torch.bfloat16)
    path = save_safetensors(model, tmp_path / "bf16.safetensors")
    loaded = palm_eval.load_model(path, dtype="bf16")
    assert loaded.token_emb.weight.dtype == torch.bfloat16
    assert torch.equal(loaded.token_emb.weight, model.token_emb.weight)
