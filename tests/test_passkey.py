import pytest
import torch

from palm_eval import PalmEvalError, load_tokenizer
from palm_eval.model import PaLM, PaLMConfig
from palm_eval.passkey import FILLER, INTRO, QUESTION, PasskeyTask, build_trial, score_trial
from palm_eval.tasks import RunContext

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is fastest

BYTE = load_tokenizer("byte")


def tiny() -> PaLM:
    torch.manual_seed(0)
    return PaLM(PaLMConfig(num_tokens=257, dim=32, depth=1, heads=2, dim_head=16, ignore_index=256)).eval()


def test_prompt_has_the_key_at_its_depth_and_fills_the_length():
    keys = [12345, 67890, 11111]
    filler = len(BYTE.encode(FILLER))
    positions = []
    for depth in (0.0, 0.5, 1.0):
        prompt, answers = build_trial(BYTE, 1000, depth, keys)
        text = BYTE.decode(prompt)
        assert 1000 - filler < len(prompt) + len(answers[0]) <= 1000
        assert text.startswith(INTRO) and text.endswith(QUESTION) and text.count("12345") == 2
        assert answers == [BYTE.encode(" 12345"), BYTE.encode(" 67890"), BYTE.encode(" 11111")]
        positions.append(text.index("The pass key is 12345"))
    assert positions[0] == len(INTRO) + 1 and positions[0] < positions[1] < positions[2]
    assert BYTE.decode(build_trial(BYTE, 1000, 1.0, keys)[0]).endswith("is the pass key." + QUESTION)
    with pytest.raises(PalmEvalError, match="too short"):
        build_trial(BYTE, 200, 0.5, keys)


def test_cached_scoring_equals_full_forward_passes():
    model = tiny()
    prompt, answers = build_trial(BYTE, 400, 0.5, [12345, 54321])
    greedy, lls = score_trial(model, prompt, answers)
    with torch.no_grad():
        for answer, ll in zip(answers, lls):
            logp = model(torch.tensor([prompt + answer])).float().log_softmax(-1)[0, len(prompt) - 1 : -1]
            assert ll == pytest.approx(logp.gather(-1, torch.tensor(answer)[:, None]).sum().item(), rel=1e-5)
        generated = model.generate(torch.tensor([prompt]), len(answers[0]), temperature=0, use_cache=False)
    assert greedy == (generated[0].tolist() == answers[0])


def test_task_cells_seeding_and_chance(monkeypatch):
    config = {"task": "passkey", "task_type": "passkey", "lengths": [400, "8x"], "depths": [0, 1], "trials": 2,
              "distractors": 4}
    task = PasskeyTask("passkey", config, RunContext(model=tiny(), tokenizer=BYTE, train_length=64, seed=3))
    items = task.items()
    assert len(items) == 2 * 2 * 2 and items[0][0] == "400:0.0:0" and items[-1][0] == "512:1.0:1"
    keys = task.keys(400, 0.0, 0)
    assert keys == task.keys(400, 0.0, 0) != task.keys(400, 0.0, 1) and len(set(keys)) == 5
    assert all(10000 <= k <= 99999 for k in keys)
    results = dict(zip([i for i, _ in items], task.evaluate(items)))
    entries, details = task.aggregate(results)
    assert entries["passkey"]["trials"] == 8 and entries["passkey"]["chance_loglik"] == 0.2
    assert [(c["length"], c["depth"], c["trials"]) for c in details["passkey"]["cells"]] == [
        (400, 0.0, 2), (400, 1.0, 2), (512, 0.0, 2), (512, 1.0, 2)]

    # ties are not wins: a model with uniform output scores 0 both ways
    with torch.no_grad():
        task.ctx.model.token_emb.weight.zero_()
    entries, _ = task.aggregate(dict(zip([i for i, _ in items], task.evaluate(items))))
    assert entries["passkey"]["acc_loglik"] == 0 and entries["passkey"]["acc_greedy"] == 0

    # a model that always prefers the true key wins every trial by log-likelihood
    monkeypatch.setattr("palm_eval.passkey.score_trial", lambda model, prompt, answers: (True, [0.0] + [-1.0] * 4))
    entries, details = task.aggregate(dict(zip([i for i, _ in items], task.evaluate(items))))
    assert entries["passkey"]["acc_loglik"] == 1 and entries["passkey"]["acc_greedy"] == 1
