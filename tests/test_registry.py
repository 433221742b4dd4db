"""Model cards, weight discovery (local folder, Hugging Face cache, offline errors), torch.hub, CLI errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import palm_eval
from palm_eval.checkpoint import save_safetensors
from palm_eval.model import PaLM, PaLMConfig
from palm_eval.registry import get_card, registered_cards

REPO = Path(__file__).resolve().parents[1]
# Published parameter counts (tied embedding once), from the original PaLM repository's README.
PUBLISHED = {"palm_150m": 144_811_776, "palm_410m": 410_149_888, "palm_1b": 983_861_248, "palm_2b": 2_157_836_800}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_cards_build_models_of_the_published_size(name):
    card = get_card(name)
    assert card.train_length == 8192 and card.tokenizer == "EleutherAI/gpt-neox-20b"
    with torch.device("meta"):
        model = PaLM(PaLMConfig(**card.config))
    assert model.num_params() == PUBLISHED[name] == card.extra["parameters"]
    assert get_card(f"{name}_8k_v0").source == registered_cards()[name].source


def test_unknown_model_lists_the_registered_ones():
    with pytest.raises(palm_eval.PalmEvalError, match="unknown model 'palm_3b': registered models are .*palm_150m"):
        palm_eval.load_model("palm_3b")


def hub_card(tmp_path: Path) -> Path:
    card = tmp_path / "hubby.yaml"
    card.write_text(
        "name: hubby\nconfig: {num_tokens: 50, dim: 32, depth: 1, heads: 2, dim_head: 16}\n"
        "train_length: 128\ntokenizer: byte\nweights: {hf_repo: someone/hubby, filename: hubby.pt}\n"
    )
    return card


def small_state(seed: int = 0) -> dict:
    torch.manual_seed(seed)
    from palm_eval.checkpoint import reference_state_dict

    return reference_state_dict(PaLM(PaLMConfig(num_tokens=50, dim=32, depth=1, heads=2, dim_head=16)))


def test_offline_error_says_which_file_to_put_where(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("PALM_EVAL_WEIGHTS_DIR", str(tmp_path / "weights"))
    with pytest.raises(palm_eval.PalmEvalError) as err:
        palm_eval.load_model(hub_card(tmp_path))
    message = str(err.value)
    assert "https://huggingface.co/someone/hubby/resolve/main/hubby.pt" in message
    assert str(tmp_path / "weights" / "hubby.pt") in message


def test_weights_found_in_the_local_weights_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("PALM_EVAL_WEIGHTS_DIR", str(tmp_path / "weights"))
    (tmp_path / "weights").mkdir()
    torch.save(small_state(), tmp_path / "weights" / "hubby.pt")
    model = palm_eval.load_model(hub_card(tmp_path))
    assert model.card.name == "hubby" and model.card.train_length == 128


def test_weights_found_in_the_hugging_face_cache(tmp_path, monkeypatch):
    """The layout huggingface_hub writes: models--org--name/{refs/main, snapshots/<commit>/file}."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("PALM_EVAL_WEIGHTS_DIR", str(tmp_path / "empty"))
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    commit = "0" * 40
    repo = tmp_path / "hf" / "models--someone--hubby"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    state = small_state(3)
    torch.save(state, repo / "snapshots" / commit / "hubby.pt")
    model = palm_eval.load_model(hub_card(tmp_path))
    assert torch.equal(model.token_emb.weight, state["token_emb.weight"])


def test_overrides_change_position_handling_without_retraining(tmp_path):
    model = PaLM(PaLMConfig(num_tokens=50, dim=32, depth=1, heads=2, dim_head=16))
    path = save_safetensors(model, tmp_path / "m.safetensors")
    loaded = palm_eval.load_model(path, pos_emb="rope", attn_window=16, attention="eager")
    assert (loaded.config.pos_emb, loaded.config.attn_window, loaded.config.attention) == ("rope", 16, "eager")
    with pytest.raises(palm_eval.PalmEvalError, match="unknown model options"):
        palm_eval.load_model(path, rotary="yes")
    with pytest.raises(palm_eval.PalmEvalError, match="pos_emb must be one of"):
        palm_eval.load_model(path, pos_emb="alibi")


def test_torch_hub_entry_points_load_locally():
    model = torch.hub.load(str(REPO), "palm_150m_8k_v0", source="local", pretrained=False, trust_repo=True)
    assert model.num_params() == PUBLISHED["palm_150m"]
    small = torch.hub.load(str(REPO), "palm_2b_8k_v0", source="local", pretrained=False, depth=1, dim=64)
    assert small.config.dim_head == 128 and small.config.dim == 64


@pytest.mark.parametrize(
    "args,expected",
    [
        (["generate", "hi", "--model", "palm_3b"], "unknown model 'palm_3b'"),
        (["generate", "hi", "--model", "missing.pt"], "checkpoint not found"),
        (["convert", "missing.pt"], "checkpoint not found"),
        (["frobnicate"], "unknown command"),
    ],
)
def test_cli_errors_are_one_line(args, expected, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "palm_eval.cli", *args], capture_output=True, text=True, cwd=tmp_path, timeout=120
    )
    assert result.returncode == 2
    assert expected in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_generate_command_runs_on_a_checkpoint(tmp_path):
    model = PaLM(PaLMConfig(num_tokens=257, dim=32, depth=1, heads=2, dim_head=16))
    path = save_safetensors(model, tmp_path / "m.safetensors")
    from palm_eval.cli import main

    assert main(["generate", "def f", "--model", str(path), "--tokenizer", "byte", "--seq_len", "12",
                 "--temperature", "0"]) == 0


def test_a_published_file_passed_by_path_keeps_its_card(tmp_path):
    """palm_150m_8k_v0.pt given directly still knows its training length and tokenizer."""
    path = tmp_path / "palm_150m_8k_v0.pt"
    path.write_bytes(b"not read by get_card")
    card = get_card(path)
    assert (card.name, card.train_length, card.tokenizer) == ("palm_150m", 8192, "EleutherAI/gpt-neox-20b")
    assert card.weights == {"path": str(path.resolve())}
