import json
import math
from itertools import islice
from pathlib import Path

import pytest
import torch
import yaml

from palm_eval import load_tokenizer
from palm_eval.lambada import LambadaTask, encode_pair, split_document
from palm_eval.model import PaLM, PaLMConfig
from palm_eval.tasks import RunContext, task_config

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is fastest


@pytest.fixture(scope="module")
def lambada_lines(shared_data):
    """The first 100 documents plus 100 with trailing or doubled spaces, where the split is subtle."""
    docs = [json.loads(line)["text"] for line in shared_data("lambada_test.jsonl").read_text().splitlines()]
    odd = [d for d in docs if d != d.strip() or "  " in d]
    return docs[:100] + odd[:100]


def lm_eval_templates() -> tuple[str, str]:
    import lm_eval

    config = yaml.safe_load((Path(lm_eval.__file__).parent / "tasks/lambada/lambada_openai.yaml").read_text())
    return config["doc_to_text"], config["doc_to_target"]


def test_split_matches_lm_eval_lambada_openai(lambada_lines, neox_tokenizer):
    from lm_eval.api.model import TemplateLM
    from lm_eval.utils import apply_template

    doc_to_text, doc_to_target = lm_eval_templates()

    class Causal:  # just what TemplateLM._encode_pair uses
        backend = "causal"

        def tok_encode(self, text, add_special_tokens=None):
            return neox_tokenizer.encode(text)

    assert any(d.endswith(" ") or "  " in d for d in lambada_lines)
    for text in lambada_lines:
        context, target = split_document(text)
        assert context == apply_template(doc_to_text, {"text": text})
        assert target == apply_template(doc_to_target, {"text": text})
        assert encode_pair(neox_tokenizer, context, target) == tuple(TemplateLM._encode_pair(Causal(), context, target))


def test_split_examples():
    assert split_document("he said hello") == ("he said", " hello")
    assert split_document("ends with space ") == ("ends with space", " ")
    tok = load_tokenizer("byte")
    assert encode_pair(tok, "a b ", " c") == (list(b"a b"), list(b"  c"))  # trailing space moves to the target
    assert encode_pair(tok, "", " word") == ([256], list(b" word"))


def run(model, path, batch_size, limit=None):
    ctx = RunContext(model=model, tokenizer=load_tokenizer("byte"), limit=limit, paths={"lambada_path": str(path)})
    task = LambadaTask("lambada", task_config("lambada"), ctx)
    items, results = task.items(), {}
    for i in range(0, len(items), batch_size):
        batch = items[i : i + batch_size]
        results.update(zip([k for k, _ in batch], task.evaluate(batch)))
    return task, results, task.aggregate(results)[0]["lambada"]


@pytest.fixture(scope="module")
def small_lambada(tmp_path_factory, shared_data):
    path = tmp_path_factory.mktemp("lambada") / "lambada_test.jsonl"
    with open(shared_data("lambada_test.jsonl")) as f:
        path.write_text("".join(islice(f, 12)))
    return path


def test_acc_and_perplexity_definitions(small_lambada):
    torch.manual_seed(0)
    model = PaLM(PaLMConfig(num_tokens=257, dim=32, depth=1, heads=2, dim_head=16, ignore_index=256)).eval()
    task, results, entry = run(model, small_lambada, batch_size=1)
    assert entry["count"] == 12 and entry["nonfinite"] == 0
    lls, hits = [], []
    for i, (context, target) in enumerate(task.pairs):  # one unpadded pass per document, by hand
        x = torch.tensor([context + target])
        logp = model(x).float().log_softmax(-1)[0, len(context) - 1 : -1]
        lls.append(logp.gather(-1, torch.tensor(target)[:, None]).sum().item())
        hits.append(bool((logp.argmax(-1) == torch.tensor(target)).all()))
        assert results[str(i)]["ll"] == pytest.approx(lls[-1], rel=1e-5)
    assert entry["perplexity"] == pytest.approx(math.exp(-sum(lls) / len(lls)), rel=1e-5)
    assert entry["acc"] == sum(hits) / len(hits)
    # batching changes no number
    assert run(model, small_lambada, batch_size=5)[2] == entry

    with torch.no_grad():  # uniform output: every target byte costs log 257, and argmax is id 0, never a target
        model.token_emb.weight.zero_()
    _, _, uniform = run(model, small_lambada, batch_size=4, limit=3)
    mean_bytes = sum(len(t) for _, t in task.pairs[:3]) / 3
    assert uniform["count"] == 3 and uniform["acc"] == 0.0
    assert uniform["perplexity"] == pytest.approx(257**mean_bytes, rel=1e-5)
