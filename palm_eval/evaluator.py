"""`run_eval.py` / `palm-eval eval`: evaluate models on tasks, write results.json, build the report.

Every task is a list of items (evaluation sequences, LAMBADA documents, passkey trials) with stable ids.
Items are evaluated in fixed batches of consecutive items; each finished batch is appended (and fsynced)
to a cache file keyed by everything that decides its numbers, so an interrupted run re-run with the same
arguments skips what is done and ends with the same results. Under torchrun, batches are dealt out
round-robin to the processes and gathered; since a batch is the same batch whoever computes it, the
numbers do not depend on the number of processes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import re
import resource
import shlex
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import palm_eval
from palm_eval.checkpoint import atomic_write
from palm_eval.errors import PalmEvalError
from palm_eval.model import POS_EMBS, PaLMConfig
from palm_eval.registry import get_card, load_model, registered_cards, resolve_device, resolve_weights
from palm_eval.tasks import RunContext, make_task, parse_length, resolve_source, task_config
from palm_eval.tokenizer import load_tokenizer

SCHEMA = "palm-eval/results/v1"
CACHE_VERSION = 1  # bump when a change to the code changes cached item results
DEFAULT_TASKS = "builtin_ppl"
DEFAULT_WINDOWS = "none,1x"  # the bundled models with full attention, then a window of their training length


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="run_eval.py",
        description="Evaluate PaLM models on perplexity across lengths, LAMBADA and passkey retrieval. "
        "Without arguments: the bundled tiny models on the built-in held-out corpus, with and without "
        "windowed attention, and a report in reports/default.",
    )
    p.add_argument("--model", action="append",
                   help="registered name, card .yaml or checkpoint; repeat or comma-separate to compare")
    p.add_argument("--tasks", help="comma-separated task names or task .yaml files, e.g. lambada,c4_ppl_16k")
    p.add_argument("--data-dir", type=Path, default=os.environ.get("PALM_EVAL_DATA_DIR"),
                   help="where tasks find their files: c4-validation*.parquet|jsonl|json.gz, lambada_test.jsonl "
                   "(default: $PALM_EVAL_DATA_DIR, as for the lm-eval tasks)")
    p.add_argument("--c4-path", help="C4: parquet/jsonl/json.gz with `text`, pre-tokenized `input_ids` parquet, "
                   "or hf:allenai/c4:en@validation")
    p.add_argument("--lambada-path", help="LAMBADA jsonl, one {\"text\"} per line")
    p.add_argument("--text-path", help="corpus for text_ppl_<L>: a text file, a directory of them, parquet or jsonl")
    p.add_argument("--output-dir", type=Path,
                   help="where results.json, the item cache and the report go (default outputs/eval)")
    p.add_argument("--tokenizer", help="overrides the card's tokenizer: byte, a tokenizer.json path, or a hub id")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="model weights and activations")
    p.add_argument("--batch-size", type=_positive, default=1,
                   help="sequences per forward pass (on CPU the numbers do not depend on it)")
    p.add_argument("--limit", type=_positive, help="at most N: perplexity sequences (of the longest length), "
                   "lambada documents, passkey trials per cell")
    p.add_argument("--stride", type=_positive, help="perplexity: windows move by STRIDE and score their last STRIDE "
                   "targets (default: the length, non-overlapping)")
    p.add_argument("--pos-emb", help=f"override position embedding: {'|'.join(POS_EMBS)}; comma-separate to compare")
    p.add_argument("--attn-window", help="override attention window: tokens, Nx the training length, or none; "
                   "comma-separate to compare")
    p.add_argument("--score-eot", action="store_true",
                   help="also score end-of-text targets for models trained to ignore them")
    p.add_argument("--seed", type=int, default=0, help="passkey keys and positions")
    p.add_argument("--no-report", action="store_true", help="write results.json only")
    return p


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _split(values: list[str] | str | None) -> list[str]:
    values = [values] if isinstance(values, str) else values or []
    return [v.strip() for value in values for v in value.split(",") if v.strip()]


# ----------------------------------------------------------------------------------------------
# processes


class Dist:
    """This process's rank among `torchrun` processes (one process: rank 0 of 1)."""

    def __init__(self, device: torch.device):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        if self.world > 1 and not torch.distributed.is_initialized():
            torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def gather(self, obj) -> list:
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def close(self, wait: bool) -> None:
        """wait: for every process to finish (after success; after an error the others may never come)."""
        if self.world > 1 and torch.distributed.is_initialized():
            if wait:
                torch.distributed.barrier()
            torch.distributed.destroy_process_group()


def resolve_run_device(device: str | None) -> torch.device:
    """Under torchrun on GPUs each process takes the GPU of its local rank."""
    resolved = resolve_device(device)
    if resolved.type == "cuda" and resolved.index is None and "LOCAL_RANK" in os.environ:
        resolved = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    if resolved.type == "cuda":
        torch.cuda.set_device(resolved)
    return resolved


# ----------------------------------------------------------------------------------------------
# the item cache


class ItemCache:
    """Append-only JSON lines of finished items, one file per process; torn last lines are ignored."""

    def __init__(self, directory: Path, task: str, key: str, rank: int):
        self.directory, self.stem = directory, f"{task}-{key[:16]}"
        self.path = directory / f"{self.stem}.rank{rank}.jsonl"

    def load(self) -> dict[str, dict]:
        done = {}
        for path in sorted(self.directory.glob(f"{self.stem}.rank*.jsonl")):
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    record = json.loads(line)
                    done[record["id"]] = record["result"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    continue  # the line a killed process was writing
        return done

    def append(self, pairs: list[tuple[str, dict]]) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        text = "".join(json.dumps({"id": i, "result": r}) + "\n" for i, r in pairs)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


def cache_key(*parts) -> str:
    return hashlib.sha256(json.dumps([CACHE_VERSION, *parts], sort_keys=True, default=str).encode()).hexdigest()


# ----------------------------------------------------------------------------------------------
# measuring


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        try:  # Linux: "5" resets the peak resident set size (VmHWM) of this process
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass


def peak_memory(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda_max_allocated"
    try:
        status = Path("/proc/self/status").read_text()
        return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) * 1024, "rss"
    except (OSError, AttributeError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "rss"  # Linux reports KiB


def run_task(task, cache: ItemCache, dist: Dist, batch_size: int) -> tuple[dict[str, dict], int, int]:
    """Every item's result (gathered on all processes), and the items and tokens evaluated now (not cached)."""
    items = task.items()
    batches = [items[i : i + batch_size] for i in range(0, len(items), batch_size)][dist.rank :: dist.world]
    done = cache.load()
    results, todo = {}, []
    for batch in batches:
        if all(i in done for i, _ in batch):
            results.update((i, done[i]) for i, _ in batch)
        else:
            todo.append(batch)
    fresh_items, fresh_tokens = 0, 0
    with tqdm(total=sum(map(len, todo)), desc=task.name, unit="item", disable=None if dist.main else True) as bar:
        for batch in todo:
            pairs = list(zip([i for i, _ in batch], task.evaluate(batch)))
            cache.append(pairs)
            results.update(pairs)
            fresh_items += len(pairs)
            fresh_tokens += sum(r["tokens_in"] for _, r in pairs)
            bar.update(len(batch))
    gathered = dist.gather((results, fresh_items, fresh_tokens))
    merged = {k: v for part, _, _ in gathered for k, v in part.items()}
    return merged, sum(g[1] for g in gathered), sum(g[2] for g in gathered)


# ----------------------------------------------------------------------------------------------
# results.json


def _finite(obj):
    """JSON forbids NaN and inf: write null (the counts say what happened)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


def write_results(path: Path, doc: dict) -> None:
    text = json.dumps(_finite(doc), indent=2, allow_nan=False) + "\n"
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def git_commit() -> str | None:
    root = Path(palm_eval.__file__).resolve().parent.parent
    try:
        command = ["git", "-C", str(root), "rev-parse", "--short", "HEAD"]
        out = subprocess.run(command, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({torch.get_num_threads()} threads)"


def model_label(name: str, config: PaLMConfig) -> str:
    return f"{name} {config.pos_emb}" + (f" window={config.attn_window}" if config.attn_window else "")


def print_table(doc: dict) -> None:
    print(f"\n{doc['model']['label']}")
    print(f"{'task':<24} {'length':>7} {'ppl':>10} {'nll':>7} {'bpb':>6} {'acc':>6} {'scored':>9} {'nonfin':>6} "
          f"{'time s':>7}")
    for name, r in doc["results"].items():
        acc = r.get("acc", r.get("acc_loglik"))
        scored = r.get("scored_tokens", r.get("count", r.get("trials")))
        cells = [
            f"{r['length']:>7}" if "length" in r else f"{'':>7}",
            f"{r['perplexity']:>10.4g}" if r.get("perplexity") is not None else f"{'-':>10}",
            f"{r['nll']:>7.4f}" if r.get("nll") is not None else f"{'':>7}",
            f"{r['bits_per_byte']:>6.3f}" if r.get("bits_per_byte") is not None else f"{'':>6}",
            f"{acc:>6.3f}" if acc is not None else f"{'':>6}",
            f"{scored:>9}",
            f"{r.get('nonfinite_tokens', r.get('nonfinite', 0)):>6}",
            f"{doc['timing'].get(r.get('task', name), {}).get('wall_time_s', 0):>7.1f}",
        ]
        print(f"{name:<24} " + " ".join(cells))
    if "passkey" in doc["details"]:
        for cell in doc["details"]["passkey"]["cells"]:
            print(f"  passkey length={cell['length']} depth={cell['depth']}: greedy {cell['acc_greedy']:.2f}, "
                  f"loglik {cell['acc_loglik']:.2f} ({cell['trials']} trials)")


# ----------------------------------------------------------------------------------------------
# the run


def bundled_models() -> list[str]:
    names = sorted({card.name for card in registered_cards().values() if card.extra.get("bundled")})
    if not names:
        raise PalmEvalError("no bundled models found (model cards with `bundled: true` in models/); pass --model NAME")
    return names


def set_attention(model, pos_emb: str | None, window: str | None) -> None:
    """Change position embedding and window of a loaded model in place (its blocks share `model.config`),
    so one checkpoint is loaded once and evaluated in several settings."""
    config = model.config
    if pos_emb is not None:
        config.pos_emb = pos_emb
    if window is not None:
        none = window.lower() == "none"
        config.attn_window = None if none else parse_length(window, model.card.train_length, "--attn-window")
    PaLMConfig(**config.to_dict())  # validates


def evaluate_model(model, args, configs, tokenizer, out_dir: Path, dist: Dist, command: str, device) -> dict:
    """Every task on one model setting; results.json is rewritten after each task so none is lost."""
    card = model.card
    skip = None if args.score_eot or model.config.ignore_index != tokenizer.eos_id else tokenizer.eos_id
    ctx = RunContext(
        model=model, tokenizer=tokenizer, train_length=card.train_length, data_dir=args.data_dir,
        paths={"c4_path": args.c4_path, "lambada_path": args.lambada_path, "text_path": args.text_path},
        limit=args.limit, stride=args.stride, seed=args.seed, skip_target=skip,
        warn=(lambda m: print(f"warning: {m}", file=sys.stderr)) if dist.main else (lambda m: None), progress=dist.main,
    )
    try:
        weights = resolve_weights(card)
        weights_id = [str(weights), weights.stat().st_size, weights.stat().st_mtime_ns]
    except PalmEvalError:
        weights_id = None
    label = model_label(card.name, model.config)
    doc = {
        "schema": SCHEMA,
        "model": {"name": card.name, "label": label, "card": card.to_dict(), "config": model.config.to_dict(),
                  "train_length": card.train_length, "num_params": model.num_params()},
        "run": {"command": command, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "git_commit": git_commit(),
                "versions": {"palm_eval": palm_eval.__version__, "torch": torch.__version__,
                             "python": platform.python_version(), "numpy": np.__version__},
                "device": describe_device(device), "dtype": args.dtype, "tokenizer": tokenizer.name,
                "seed": args.seed, "batch_size": args.batch_size, "limit": args.limit, "stride": args.stride,
                "eot_scored": skip is None, "world_size": dist.world, "wall_time_s": 0.0},
        "results": {}, "details": {}, "timing": {}, "task_configs": {},
    }
    started = time.perf_counter()
    path = out_dir / "results.json"
    for config in configs:
        reset_peak_memory(device)
        t0 = time.perf_counter()
        task = make_task(config, ctx)
        key = cache_key(card.to_dict(), weights_id, model.config.to_dict(), args.dtype, device.type,
                        tokenizer.fingerprint, config, task.fingerprint(), args.batch_size, args.limit, args.stride, skip)
        cache = ItemCache(out_dir / "cache", task.name, key, dist.rank)
        results, fresh_items, fresh_tokens = run_task(task, cache, dist, args.batch_size)
        entries, details = task.aggregate(results)
        wall = time.perf_counter() - t0
        peaks = dist.gather(peak_memory(device))
        doc["results"].update(entries)
        doc["details"].update(details)
        doc["timing"][task.name] = {"wall_time_s": round(wall, 3), "tokens_per_s": round(fresh_tokens / wall, 1),
                                    "evaluated_tokens": fresh_tokens, "cached_items": len(results) - fresh_items,
                                    "peak_memory_bytes": max(p for p, _ in peaks), "memory_kind": peaks[0][1]}
        doc["task_configs"][task.name] = config
        doc["run"]["wall_time_s"] = round(time.perf_counter() - started, 3)
        if dist.main:
            write_results(path, doc)
    return doc


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    default_run = not args.model
    models = _split(args.model) or bundled_models()
    task_names = _split(args.tasks) or ([DEFAULT_TASKS] if default_run else [])
    if not task_names:
        raise PalmEvalError("pass --tasks, e.g. --tasks c4_ppl_2k,lambada,passkey (or no --model for the default run)")
    for name in models:  # unknown models and task names fail first, before any work
        get_card(name)
    configs = [task_config(name) for name in task_names]
    pos_embs = _split(args.pos_emb) or [None]
    for pos_emb in pos_embs:
        if pos_emb not in POS_EMBS and pos_emb is not None:
            raise PalmEvalError(f"--pos-emb must be one of {', '.join(POS_EMBS)}, got {pos_emb!r}")
    windows = _split(args.attn_window) or (_split(DEFAULT_WINDOWS) if default_run else [None])
    probe = RunContext(model=None, tokenizer=None, data_dir=args.data_dir,
                       paths={"c4_path": args.c4_path, "lambada_path": args.lambada_path, "text_path": args.text_path})
    for config in configs:  # missing data fails now, before any model is loaded
        if config["task_type"] != "passkey":
            resolve_source(config["task"], config, probe)
    output_dir = args.output_dir or Path("reports/default" if default_run else "outputs/eval")
    program = ["python", "run_eval.py"] if sys.argv[0].endswith("run_eval.py") else ["palm-eval", "eval"]
    command = shlex.join([*program, *map(str, argv if argv is not None else sys.argv[1:])])
    settings = [(m, p, w) for m in models for p in pos_embs for w in windows]

    device = resolve_run_device(args.device)
    dist = Dist(device)
    torch.manual_seed(args.seed)
    written, problems = [], []
    finished = False
    try:
        for name in models:
            model = load_model(name, device=device, dtype=args.dtype)
            tokenizer = load_tokenizer(args.tokenizer or _card_tokenizer(model.card))
            if tokenizer.vocab_size > model.config.num_tokens:
                raise PalmEvalError(f"tokenizer {tokenizer.name} has {tokenizer.vocab_size} ids but {name} only "
                                    f"{model.config.num_tokens} embeddings: pass its tokenizer with --tokenizer")
            for _, pos_emb, window in [s for s in settings if s[0] == name]:
                set_attention(model, pos_emb, window)
                label = model_label(model.card.name, model.config)
                out_dir = output_dir if len(settings) == 1 else output_dir / re.sub(r"[^\w.=-]+", "_", label)
                doc = evaluate_model(model, args, configs, tokenizer, out_dir, dist, command, device)
                written.append(out_dir / "results.json")
                problems += _nonfinite(doc)
                if dist.main:
                    print_table(doc)
        finished = True
    finally:
        dist.close(wait=finished)
    if not dist.main:
        return 0
    print(f"\nresults: {', '.join(map(str, written))}")
    if not args.no_report:
        _report(written, output_dir)
    if problems:
        print(f"error: non-finite losses ({'; '.join(problems)}): counted in the results, never averaged in; "
              "try --dtype fp32 or --attn-window 1x", file=sys.stderr)
        return 1
    return 0


def _card_tokenizer(card) -> str:
    if not card.tokenizer:
        raise PalmEvalError(f"{card.name} names no tokenizer: pass --tokenizer (byte, a tokenizer.json or a hub id)")
    return card.tokenizer


def _nonfinite(doc: dict) -> list[str]:
    label = doc["model"]["label"]
    counts = {name: r.get("nonfinite_tokens", r.get("nonfinite", 0)) for name, r in doc["results"].items()}
    return [f"{label} {name}: {n}" for name, n in counts.items() if n]


def _report(results: list[Path], output_dir: Path) -> None:
    try:
        from palm_eval.report import build_report

        path = build_report(results, output_dir)
    except Exception as e:  # the results are written; a broken report must not lose them
        print(f"warning: no report ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
              f"build it later with: palm-eval report {' '.join(map(str, results))} --output-dir {output_dir}",
              file=sys.stderr)
        return
    print(f"report: {path}")
