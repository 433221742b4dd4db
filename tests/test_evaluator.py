"""run_eval.py end to end: results.json, bad inputs, resume after kill -9, torchrun with 2 processes."""

import json
import os
import signal
import subprocess
import sys
import time
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch

from palm_eval.checkpoint import save_safetensors
from palm_eval.cli import main as cli
from palm_eval.model import PaLM, PaLMConfig
from palm_eval.registry import ModelCard

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is fastest

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def files(tmp_path_factory, shared_data):
    """A byte-level model trained at 64 (per its metadata), a text corpus, 12 LAMBADA lines, a small passkey task."""
    root = tmp_path_factory.mktemp("eval")
    torch.manual_seed(0)
    model = PaLM(PaLMConfig(num_tokens=257, dim=32, depth=1, heads=2, dim_head=16, ignore_index=256))
    save_safetensors(model, root / "tiny.safetensors", metadata={"train_length": "64"})
    rng = np.random.default_rng(0)
    (root / "corpus.txt").write_text("".join(rng.choice(list("abcdefgh ij\n"), 3000)))
    with open(shared_data("lambada_test.jsonl")) as f:
        (root / "lambada_test.jsonl").write_text("".join(islice(f, 12)))
    (root / "pk.yaml").write_text("task: pk\ntask_type: passkey\nlengths: [400, 8x]\ndepths: [0, 1]\ntrials: 2\n")
    return root


def base_args(files, out):
    return ["--model", files / "tiny.safetensors", "--tokenizer", "byte", "--text-path", files / "corpus.txt",
            "--data-dir", files, "--output-dir", out, "--no-report"]


def small_tasks(files) -> list:
    return ["--tasks", f"text_ppl_64,lambada,{files / 'pk.yaml'}"]


def run_eval(*args) -> int:
    return cli(["eval", *map(str, args)])


def comparable(doc: dict) -> dict:
    """Everything but timing and run metadata, which legitimately differ between runs."""
    return {k: v for k, v in doc.items() if k not in ("run", "timing")}


def read(path: Path) -> dict:
    return json.loads(path.read_text())


def test_end_to_end_results_json(files, tmp_path, capsys):
    assert run_eval(*base_args(files, tmp_path), *small_tasks(files), "--batch-size", "3") == 0
    doc = read(tmp_path / "results.json")
    assert doc["schema"] == "palm-eval/results/v1"
    assert doc["model"]["label"] == "tiny xpos" and doc["model"]["train_length"] == 64
    assert doc["model"]["num_params"] == sum(p.numel() for p in PaLM(PaLMConfig(**doc["model"]["config"])).parameters())
    assert list(doc["results"]) == ["text_ppl_64", "lambada", "pk"]
    ppl = doc["results"]["text_ppl_64"]
    assert ppl["family"] == "text_ppl" and ppl["length"] == ppl["stride"] == 64 and ppl["sequences"] == 46
    assert ppl["eot_scored"] is False and ppl["scored_tokens"] == 46 * 64
    assert ppl["data_fingerprint"].startswith("sha256:")
    assert doc["results"]["lambada"]["count"] == 12 and doc["results"]["pk"]["trials"] == 8
    assert [c["length"] for c in doc["details"]["pk"]["cells"]] == [400, 400, 512, 512]
    assert sum(doc["details"]["text_ppl_64"]["loss_by_position"]["tokens"]) == ppl["scored_tokens"]
    for timing in doc["timing"].values():
        assert timing["wall_time_s"] > 0 and timing["peak_memory_bytes"] > 0 and timing["memory_kind"] == "rss"
    assert doc["run"]["world_size"] == 1 and doc["run"]["batch_size"] == 3 and doc["run"]["dtype"] == "fp32"
    assert doc["task_configs"]["pk"]["lengths"] == [400, "8x"]
    out = capsys.readouterr().out
    assert "text_ppl_64" in out and "passkey" not in out.split("pk")[0]

    # the same command again is answered from the cache, identically
    assert run_eval(*base_args(files, tmp_path), *small_tasks(files), "--batch-size", "3") == 0
    again = read(tmp_path / "results.json")
    assert comparable(again) == comparable(doc) and again["timing"]["text_ppl_64"]["cached_items"] == 46


@pytest.mark.parametrize(
    "args, message",
    [
        (["--tasks", "nope"], "unknown task 'nope': available tasks are builtin_ppl, c4_ppl_16k"),
        (["--tasks", "lambada", "--model", "no_such_model"], "unknown model 'no_such_model'"),
        (["--tasks", "c4_ppl_2k"], "c4_ppl_2k needs data: put c4-validation*.parquet or"),
        (["--tasks", "lambada", "--lambada-path", "/no/such.jsonl"], "--lambada-path /no/such.jsonl does not exist"),
        (["--tasks", "text_ppl_4k,text_ppl_64"], "text_ppl_4k: the data"),
        (["--tasks", "text_ppl_64", "--attn-window", "0"], "at least one token"),
        (["--tasks", "text_ppl_64", "--pos-emb", "alibi"], "--pos-emb must be one of"),
    ],
)
def test_bad_inputs_give_one_clear_line(files, tmp_path, capsys, args, message):
    argv = base_args(files, tmp_path) + args
    if "--model" in args:  # replace the default model
        i = argv.index("--model")
        del argv[i : i + 2]
    assert run_eval(*argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and message in err and "Traceback" not in err


def test_a_failing_task_keeps_the_results_already_computed(files, tmp_path, capsys):
    assert run_eval(*base_args(files, tmp_path), "--tasks", "text_ppl_64,text_ppl_32k") == 2
    assert "fewer than one sequence of 32,768" in capsys.readouterr().err
    assert list(read(tmp_path / "results.json")["results"]) == ["text_ppl_64"]


def test_nonfinite_losses_are_reported_and_exit_nonzero(files, tmp_path, capsys, monkeypatch):
    score = PaLM.score

    def nan_at_position_3(self, tokens, targets):
        nll, greedy = score(self, tokens, targets)
        nll[:, 3] = float("inf")
        return nll, greedy

    monkeypatch.setattr(PaLM, "score", nan_at_position_3)
    assert run_eval(*base_args(files, tmp_path), "--tasks", "text_ppl_64") == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: non-finite losses (tiny xpos text_ppl_64: 46)") and "\n" not in err
    result = read(tmp_path / "results.json")["results"]["text_ppl_64"]
    assert result["nonfinite_tokens"] == 46 and result["scored_tokens"] == 46 * 63 and result["perplexity"] > 1


def test_a_broken_report_never_loses_results(files, tmp_path, capsys, monkeypatch):
    import palm_eval.report

    def broken(*args, **kwargs):
        raise RuntimeError("no fonts")

    monkeypatch.setattr(palm_eval.report, "build_report", broken)
    argv = [a for a in base_args(files, tmp_path) if a != "--no-report"]
    assert run_eval(*argv, "--tasks", "text_ppl_64") == 0
    err = capsys.readouterr().err
    assert "warning: no report (RuntimeError: no fonts); build it later with: palm-eval report" in err
    assert read(tmp_path / "results.json")["results"]["text_ppl_64"]["sequences"] == 46


def test_default_run_picks_up_every_bundled_card(files, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("palm_eval.evaluator.registered_cards", lambda: {})
    assert run_eval("--output-dir", tmp_path) == 2
    assert "no bundled models found" in capsys.readouterr().err

    card = files / "tiny_test.yaml"
    card.write_text(f"name: tiny_test\nbundled: true\ntrain_length: 64\ntokenizer: byte\nconfig: {{}}\n"
                    f"weights: {{path: {files / 'tiny.safetensors'}}}\n")
    cards = {"tiny_test": ModelCard.from_file(card)}
    monkeypatch.setattr("palm_eval.evaluator.registered_cards", lambda: cards)
    monkeypatch.setattr("palm_eval.registry.registered_cards", lambda: cards)
    assert run_eval("--output-dir", tmp_path, "--limit", "1", "--no-report") == 0
    full = read(tmp_path / "tiny_test_xpos" / "results.json")
    windowed = read(tmp_path / "tiny_test_xpos_window=64" / "results.json")
    assert full["model"]["config"]["attn_window"] is None and windowed["model"]["config"]["attn_window"] == 64
    assert list(full["results"]) == [f"builtin_ppl_{k}x" for k in (1, 2, 4, 8, 16)]
    nll = {name: (r["nll"], windowed["results"][name]["nll"]) for name, r in full["results"].items()}
    assert {r["scored_tokens"] for r in [*full["results"].values(), *windowed["results"].values()]} == {1024}
    # at the training length the window changes nothing; beyond it, it does
    assert nll["builtin_ppl_1x"][0] == pytest.approx(nll["builtin_ppl_1x"][1], rel=1e-6)
    assert nll["builtin_ppl_16x"][0] != pytest.approx(nll["builtin_ppl_16x"][1], rel=1e-6)


def test_resume_after_kill_9_gives_identical_results(tmp_path):
    torch.manual_seed(1)
    model = PaLM(PaLMConfig(num_tokens=257, dim=64, depth=2, heads=2, dim_head=32, ignore_index=256))
    save_safetensors(model, tmp_path / "m.safetensors", metadata={"train_length": "256"})
    rng = np.random.default_rng(1)
    (tmp_path / "corpus.txt").write_text("".join(rng.choice(list("abcdefgh ij\n"), 256 * 400)))
    args = ["--model", tmp_path / "m.safetensors", "--tokenizer", "byte", "--text-path", tmp_path / "corpus.txt",
            "--tasks", "text_ppl_256", "--no-report", "--output-dir"]

    proc = subprocess.Popen([sys.executable, "run_eval.py", *map(str, args), tmp_path / "killed"], cwd=ROOT, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cache = tmp_path / "killed" / "cache"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if sum(len(p.read_bytes().splitlines()) for p in cache.glob("*.jsonl")) >= 20:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run ended before it could be killed: make it longer"
    assert not (tmp_path / "killed" / "results.json").exists()

    assert run_eval(*args, tmp_path / "killed") == 0
    assert run_eval(*args, tmp_path / "fresh") == 0
    resumed, fresh = read(tmp_path / "killed" / "results.json"), read(tmp_path / "fresh" / "results.json")
    assert resumed["timing"]["text_ppl_256"]["cached_items"] >= 20
    assert fresh["timing"]["text_ppl_256"]["cached_items"] == 0
    assert comparable(resumed) == comparable(fresh)


def test_torchrun_two_processes_give_the_numbers_of_one(files, tmp_path):
    args = [*base_args(files, tmp_path / "two"), *small_tasks(files), "--batch-size", "4"]
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    "run_eval.py", *map(str, args)], cwd=ROOT, env=ENV, check=True, capture_output=True, timeout=300)
    two = read(tmp_path / "two" / "results.json")
    assert two["run"]["world_size"] == 2
    by_rank = {}  # each process computed its own share of the items, and together all of them
    for path in (tmp_path / "two" / "cache").glob("*.jsonl"):
        ids = {(path.name.split("-")[0], json.loads(line)["id"]) for line in path.read_text().splitlines()}
        by_rank.setdefault(path.name.split(".")[1], set()).update(ids)
    assert set(by_rank) == {"rank0", "rank1"} and not by_rank["rank0"] & by_rank["rank1"]
    assert len(by_rank["rank0"] | by_rank["rank1"]) == 46 + 12 + 8
    assert run_eval(*base_args(files, tmp_path / "one"), *small_tasks(files), "--batch-size", "4") == 0
    assert comparable(two) == comparable(read(tmp_path / "one" / "results.json"))
