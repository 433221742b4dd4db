"""`palm-eval report`: figures, tables and factual sentences from one or more results.json files.

Every number shown comes from the results files (docs/results-schema.md); the report only selects,
formats and plots them, and its sentences state measurements, never conclusions. Several files merge
into one comparison (e.g. an xPos / RoPE / windowed-attention ablation). A report is `report.md`, a
self-contained `report.html` (figures embedded) and `figures/` (PNG and SVG) in the output directory;
other files there, such as the results themselves, are left alone.
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from palm_eval import plots
from palm_eval.checkpoint import atomic_write
from palm_eval.errors import PalmEvalError
from palm_eval.plots import MEMORY_KINDS, length_label

SCHEMA = "palm-eval/results/v1"
# numeric result fields that are sizes or settings, not metrics: shown beside the metrics, not as rows
NOT_METRICS = {"length", "stride", "scored_tokens", "scored_bytes", "nonfinite_tokens", "nonfinite", "sequences",
               "count", "trials", "distractors", "seed"}
SCORED_UNITS = {"scored_tokens": "tokens", "count": "examples", "trials": "trials"}
COMPARABILITY = ("data_fingerprint", "stride", "eot_scored")  # fields that must agree for runs to be compared
RUN_FIELDS = ["command", "date", "git_commit", "versions", "device", "dtype", "seed", "batch_size", "limit",
              "world_size", "wall_time_s"]


# ----------------------------------------------------------------------------------------------
# reading and checking results files


class _Invalid(Exception):
    """What is wrong inside one results file; `_load` prefixes the file's name."""


@dataclass
class Run:
    source: str  # the file as given, or a description of an in-memory dict
    data: dict

    @property
    def label(self) -> str:
        model = self.data["model"]
        if model.get("label"):
            return model["label"]
        config = model.get("config") or {}
        window = f" window={config['attn_window']}" if config.get("attn_window") else ""
        return f"{model['name']} {config.get('pos_emb', '')}".strip() + window

    @property
    def train_length(self) -> int | None:
        return self.data["model"].get("train_length")


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_number(obj: dict, key: str, where: str, *, nullable=False, integer=False, minimum=None):
    if key not in obj:
        raise _Invalid(f"{where} has no {key!r}")
    v = obj[key]
    if v is None and nullable:
        return
    kind = "an integer" if integer else "a number"
    if not _is_number(v) or (integer and not isinstance(v, int)):
        raise _Invalid(f"{where}.{key} must be {kind}{' or null' if nullable else ''}, got {json.dumps(v)[:40]}")
    if not math.isfinite(v):
        raise _Invalid(f"{where}.{key} is {v}; results must write null for a non-finite value")
    if minimum is not None and v < minimum:
        raise _Invalid(f"{where}.{key} must be >= {minimum}, got {v}")


def _check_dict(obj, where: str) -> dict:
    if not isinstance(obj, dict):
        raise _Invalid(f"{where} must be a JSON object, got {type(obj).__name__}")
    return obj


def _validate(data) -> None:
    """The parts of the schema the report relies on; unknown extra fields are allowed."""
    _check_dict(data, "the file")
    if data.get("schema") != SCHEMA:
        raise _Invalid(f"schema is {json.dumps(data.get('schema'))}, expected {json.dumps(SCHEMA)}: not a "
                       "results.json written by run_eval.py, or one from an incompatible version")
    model = _check_dict(data.get("model"), "model")
    if not any(isinstance(model.get(k), str) and model[k].strip() for k in ("label", "name")):
        raise _Invalid("model has neither a 'label' nor a 'name'")
    _check_number(model, "train_length", "model", nullable=True, integer=True, minimum=1)
    _check_dict(data.get("run"), "run")
    results = _check_dict(data.get("results"), "results")
    if not results:
        raise _Invalid("results is empty: the run evaluated no task")
    for task, res in results.items():
        where = f"results.{task}"
        _check_dict(res, where)
        if not isinstance(res.get("task_type"), str):
            raise _Invalid(f"{where} has no 'task_type'")
        for key, v in res.items():
            if _is_number(v):
                _check_number(res, key, where)
        if res["task_type"] == "perplexity":
            if not isinstance(res.get("family"), str):
                raise _Invalid(f"{where} has no 'family' (the name of the curve its length belongs to)")
            _check_number(res, "length", where, integer=True, minimum=1)
            _check_number(res, "perplexity", where, nullable=True, minimum=1)
            _check_number(res, "scored_tokens", where, integer=True, minimum=0)
            _check_number(res, "nonfinite_tokens", where, integer=True, minimum=0)
    details = _check_dict(data.get("details", {}), "details")
    for task, det in details.items():
        _check_dict(det, f"details.{task}")
        if "loss_by_position" in det:
            where = f"details.{task}.loss_by_position"
            lbp = _check_dict(det["loss_by_position"], where)
            lists = [lbp.get(k) for k in ("start", "end", "nll", "tokens", "nonfinite")]
            if not all(isinstance(v, list) for v in lists) or len({len(v) for v in lists}) != 1:
                raise _Invalid(f"{where} needs lists start, end, nll, tokens, nonfinite of equal length")
            for i, row in enumerate(zip(*lists)):
                row = dict(zip(("start", "end", "nll", "tokens", "nonfinite"), row))
                for key in ("start", "tokens", "nonfinite"):
                    _check_number(row, key, f"{where}[{i}]", integer=True, minimum=0)
                _check_number(row, "end", f"{where}[{i}]", integer=True, minimum=row["start"] + 1)
                _check_number(row, "nll", f"{where}[{i}]", nullable=True)
        if "cells" in det:
            if not isinstance(det["cells"], list):
                raise _Invalid(f"details.{task}.cells must be a list")
            for i, cell in enumerate(det["cells"]):
                where = f"details.{task}.cells[{i}]"
                _check_dict(cell, where)
                _check_number(cell, "length", where, integer=True, minimum=1)
                _check_number(cell, "depth", where, minimum=0)
                for key in ("acc_greedy", "acc_loglik"):
                    _check_number(cell, key, where, nullable=True, minimum=0)
    for task, t in _check_dict(data.get("timing", {}), "timing").items():
        _check_dict(t, f"timing.{task}")
        for key in ("wall_time_s", "tokens_per_s", "peak_memory_bytes"):
            if key in t:
                _check_number(t, key, f"timing.{task}", nullable=True, minimum=0)


def _load(item: str | os.PathLike | dict, index: int) -> Run:
    if isinstance(item, dict):
        source, data = f"results #{index + 1} (in memory)", item
    else:
        source = str(item)
        try:
            text = Path(item).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise PalmEvalError(f"{source}: no such file; pass the results.json that run_eval.py wrote") from None
        except (OSError, UnicodeDecodeError) as e:
            raise PalmEvalError(f"{source}: cannot read it ({e})") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise PalmEvalError(f"{source}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); "
                                "was it truncated? re-run the evaluation to write it again") from None
    try:
        _validate(data)
    except _Invalid as e:
        raise PalmEvalError(f"{source}: {e}") from None
    return Run(source, data)


def _merge_check(runs: list[Run]) -> None:
    """Runs of one model may be split over files (e.g. long lengths on another machine), but no task twice."""
    seen: dict[tuple[str, str], str] = {}
    for run in runs:
        for task in run.data["results"]:
            key = (run.label, task)
            if key in seen:
                raise PalmEvalError(
                    f"{seen[key]} and {run.source} both hold results of {run.label!r} on {task!r}; pass only one "
                    "of them, or give the models distinct model.label values")
            seen[key] = run.source


# ----------------------------------------------------------------------------------------------
# the numbers, as tables (pandas)


def _fmt(v) -> str:
    """4 significant digits without exponents below a million; what a paper table would print."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    a = abs(v)
    if a >= 1e6:
        return f"{v:.3e}"
    if a >= 1000:
        return f"{v:,.0f}"
    if a >= 100:
        return f"{v:.1f}"
    if a >= 10:
        return f"{v:.2f}"
    if a >= 0.01:
        return f"{v:.3f}"
    return f"{v:.3g}" if a else "0"


def _scored(res: dict) -> str:
    """How much a metric rests on: "20,480 tokens", "5,153 examples" or "60 trials"."""
    return next((f"{_fmt(res[k])} {unit}" for k, unit in SCORED_UNITS.items() if _is_number(res.get(k))), "")


def _task_order(runs: list[Run]) -> list[str]:
    tasks = {task: res for run in runs for task, res in run.data["results"].items()}
    return sorted(tasks, key=lambda t: (tasks[t].get("family", t), tasks[t].get("length", 0), t))


def _perplexity_frame(runs: list[Run]) -> pd.DataFrame:
    rows = [
        {"label": run.label, "task": task, "family": res["family"], "length": res["length"],
         "perplexity": float("nan") if res["perplexity"] is None else float(res["perplexity"]),
         "nll": float("nan") if res.get("nll") is None else float(res["nll"]),
         "scored_tokens": res["scored_tokens"], "nonfinite_tokens": res["nonfinite_tokens"]}
        for run in runs for task, res in run.data["results"].items() if res["task_type"] == "perplexity"
    ]
    return pd.DataFrame(rows, columns=["label", "task", "family", "length", "perplexity", "nll", "scored_tokens",
                                       "nonfinite_tokens"])


def _curves_frame(runs: list[Run]) -> pd.DataFrame:
    rows = []
    for run in runs:
        for task, res in run.data["results"].items():
            lbp = run.data.get("details", {}).get(task, {}).get("loss_by_position")
            if res["task_type"] != "perplexity" or not lbp:
                continue
            for start, end, nll, nonfinite in zip(lbp["start"], lbp["end"], lbp["nll"], lbp["nonfinite"]):
                rows.append({"family": res["family"], "label": run.label, "length": res["length"], "start": start,
                             "end": end, "nll": float("nan") if nll is None else float(nll), "nonfinite": nonfinite})
    return pd.DataFrame(rows)


def _passkey_frame(runs: list[Run]) -> pd.DataFrame:
    tasks = {task for run in runs for task, res in run.data["results"].items() if res["task_type"] == "passkey"}
    rows = []
    for run in runs:
        for task in sorted(tasks & set(run.data["results"])):
            for cell in run.data.get("details", {}).get(task, {}).get("cells", []):
                nan = float("nan")
                rows.append({"label": run.label if len(tasks) == 1 else f"{run.label} · {task}",
                             "length": cell["length"], "depth": cell["depth"],
                             "acc_greedy": nan if cell["acc_greedy"] is None else cell["acc_greedy"],
                             "acc_loglik": nan if cell["acc_loglik"] is None else cell["acc_loglik"]})
    return pd.DataFrame(rows)


def _timing_frame(runs: list[Run]) -> pd.DataFrame:
    rows = [
        {"label": run.label, "task": task, "length": run.data["results"].get(task, {}).get("length"),
         "wall_time_s": t.get("wall_time_s"), "tokens_per_s": t.get("tokens_per_s"),
         "peak_memory_bytes": t.get("peak_memory_bytes"), "memory_kind": t.get("memory_kind"),
         "cached_items": t.get("cached_items") or 0}
        for run in runs for task, t in run.data.get("timing", {}).items()
    ]
    return pd.DataFrame(rows, columns=["label", "task", "length", "wall_time_s", "tokens_per_s",
                                       "peak_memory_bytes", "memory_kind", "cached_items"])


def _metrics_table(runs: list[Run], labels: list[str]) -> pd.DataFrame:
    """Every task × metric × model, with how much was scored and how many losses were non-finite."""
    rows = []
    for task in _task_order(runs):
        for label in labels:
            for run in (r for r in runs if r.label == label and task in r.data["results"]):
                res = run.data["results"][task]
                scored = _scored(res)
                for metric, value in res.items():
                    if metric in NOT_METRICS or not (value is None or _is_number(value)):
                        continue
                    rows.append({"Task": task, "Metric": metric, "Model": label,
                                 "Value": _fmt(value) if value is not None else
                                 "non-finite" if "nonfinite_tokens" in res else "n/a", "Scored": scored,
                                 "Non-finite": _fmt(res.get("nonfinite_tokens", res.get("nonfinite")))})
    return pd.DataFrame(rows)


def _perplexity_tables(ppl: pd.DataFrame, labels: list[str], train_length: dict) -> dict[str, pd.DataFrame]:
    """Per family: perplexity by length (rows) and model (columns), ready to paste into a paper."""
    tables = {}
    for family, fam in ppl.groupby("family", sort=False):
        models = [label for label in labels if label in set(fam["label"])]
        trains = {train_length.get(label) for label in models}
        shared = trains.pop() if len(trains) == 1 else None
        rows = []
        for length in sorted(fam["length"].unique()):
            row = {"Length": f"{length:,}"}
            if shared:
                row["× training length"] = f"{length / shared:g}×"
            for label in models:
                hit = fam[(fam["label"] == label) & (fam["length"] == length)]
                if hit.empty:
                    row[label] = "—"
                elif math.isnan(hit["perplexity"].iloc[0]):
                    row[label] = "non-finite"
                else:
                    row[label] = _fmt(hit["perplexity"].iloc[0]) + (" †" if hit["nonfinite_tokens"].iloc[0] else "")
            rows.append(row)
        tables[family] = pd.DataFrame(rows)
    return tables


def _timing_table(timing: pd.DataFrame) -> pd.DataFrame:
    table = pd.DataFrame([
        {"Model": r.label, "Task": r.task, "Length": _fmt(None if pd.isna(r.length) else int(r.length)),
         "Wall time (s)": _fmt(r.wall_time_s), "Tokens/s": _fmt(r.tokens_per_s),
         "Peak memory (MiB)": "" if pd.isna(r.peak_memory_bytes) else _fmt(r.peak_memory_bytes / 2**20),
         "Memory kind": MEMORY_KINDS.get(r.memory_kind, r.memory_kind or ""), "Items from cache": _fmt(r.cached_items)}
        for r in timing.itertuples()
    ])
    return table if (timing["cached_items"] > 0).any() else table.drop(columns="Items from cache")


def _metadata_table(runs: list[Run]) -> pd.DataFrame:
    """One column per results file: where each number came from and how to reproduce it."""
    columns = {}
    labels = [run.label for run in runs]
    for run in runs:
        model, info = run.data["model"], run.data["run"]
        config = model.get("config") or {}
        header = run.label if labels.count(run.label) == 1 else f"{run.label} ({Path(run.source).name})"
        setting = ", ".join(str(v) for v in (config.get("pos_emb"), config.get("attention")) if v)
        if config.get("attn_window"):
            setting += f", window {config['attn_window']}"
        col = {"results file": run.source, "model": model.get("name", ""),
               "parameters": _fmt(model.get("num_params")), "training length": _fmt(model.get("train_length")),
               "position / attention": setting}
        for key in RUN_FIELDS + sorted(set(info) - set(RUN_FIELDS)):
            v = info.get(key)
            if isinstance(v, dict):
                v = ", ".join(f"{k} {x}" for k, x in v.items())
            name = re.sub(r"_s$", " (s)", key).replace("_", " ")
            col[name] = "" if v is None else _fmt(v) if _is_number(v) else str(v)
        columns[header] = col
    return pd.DataFrame(columns).rename_axis("Field").reset_index()


def _fingerprint_table(runs: list[Run]) -> pd.DataFrame:
    rows = []
    for task in _task_order(runs):
        by_print: dict[str, list[str]] = {}
        for run in runs:
            fp = run.data["results"].get(task, {}).get("data_fingerprint")
            if fp:
                by_print.setdefault(fp, []).append(run.label)
        rows += [{"Task": task, "Data fingerprint": fp, "Models": ", ".join(models)} for fp, models in by_print.items()]
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------------------------
# sentences: what was measured, in words


def _at(length: int, train: int | None) -> str:
    return f"{length_label(length)} tokens" + (f" ({length / train:g}× its training length)" if train else "")


def _perplexity_sentences(ppl: pd.DataFrame, labels: list[str], train_length: dict) -> list[str]:
    out = []
    for family, fam in ppl.groupby("family", sort=False):
        for label in (label for label in labels if label in set(fam["label"])):
            rows = fam[fam["label"] == label].sort_values("length")
            train = train_length.get(label)
            finite = rows[rows["perplexity"].notna()]
            parts = []
            if len(finite):
                within = finite[finite["length"] <= train] if train else finite.iloc[:0]
                ref = within.iloc[-1] if len(within) else finite.iloc[0]
                last = finite.iloc[-1]
                a, b = ref["perplexity"], last["perplexity"]
                if last["length"] == ref["length"]:
                    parts.append(f"perplexity is {_fmt(a)} at {_at(ref['length'], train)}")
                else:
                    verb = "rises" if b > a else "falls" if b < a else "is unchanged"
                    parts.append(f"perplexity {verb} from {_fmt(a)} at {_at(ref['length'], train)} to {_fmt(b)} at "
                                 f"{_at(last['length'], train).replace(' its training length', '')}")
            dead = rows[rows["perplexity"].isna() & rows["nll"].isna()]
            if len(dead):
                parts.append(f"at {', '.join(length_label(n) for n in dead['length'])} tokens no scored token had a "
                             "finite loss (perplexity undefined)")
            for r in rows[rows["perplexity"].isna() & rows["nll"].notna()].itertuples():
                parts.append(f"at {length_label(r.length)} tokens the mean NLL is {_fmt(r.nll)} nats, too large for "
                             "its exp to be represented (perplexity not finite)")
            for r in rows[(rows["nonfinite_tokens"] > 0) & rows["perplexity"].notna()].itertuples():
                parts.append(f"at {length_label(r.length)} tokens {r.nonfinite_tokens:,} token losses were non-finite "
                             "and are excluded from the mean")
            out.append(f"{family}, {label}: {'; '.join(parts)}.")
    return out


def _passkey_sentence(task: str, run: Run) -> str:
    res = run.data["results"][task]
    cells = run.data.get("details", {}).get(task, {}).get("cells", [])
    lengths = sorted({c["length"] for c in cells})
    span = (f" ({len(lengths)} lengths from {length_label(lengths[0])} to {length_label(lengths[-1])} tokens, "
            f"{len({c['depth'] for c in cells})} depths)") if cells else ""
    scorings = (("acc_greedy", "greedy decoding"), ("acc_loglik", "log-likelihood scoring"))
    values = [f"{_fmt(res[k])} with {how}" for k, how in scorings if _is_number(res.get(k))]
    chance = f"; chance level of log-likelihood scoring {_fmt(res['chance_loglik'])}" if "chance_loglik" in res else ""
    return f"{task}, {run.label}: accuracy {' and '.join(values)} over {_fmt(res.get('trials'))} trials{span}{chance}."


def _other_sentences(runs: list[Run]) -> list[str]:
    out = []
    for run in runs:
        for task, res in run.data["results"].items():
            if res["task_type"] == "passkey":
                out.append(_passkey_sentence(task, run))
            elif res["task_type"] != "perplexity":
                metrics = [f"{k} {_fmt(v)}" for k, v in res.items() if _is_number(v) and k not in NOT_METRICS]
                scored = _scored(res)
                if metrics:
                    out.append(f"{task}, {run.label}: {', '.join(metrics)}{f' ({scored})' if scored else ''}.")
    return out


def _timing_sentences(timing: pd.DataFrame, labels: list[str]) -> list[str]:
    out = []
    timed = timing.dropna(subset=["length"])
    for label in (label for label in labels if label in set(timed["label"])):
        rows = timed[timed["label"] == label].sort_values("length")
        ends = [rows.iloc[0]] if len(rows) == 1 else [rows.iloc[0], rows.iloc[-1]]
        parts = [f"{_fmt(r['tokens_per_s'])} tokens/s and {_fmt(r['peak_memory_bytes'] / 2**20)} MiB peak memory "
                 f"({MEMORY_KINDS.get(r['memory_kind'], r['memory_kind'])}) at {length_label(r['length'])} tokens"
                 for r in ends]
        out.append(f"{label}: {'; '.join(parts)}.")
    kinds = set(timed["memory_kind"].dropna())
    if len(kinds) > 1:
        out.append(f"Peak memory was measured in different ways ({', '.join(sorted(kinds))}); those values are not "
                   "directly comparable.")
    return out


def _comparability_notes(runs: list[Run]) -> list[str]:
    """Say so when the same task was not run the same way in every run: numbers would not be like for like."""
    notes = []
    for task in _task_order(runs):
        for field in COMPARABILITY:
            values = {run.label: run.data["results"][task].get(field) for run in runs if task in run.data["results"]}
            if len({json.dumps(v) for v in values.values()}) > 1:
                listed = "; ".join(f"{label}: {json.dumps(v)}" for label, v in values.items())
                notes.append(f"{task}: {field} differs between runs ({listed}), so its numbers are not directly "
                             "comparable between these models.")
    return notes


# ----------------------------------------------------------------------------------------------
# rendering: one list of blocks, written as Markdown and as HTML


def _numeric(values) -> bool:
    cells = [v for v in values if v not in ("", "—")]
    return bool(cells) and all(re.match(r"^-?[\d,]*\.?\d", v) or v == "non-finite" for v in cells)


def _markdown_table(df: pd.DataFrame) -> str:
    def cell(v) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")

    header = "| " + " | ".join(cell(c) for c in df.columns) + " |"
    rule = "|" + "|".join("---:" if _numeric(df[c].astype(str)) else "---" for c in df.columns) + "|"
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.astype(str).itertuples(index=False)]
    return "\n".join([header, rule, *body])


def _html_table(df: pd.DataFrame) -> str:
    numeric = [_numeric(df[c].astype(str)) for c in df.columns]
    head = "".join(f"<th{' class=num' if n else ''}>{html.escape(str(c))}</th>" for c, n in zip(df.columns, numeric))
    body = "".join(
        "<tr>" + "".join(f"<td{' class=num' if n else ''}>{html.escape(str(v))}</td>" for v, n in zip(row, numeric))
        + "</tr>\n"
        for row in df.astype(str).itertuples(index=False)
    )
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}</tbody>\n</table>"


def _markdown(title: str, blocks: list[tuple]) -> str:
    out = [f"# {title}"]
    for kind, *args in blocks:
        if kind == "h":
            out.append(f"## {args[0]}")
        elif kind == "p":
            out.append(args[0])
        elif kind == "ul":
            out.append("\n".join(f"- {item}" for item in args[0]))
        elif kind == "table":
            out.append((f"**{args[1]}**\n\n" if args[1] else "") + _markdown_table(args[0]))
        elif kind == "fig":
            stem, caption = args
            out.append(f"![{caption}](figures/{stem}.png)\n\n*{caption}* ([SVG](figures/{stem}.svg))")
    return "\n\n".join(out) + "\n"


CSS = """body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;max-width:1150px;margin:2em auto;padding:0 1em;
color:#222;line-height:1.45}h1{font-size:1.6em}h2{margin-top:2em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.8em 0;font-size:.9em}th,td{border:1px solid #ccc;padding:.25em .6em;
text-align:left;vertical-align:top}th{background:#f3f3f3}.num{text-align:right;font-variant-numeric:tabular-nums}
figure{margin:1em 0}img{max-width:100%}figcaption{font-style:italic;color:#444}.caption{font-weight:bold}"""


def _html(title: str, blocks: list[tuple], figures: Path) -> str:
    out = [f"<h1>{html.escape(title)}</h1>"]
    for kind, *args in blocks:
        if kind == "h":
            out.append(f"<h2>{html.escape(args[0])}</h2>")
        elif kind == "p":
            out.append(f"<p>{html.escape(args[0])}</p>")
        elif kind == "ul":
            out.append("<ul>\n" + "\n".join(f"<li>{html.escape(i)}</li>" for i in args[0]) + "\n</ul>")
        elif kind == "table":
            caption = f"<p class=caption>{html.escape(args[1])}</p>\n" if args[1] else ""
            out.append(caption + _html_table(args[0]))
        elif kind == "fig":
            stem, caption = args
            svg = base64.b64encode((figures / f"{stem}.svg").read_bytes()).decode("ascii")
            out.append(f'<figure><img alt="{html.escape(caption)}" src="data:image/svg+xml;base64,{svg}">'
                       f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    return ("<!DOCTYPE html>\n<html lang=en>\n<head>\n<meta charset=utf-8>\n"
            f"<title>{html.escape(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
            + "\n".join(out) + "\n</body>\n</html>\n")


# ----------------------------------------------------------------------------------------------
# the report


def _content(runs: list[Run], figures: Path) -> list[tuple]:
    """Draw the figures into `figures` and return the report's blocks in reading order."""
    labels = list(dict.fromkeys(run.label for run in runs))
    train_length = {}
    for run in runs:
        train_length[run.label] = train_length.get(run.label) or run.train_length
    style_of = plots.styles(labels)
    ppl, curves, cells, timing = (_perplexity_frame(runs), _curves_frame(runs), _passkey_frame(runs),
                                  _timing_frame(runs))
    timed = timing.dropna(subset=["length", "tokens_per_s", "peak_memory_bytes"])
    timed = timed[(timed["cached_items"] == 0) & (timed["tokens_per_s"] > 0)]
    figures.mkdir()

    def figure(draw, stem: str, caption: str, *args) -> tuple:
        fig = draw(*args)
        plots.save(fig, figures, stem)
        return ("fig", stem, caption)

    sources = ", ".join(f"{run.source} ({run.label})" for run in runs)
    files = "that file" if len(runs) == 1 else "those files"
    blocks: list[tuple] = [
        ("p", f"Built from {len(runs)} results file{'s' * (len(runs) > 1)}: {sources}. Every number below comes "
              f"from {files} (rounded to 4 significant digits, memory in MiB); the report adds no statistics of its "
              "own, such as confidence intervals. Perplexity is exp of the token-weighted mean NLL over the scored "
              "tokens whose loss is finite; tokens with a NaN or infinite loss are counted as non-finite and never "
              "averaged in."),
        ("h", "Summary of measurements"),
        ("ul", _perplexity_sentences(ppl, labels, train_length) + _other_sentences(runs)),
    ]
    notes = _comparability_notes(runs)
    if notes:
        blocks += [("p", "Differences between runs:"), ("ul", notes)]
    if not ppl.empty:
        blocks += [("h", "Perplexity vs. evaluation length"),
                   figure(plots.perplexity_vs_length, "perplexity_vs_length",
                          "Perplexity at each evaluation length, per task family; dashed line: training length; × at "
                          "the top: perplexity not finite; rings: some token losses non-finite.",
                          ppl, style_of, train_length)]
        for family, table in _perplexity_tables(ppl, labels, train_length).items():
            blocks.append(("table", table, f"Perplexity on {family}"))
        if (ppl["nonfinite_tokens"] > 0).any():
            blocks.append(("p", "† some token losses were non-finite and are excluded from the mean (counts in "
                                "All metrics). non-finite: no scored token had a finite loss, or the mean NLL is too "
                                "large for its exp to be represented (the NLL is in All metrics)."))
    if not curves.empty:
        blocks += [("h", "Loss by token position"),
                   ("p", "Mean NLL of the tokens at each target position (log-spaced buckets), one panel per "
                         "evaluation length and one line per model: where in the sequence the loss changes."),
                   figure(plots.loss_by_position, "loss_by_position",
                          "Mean NLL by target position; dashed line: training length; × at the top: buckets with "
                          "non-finite token losses.", curves, style_of, train_length)]
    if not cells.empty:
        blocks += [("h", "Passkey retrieval"),
                   figure(plots.passkey_heatmaps, "passkey",
                          "Passkey accuracy by context length and passkey depth (0% = start of the context), greedy "
                          "decoding and log-likelihood scoring; n/a: no trial.",
                          cells, list(dict.fromkeys(cells["label"])))]
    if not timing.empty:
        blocks.append(("h", "Throughput and memory"))
        if not timed.empty:
            blocks += [("ul", _timing_sentences(timed, labels)),
                       figure(plots.throughput_memory, "throughput_memory",
                              "Tokens per second (tokens evaluated in a task / its wall time) and peak memory "
                              "against evaluation length. Process RSS: peak resident memory of the whole process "
                              "during the task, weights and interpreter included; CUDA max allocated: peak of "
                              "PyTorch's CUDA allocator.", timed, style_of)]
        blocks.append(("table", _timing_table(timing), "Timing per task"))
        if (timing["cached_items"] > 0).any():
            blocks.append(("p", "Tasks with items from cache were partly read from the evaluation cache: their wall "
                                "time and tokens/s cover only the freshly evaluated part, so they are left out of the "
                                "figure."))
    blocks += [("h", "All metrics"), ("table", _metrics_table(runs, labels), None),
               ("h", "Runs"), ("table", _metadata_table(runs), None)]
    fingerprints = _fingerprint_table(runs)
    if not fingerprints.empty:
        blocks += [("p", "Data evaluated (fingerprint of each task's token stream):"), ("table", fingerprints, None)]
    return blocks


def _write_text(path: Path, text: str) -> None:
    def write(tmp: Path) -> None:
        tmp.write_text(text, encoding="utf-8")
        tmp.chmod(0o644)  # the temporary file is private; a report is meant to be shared

    atomic_write(path, write)


def build_report(results: list[str | Path | dict], output_dir: str | Path, title: str | None = None) -> Path:
    """Write report.md, report.html and figures/ for these results into output_dir; returns report.md's path.

    Everything is drawn in a hidden staging directory first, so a failure leaves a previous report intact;
    then figures/ is swapped in whole and the two documents are replaced atomically.
    """
    runs = [_load(item, i) for i, item in enumerate(results)]
    if not runs:
        raise PalmEvalError("no results given; pass at least one results.json written by run_eval.py")
    _merge_check(runs)
    labels = list(dict.fromkeys(run.label for run in runs))
    title = title or f"Evaluation report: {', '.join(labels)}"
    output_dir = Path(output_dir)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=output_dir, prefix=".report-"))
    except OSError as e:
        raise PalmEvalError(f"cannot write a report into {output_dir}: {e.strerror or e}") from None
    try:
        with plots.style():
            blocks = _content(runs, staging / "figures")
        markdown = _markdown(title, blocks)
        page = _html(title, blocks, staging / "figures")
        if (output_dir / "figures").exists():
            os.replace(output_dir / "figures", staging / "old-figures")
        os.replace(staging / "figures", output_dir / "figures")
        _write_text(output_dir / "report.html", page)
        _write_text(output_dir / "report.md", markdown)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return output_dir / "report.md"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="palm-eval report",
        description="Build a report (report.md, self-contained report.html, figures/) from results.json files; "
                    "several files are merged into one comparison.")
    parser.add_argument("results", nargs="+", help="results.json files written by run_eval.py")
    parser.add_argument("--output-dir", required=True, help="directory for the report (created if missing)")
    parser.add_argument("--title", help="report title (default: the compared models)")
    args = parser.parse_args(argv)
    path = build_report(args.results, args.output_dir, args.title)
    print(f"report written: {path} and {path.with_suffix('.html')}")
    return 0
