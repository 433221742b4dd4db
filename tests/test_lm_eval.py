"""The lm-evaluation-harness integration: the `palm` model, its registration, palm-eval's tasks inside lm-eval.

Expected values are computed here from full-vocabulary logits of one forward pass per window (the adapter uses
the model's chunked `score` and a key/value cache), so both sides would have to be wrong the same way.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from palm_eval import PaLM, PaLMConfig, PalmEvalError, load_model
from palm_eval.checkpoint import save_safetensors

TRAIN_LENGTH = 64
C4_DOCS = 20  # enough C4 validation documents for a 2k sequence, cheap to tokenize twice


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny random PaLM over the GPT-NeoX vocabulary, trained length 64 (metadata only)."""
    torch.manual_seed(0)
    model = PaLM(PaLMConfig(num_tokens=50304, dim=32, depth=2, heads=2, dim_head=16, ff_mult=2))
    path = tmp_path_factory.mktemp("tiny") / "tiny.safetensors"
    return save_safetensors(model, path, metadata={"train_length": str(TRAIN_LENGTH)})


@pytest.fixture(scope="module")
def tokenizer_path(shared_data) -> str:
    return str(shared_data("gpt-neox-20b-tokenizer.json"))


@pytest.fixture(scope="module")
def reference(checkpoint):
    return load_model(checkpoint, device="cpu")


@pytest.fixture(scope="module")
def lm(checkpoint, tokenizer_path):
    from palm_eval.lm_eval_adapter import PalmLM

    return PalmLM(pretrained=str(checkpoint), tokenizer=tokenizer_path, device="cpu", batch_size=3)


def instances(request_type: str, args: list[tuple]) -> list:
    from lm_eval.api.instance import Instance

    return [Instance(request_type, {}, a, i, metadata=("test", i, 1)) for i, a in enumerate(args)]


@torch.no_grad()
def log_probs(model, tokens: list[int]) -> torch.Tensor:
    """log P(tokens[t + 1] | tokens[: t + 1]) for every t, float64, from one full-logits forward pass."""
    x = torch.tensor([tokens])
    logits = model(x[:, :-1]).double().log_softmax(-1)[0]
    return logits.gather(-1, x[0, 1:, None])[:, 0]


@torch.no_grad()
def greedy_next(model, tokens: list[int]) -> int:
    return int(model(torch.tensor([tokens]))[0, -1].argmax())


# ----------------------------------------------------------------------------------------------
# registration


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["/venv/bin/python", "/venv/bin/lm_eval", "--model", "palm"], True),
        (["/venv/bin/python", "/venv/bin/lm-eval", "run"], True),
        (["python", "-u", "-m", "lm_eval", "--tasks", "x"], True),  # torchrun / accelerate launch children
        (["python", "-X", "utf8", "-mlm_eval"], True),
        (["python", "-m", "pytest", "lm_eval"], False),
        (["python", "-c", "import lm_eval"], False),
        (["/venv/bin/python", "/venv/bin/accelerate", "launch", "-m", "lm_eval"], False),  # its children register
        (["python"], False),
    ],
)
def test_registration_runs_only_in_lm_eval_processes(argv, expected):
    from palm_eval_lm_eval_plugin import runs_lm_eval

    assert runs_lm_eval(argv) is expected


def test_palm_registered_beside_the_builtin_models():
    from lm_eval.api.registry import get_model, model_registry

    from palm_eval.lm_eval_adapter import PalmLM

    assert get_model("palm") is PalmLM
    assert get_model("dummy").__name__ == "DummyLM"  # built-ins were imported before `palm` was registered
    assert "hf" in model_registry


# ----------------------------------------------------------------------------------------------
# the model against direct computations


def test_loglikelihood_matches_full_logits(lm, reference, checkpoint, tokenizer_path):
    from palm_eval.lm_eval_adapter import PalmLM

    long_context = " ".join(f"word{i}" for i in range(60))  # > max_length tokens: lm-eval keeps the last 65
    greedy_word = lm.tok_decode([greedy_next(reference, lm.tok_encode("Once upon a time there"))])
    args = [("The capital of France is", " Paris"), ("", "Hello world"), (long_context, " end of it"), ("a b c ", "d"),
            ("Once upon a time there", greedy_word)]
    got = lm.loglikelihood(instances("loglikelihood", args))
    assert [greedy for _, greedy in got] == [False, False, False, False, True]
    one_by_one = PalmLM(pretrained=str(checkpoint), tokenizer=tokenizer_path, device="cpu", batch_size=1)
    unbatched = one_by_one.loglikelihood(instances("loglikelihood", args))
    assert [g for _, g in unbatched] == [g for _, g in got]
    assert [ll for ll, _ in unbatched] == pytest.approx([ll for ll, _ in got], rel=1e-5)
    for (context, continuation), (ll, greedy) in zip(args, got):
        if context:
            context, continuation = context.rstrip(), context[len(context.rstrip()) :] + continuation
            whole = lm.tok_encode(context + continuation)
            n = len(whole) - len(lm.tok_encode(context))
        else:
            whole = [lm.eot_token_id, *lm.tok_encode(continuation)]
            n = len(whole) - 1
        whole = whole[-(TRAIN_LENGTH + 1) :]
        scores = log_probs(reference, whole)[-n:]
        x = torch.tensor([whole])
        argmax = reference(x[:, :-1])[0, -n:].argmax(-1)
        assert ll == pytest.approx(float(scores.sum()), abs=1e-4)
        assert greedy == bool((argmax == x[0, -n:]).all())


def test_loglikelihood_rolling_scores_every_token_once(lm, reference):
    text = " ".join(f"token{i}" for i in range(80))  # 160 tokens: windows of 64, 64 and 32 new tokens
    (got,) = lm.loglikelihood_rolling(instances("loglikelihood_rolling", [(text,)]))
    assert type(got) is float  # not a tuple: lm-eval issue #1531
    tokens = lm.tok_encode(text)
    assert len(tokens) > 2 * TRAIN_LENGTH
    # lm-eval's definition: the first window follows end-of-text; later ones score up to 64 new tokens, each
    # window seeing the 64 tokens before its last target
    expected = float(log_probs(reference, [lm.eot_token_id, *tokens[:TRAIN_LENGTH]]).sum())
    done = TRAIN_LENGTH
    while done < len(tokens):
        end = min(done + TRAIN_LENGTH, len(tokens))
        expected += float(log_probs(reference, tokens[end - TRAIN_LENGTH - 1 : end])[done - end :].sum())
        done = end
    assert got == pytest.approx(expected, abs=1e-3)


def test_tokenized_text_is_scored_as_its_tokens(lm, reference):
    from palm_eval.lm_eval_adapter import TokenizedText

    tokens = lm.tok_encode("One document.") + [lm.eot_token_id] + lm.tok_encode(" Another one, cut in the mid")
    text = lm.tok_decode(tokens)
    fingerprint = lm.tokenizer.fingerprint
    exact = TokenizedText(text, tokens, 510, fingerprint, lm.eot_token_id)
    foreign = TokenizedText(text, tokens, 510, "sha256:another", lm.eot_token_id)
    got_exact, got_foreign, got_text = lm.loglikelihood_rolling(
        instances("loglikelihood_rolling", [(exact,), (foreign,), (text,)])
    )
    scores = log_probs(reference, [510, *tokens])
    assert got_exact == pytest.approx(float(scores[torch.tensor(tokens) != lm.eot_token_id].sum()), abs=1e-4)
    assert got_foreign == got_text  # another tokenizer's ids are never used: the text is encoded again

    too_long = TokenizedText(text, tokens * 8, 510, fingerprint, None)
    with pytest.raises(PalmEvalError, match=f"max_length={len(tokens) * 8} to --model_args"):
        lm.loglikelihood_rolling(instances("loglikelihood_rolling", [(too_long,)]))


def test_generate_until_matches_uncached_greedy_generation(lm, reference):
    prompts = ["Once upon a time", "Long ago there was"]  # both 4 tokens: generated as one batch
    assert len({len(lm.tok_encode(p)) for p in prompts}) == 1
    full = []
    for prompt in prompts:
        ids = reference.generate(torch.tensor([lm.tok_encode(prompt)]), 12, temperature=0, use_cache=False)[0]
        full.append(lm.tok_decode(ids.tolist()))
    stop = lm.tok_decode(lm.tok_encode(full[0])[5:6])  # a stop string that occurs mid-way
    args = [(prompts[0], {"until": [stop], "max_gen_toks": 12}), (prompts[1], {"until": ["\n\n"], "max_gen_toks": 12})]
    got = lm.generate_until(instances("generate_until", args))
    assert got == [full[0].split(stop)[0], full[1].split("\n\n")[0]]
    assert got[0] != full[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the fallback of a machine without CUDA")
def test_cuda_device_falls_back_to_cpu_with_a_warning(checkpoint, tokenizer_path):
    from palm_eval.lm_eval_adapter import PalmLM

    with pytest.warns(UserWarning, match="CUDA is not available"):
        lm = PalmLM(pretrained=str(checkpoint), tokenizer=tokenizer_path, device="cuda:0")
    assert lm.device.type == "cpu"
    assert lm.max_length == TRAIN_LENGTH


def test_unknown_batch_size_is_one_clear_error(checkpoint, tokenizer_path):
    from palm_eval.lm_eval_adapter import PalmLM

    with pytest.raises(PalmEvalError, match="batch_size"):
        PalmLM(pretrained=str(checkpoint), tokenizer=tokenizer_path, device="cpu", batch_size="big")


# ----------------------------------------------------------------------------------------------
# the real commands: lm_eval (as users type it) against run_eval.py on the same model and data

REAL_LAMBADA_DOCS = 16


@pytest.fixture(scope="module")
def data(shared_data, tmp_path_factory, reference, lm) -> dict:
    """A data dir made from ../shared/data: the first C4 validation documents (a small c4-validation*.jsonl), and
    a lambada_test.jsonl of real LAMBADA documents plus some whose last word is the tiny model's greedy
    continuation, so that accuracy is not 0 = 0 (real LAMBADA is beyond a random model)."""
    import pandas as pd

    from palm_eval.lambada import split_document

    folder = tmp_path_factory.mktemp("data")
    texts = pd.read_parquet(shared_data("c4-validation-sample.parquet"), columns=["text"]).text[:C4_DOCS]
    (folder / "c4-validation-head.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    lambada = shared_data("lambada_test.jsonl")
    docs = [json.loads(line)["text"] for line in lambada.read_text().splitlines()[: 4 * REAL_LAMBADA_DOCS]]
    derived = docs[:REAL_LAMBADA_DOCS]
    for doc in docs[REAL_LAMBADA_DOCS:]:
        context, _ = split_document(doc)
        word = lm.tok_decode([greedy_next(reference, lm.tok_encode(context))])
        if word[:1] == " " and word[1:].strip() == word[1:] != "":  # one space-led word: the template's target
            derived.append(context + word)
    assert len(derived) > REAL_LAMBADA_DOCS + 4
    (folder / "lambada_test.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in derived))
    return {"dir": folder, "lambada_docs": len(derived), "real_lambada": lambada}


def lm_eval_command(launcher: list[str], checkpoint: Path, tokenizer_path: str, data: dict, tasks: list[str],
                    samples: dict, out: Path) -> dict:
    """Run lm-eval's CLI in a subprocess (offline, no --device: lm-eval's default cuda:0) and read its results file."""
    from palm_eval.lm_eval_tasks import include_path

    command = [
        *launcher, "--model", "palm",
        "--model_args", f"pretrained={checkpoint},tokenizer={tokenizer_path},max_length=2048",
        "--tasks", ",".join(tasks), "--include_path", include_path(),
        "--metadata", json.dumps({"data_dir": str(data["dir"])}),
        "--samples", json.dumps(samples), "--batch_size", "auto", "--output_path", str(out),
    ]
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(command, env=env, cwd=out.parent, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (path,) = glob.glob(str(out / "**" / "results_*.json"), recursive=True)
    return json.loads(Path(path).read_text())


@pytest.fixture(scope="module")
def lm_eval_results(tmp_path_factory, checkpoint, tokenizer_path, data) -> dict:
    """`lm_eval --model palm` on c4_ppl_2k, lambada_openai_local and lm-eval's own lambada_openai pointed at
    ../shared/data/lambada_test.jsonl."""
    import lm_eval.tasks

    tmp = tmp_path_factory.mktemp("lm_eval")
    builtin = tmp / "lambada_openai.yaml"
    builtin.write_text(
        f"include: {Path(lm_eval.tasks.__file__).parent / 'lambada' / 'lambada_openai.yaml'}\n"
        "dataset_path: json\ndataset_name: null\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data['real_lambada']}\n"
    )
    samples = {"c4_ppl_2k": [0], "lambada_openai_local": list(range(data["lambada_docs"])),
               "lambada_openai": list(range(REAL_LAMBADA_DOCS))}
    return lm_eval_command([str(Path(sys.executable).parent / "lm_eval")], checkpoint, tokenizer_path, data,
                           ["c4_ppl_2k", "lambada_openai_local", str(builtin)], samples, tmp / "out")


@pytest.fixture(scope="module")
def run_eval_results(tmp_path_factory, checkpoint, tokenizer_path, data) -> dict:
    """run_eval.py's results for the same sequences and documents (in-process: same code as the command)."""
    from palm_eval.evaluator import main

    tmp = tmp_path_factory.mktemp("run_eval")
    common = ["--model", str(checkpoint), "--tokenizer", tokenizer_path, "--data-dir", str(data["dir"]),
              "--device", "cpu", "--no-report"]
    runs = {"c4_ppl_2k": ["--tasks", "c4_ppl_2k", "--limit", "1"],
            "lambada": ["--tasks", "lambada", "--limit", str(data["lambada_docs"])],
            "lambada_real": ["--tasks", "lambada", "--limit", str(REAL_LAMBADA_DOCS),
                             "--lambada-path", str(data["real_lambada"])]}
    results = {}
    for name, args in runs.items():
        assert main([*common, *args, "--output-dir", str(tmp / name)]) == 0
        results[name] = json.loads((tmp / name / "results.json").read_text())["results"][args[1]]
    return results


def test_lm_eval_command_runs_palm_and_writes_results(lm_eval_results, data):
    results = lm_eval_results["results"]
    assert lm_eval_results["config"]["model"] == "palm"
    assert lm_eval_results["config"]["max_length"] == 2048  # from get_model_info
    assert {"c4_ppl_2k", "lambada_openai_local", "lambada_openai"} <= set(results)
    assert results["c4_ppl_2k"]["sample_len"] == 1
    assert results["lambada_openai_local"]["sample_len"] == data["lambada_docs"]


def test_c4_perplexity_matches_run_eval(lm_eval_results, run_eval_results):
    ours, theirs = run_eval_results["c4_ppl_2k"], lm_eval_results["results"]["c4_ppl_2k"]
    assert ours["sequences"] == 1 and ours["eot_scored"] is False
    assert theirs["perplexity,none"] == pytest.approx(ours["perplexity"], rel=1e-4)
    assert theirs["bits_per_byte,none"] == pytest.approx(ours["bits_per_byte"], rel=1e-4)


@pytest.mark.parametrize("task, ours", [("lambada_openai_local", "lambada"), ("lambada_openai", "lambada_real")])
def test_lambada_matches_run_eval(lm_eval_results, run_eval_results, task, ours):
    ours, theirs = run_eval_results[ours], lm_eval_results["results"][task]
    assert theirs["sample_len"] == ours["count"]
    assert theirs["acc,none"] == ours["acc"]
    assert theirs["perplexity,none"] == pytest.approx(ours["perplexity"], rel=1e-4)


def test_lambada_accuracy_is_not_trivially_zero(run_eval_results):
    assert run_eval_results["lambada"]["acc"] > 0.2


def test_data_parallel_under_torchrun_gives_the_same_numbers(
    tmp_path, checkpoint, tokenizer_path, data, lm_eval_results
):
    """Two CPU processes (gloo) split the documents; lm-eval gathers them through the model's hooks."""
    launcher = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "lm_eval"]
    task = "lambada_openai_local"
    samples = {task: list(range(data["lambada_docs"]))}
    two = lm_eval_command(launcher, checkpoint, tokenizer_path, data, [task], samples, tmp_path / "out")
    one = lm_eval_results["results"][task]
    assert two["results"][task]["sample_len"] == one["sample_len"] == data["lambada_docs"]
    assert two["results"][task]["acc,none"] == one["acc,none"] > 0
    assert two["results"][task]["perplexity,none"] == pytest.approx(one["perplexity,none"], rel=1e-5)
