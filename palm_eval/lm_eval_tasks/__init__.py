"""palm-eval's tasks for lm-evaluation-harness: `c4_ppl_2k` ... `c4_ppl_32k` and `lambada_openai_local`.

    lm_eval --model palm --model_args pretrained=palm_150m,max_length=16384 --tasks c4_ppl_16k \\
        --include_path $(python -m palm_eval.lm_eval_tasks) --metadata '{"data_dir": "../shared/data"}'

The data is what `run_eval.py --data-dir DIR` reads, found by the same names (palm-eval's tasks/*.yaml):
`data_dir`, or `c4_path` / `lambada_path`, in `--metadata`. lm-eval passes the `--model_args` along too, so the
C4 sequences are cut in the model's tokens (`tokenizer`, else the card of `pretrained`, else GPT-NeoX-20B).

A c4_ppl document is one of palm-eval's evaluation sequences: L targets after one context token, cut from
the token stream (documents + end-of-text, concatenated). Its target is a `TokenizedText`, which `palm` scores
token for token as `run_eval.py` does (and other lm-eval models score as text); end-of-text targets are not
counted unless `score_eot=true`, as for the published models. `perplexity` is exp(sum nll / scored tokens) and
`bits_per_byte` sum nll / ln 2 / bytes of the scored tokens, as in run_eval.py's results.
"""

from __future__ import annotations

import os
from pathlib import Path

from palm_eval.errors import PalmEvalError
from palm_eval.tokenizer import NEOX_HUB_ID, Tokenizer, load_tokenizer

NO_SKIP = -1  # "score every target" in a dataset column (datasets columns cannot mix int and None)


def include_path() -> str:
    """The directory to pass to `lm_eval --include_path`."""
    return str(Path(__file__).parent)


def perplexity_dataset(task: str, **metadata):
    """custom_dataset of c4_ppl_<L>: the sequences run_eval.py evaluates for the palm-eval task `task`."""
    import datasets

    from palm_eval.perplexity import plan_windows
    from palm_eval.tasks import RunContext, parse_length, task_config

    config = task_config(task)
    (length,) = (parse_length(spec, None, task) for spec in config["lengths"])
    tokenizer = _tokenizer(metadata)
    ctx = _run_context(RunContext, tokenizer, metadata)
    stream = ctx.token_stream(_sources(task, config, ctx), None)
    skip = None if metadata.get("score_eot") else tokenizer.eos_id
    fingerprint = tokenizer.fingerprint
    rows = []
    for window in plan_windows(len(stream), length, length):
        sequence = stream[window.start : window.start + length + 1]
        targets = sequence[1:]
        scored = targets if skip is None else targets[targets != skip]
        rows.append({
            "text": tokenizer.decode(targets.tolist()),
            "context": int(sequence[0]),
            "tokens": targets.tolist(),
            "skip_target": NO_SKIP if skip is None else skip,
            "tokenizer": fingerprint,
            "scored_tokens": len(scored),
            "scored_bytes": int(ctx.byte_lengths[scored].sum()),
        })
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def sequence_target(doc: dict):
    from palm_eval.lm_eval_adapter import TokenizedText

    skip = None if doc["skip_target"] == NO_SKIP else doc["skip_target"]
    return TokenizedText(doc["text"], doc["tokens"], doc["context"], doc["tokenizer"], skip)


def sequence_results(doc: dict, results: list[float]) -> dict:
    (loglikelihood,) = results
    return {"perplexity": (loglikelihood, doc["scored_tokens"]), "bits_per_byte": (loglikelihood, doc["scored_bytes"])}


def lambada_dataset(**metadata):
    """custom_dataset of lambada_openai_local: {"text"} documents of the file run_eval.py's lambada reads."""
    import datasets

    from palm_eval.data import read_documents
    from palm_eval.tasks import RunContext, task_config

    ctx = _run_context(RunContext, None, metadata)
    sources = _sources("lambada", task_config("lambada"), ctx)
    texts = [text for source in sources for text in read_documents(source)]
    return datasets.DatasetDict({"test": datasets.Dataset.from_dict({"text": texts})})


def _tokenizer(metadata: dict) -> Tokenizer:
    """The model's tokenizer as lm-eval passes --model_args: `tokenizer`, else the palm card's, else GPT-NeoX."""
    spec = metadata.get("tokenizer")
    if spec is None and metadata.get("pretrained") is not None:
        from palm_eval.registry import get_card

        try:
            spec = get_card(metadata["pretrained"]).tokenizer
        except PalmEvalError:  # not a palm model (e.g. --model hf)
            spec = None
    return load_tokenizer(spec or NEOX_HUB_ID)


def _run_context(cls, tokenizer, metadata: dict):
    data_dir = metadata.get("data_dir") or os.environ.get("PALM_EVAL_DATA_DIR")
    paths = {key: metadata.get(key) for key in ("c4_path", "lambada_path")}
    return cls(model=None, tokenizer=tokenizer, data_dir=Path(data_dir) if data_dir else None, paths=paths)


def _sources(task: str, config: dict, ctx) -> tuple[str, ...]:
    from palm_eval.tasks import resolve_source

    try:
        return resolve_source(task, config, ctx)
    except PalmEvalError as e:
        option = (config.get("data") or {}).get("option", "data_dir")
        raise PalmEvalError(
            f"{e} — with lm_eval: --metadata '{{\"data_dir\": \"DIR\"}}' (or '{{\"{option}\": \"FILE\"}}'), "
            "or set PALM_EVAL_DATA_DIR"
        ) from None
