"""palm-eval against the reference implementation (palm-rlhf-pytorch 0.2.3): speed and memory, one command.

    python benchmarks/run.py [--quick] [--device cpu|cuda] [--out benchmarks/results] [--only eval,memory,...]

Every measurement runs in its own Python process, on the same random weights (the palm_150m configuration,
written once to a temporary safetensors file and loaded by both implementations), batch 1:

- peak:     torch.matmul of large square matrices, fp32 and bf16: the machine's matrix-multiply ceiling;
- eval:     scored tokens/s at 2k and 8k, fp32 and bf16. palm-eval: `model.score` (what the evaluation
            engine calls: float32 per-token nll and greedy flags). Reference: forward -> logits ->
            `F.cross_entropy(reduction="none")` on its own logits (no greedy flags: the cheaper path);
- memory:   peak RSS (on GPU max allocated) while scoring one sequence of 2k, 8k, 16k, 32k in fp32. The
            high-water mark is reset after the weights are loaded (Linux /proc/self/clear_refs), so it
            counts the resident weights plus everything evaluation allocates, not the loading copies; the
            process lifetime maximum is reported too. A reference run whose extrapolated peak does not fit
            in the memory available now is skipped with the estimate, and a watchdog kills any run that
            grows past the limit;
- generate: new tokens/s for 512 tokens after a 32-token prompt, fp32, top-k sampling as the reference's
            default (filter_thres 0.9). The reference recomputes the whole sequence at every step; its
            512-step time is the sum of its measured per-step times at several lengths, interpolated
            linearly (a real run of a few tokens is measured too, as a check);
- train:    tokens/s of palm-eval's trainer (configs/tiny_xpos.yaml) vs a plain loop over the reference
            model with the same architecture, batches, optimizer, clipping and thread count.

Writes OUT/results-<time>.json, OUT/results-<time>.md and OUT/latest.{json,md}; prints the markdown.
Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CONFIG_150M = dict(num_tokens=50304, dim=768, depth=12, heads=8, dim_head=128, ff_mult=4)
PARAMS_150M = 144_811_776  # tied embedding counted once
TARGETS = {  # issue 7, on the 2-core CPU
    "bf16_eval_2k_fraction_of_peak": 0.80,
    "peak_rss_32k_gb": 1.5,
    "generation_speedup": 10.0,
    "training_speedup": 2.0,
}


# ----------------------------------------------------------------------------------------------
# helpers shared by parent and children


def flops_per_token(length: int, params: int = PARAMS_150M, layers: int = 12, attn_inner: int = 1024) -> float:
    """Forward FLOPs per token as issue 7 defines them: 2 * params + 2 * layers * length * (heads * dim_head)."""
    return 2 * params + 2 * layers * length * attn_inner


def proc_status(pid: int | str = "self") -> dict[str, int]:
    """VmRSS / VmHWM in bytes from /proc/PID/status ({} when the process is gone)."""
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":")
                out[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return out


def reset_peak_rss() -> bool:
    """Reset this process's RSS high-water mark to its current RSS (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def machine_info() -> dict:
    import torch

    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = re.search(r"model name\s*:\s*(.*)", cpuinfo)
    flags = re.search(r"flags\s*:\s*(.*)", cpuinfo)
    flag_set = set(flags.group(1).split()) if flags else set()
    interesting = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8")
                   if f in flag_set]
    info = {
        "cpu_model": model.group(1).strip() if model else platform.processor(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_flags_matmul": interesting,
        "cpu_flags_all": sorted(flag_set),
        "mem_total_gb": round(int(re.search(r"MemTotal:\s*(\d+)", Path("/proc/meminfo").read_text()).group(1)) / 2**20, 1),
        "mem_available_gb_at_start": round(mem_available() / 2**30, 1),
        "load_average_at_start": os.getloadavg(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    for pkg in ("palm-eval", "palm-rlhf-pytorch"):
        try:
            from importlib.metadata import version

            info[pkg] = version(pkg)
        except Exception:
            info[pkg] = None
    try:
        info["git_commit"] = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                                            capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "palm_eval/model.py"],
                               capture_output=True, text=True).stdout.strip()
        info["model_py_modified"] = bool(dirty)
    except OSError:
        pass
    return info


# ----------------------------------------------------------------------------------------------
# children: one measurement each, result printed as `RESULT {json}` on the last line


def _dtype(name: str):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16}[name]


def _sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _load(impl: str, weights: str, dtype: str, device: str):
    """The model, as each implementation is used: palm-eval through load_model, the reference built with the
    published hub arguments and given the same weights."""
    import palm_eval
    from palm_eval.checkpoint import reference_state_dict

    ours = palm_eval.load_model(weights, device="cpu", dtype="fp32")
    if impl == "palm_eval":
        return ours.to(device=device, dtype=_dtype(dtype)).eval()
    from palm_rlhf_pytorch import PaLM as RefPaLM

    cfg = ours.config  # the published hub entry points use flash_attn=True (SDPA; on CPU its fused kernel)
    ref = RefPaLM(num_tokens=cfg.num_tokens, dim=cfg.dim, depth=cfg.depth, dim_head=cfg.dim_head, heads=cfg.heads,
                  ff_mult=cfg.ff_mult, flash_attn=True)
    ref.load_state_dict(reference_state_dict(ours, include_derived=True))
    del ours
    return ref.to(device=device, dtype=_dtype(dtype)).eval()


def child_peak(spec: dict) -> dict:
    import torch

    dtype, device = _dtype(spec["dtype"]), spec["device"]
    best = {}
    for n in spec["sizes"]:
        a = torch.randn(n, n, dtype=dtype, device=device)
        b = torch.randn(n, n, dtype=dtype, device=device)
        a @ b
        _sync(device)
        rates = []
        deadline = time.perf_counter() + spec["seconds"]
        while time.perf_counter() < deadline or len(rates) < 3:
            t = time.perf_counter()
            a @ b
            _sync(device)
            rates.append(2 * n**3 / (time.perf_counter() - t) / 1e9)
        best[n] = max(rates)
    return {"gflops_by_size": best, "gflops": max(best.values())}


def child_eval(spec: dict) -> dict:
    """Score one sequence of `length` tokens `repeats` times, after a warm-up on its first `warmup` tokens."""
    import torch
    import torch.nn.functional as F

    device, length = spec["device"], spec["length"]
    model = _load(spec["impl"], spec["weights"], spec["dtype"], device)
    vocab = model.num_tokens if spec["impl"] == "reference" else model.config.num_tokens
    seq = torch.randint(1, vocab, (1, length + 1), generator=torch.Generator().manual_seed(length)).to(device)
    tokens, targets = seq[:, :-1], seq[:, 1:]

    def score():
        with torch.no_grad():
            if spec["impl"] == "palm_eval":
                nll, _ = model.score(tokens, targets)
            else:
                logits = model(tokens)
                nll = F.cross_entropy(logits[0], targets[0], reduction="none")
        _sync(device)
        return nll

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    reset_ok = reset_peak_rss()
    base = proc_status()["VmRSS"]
    warmup_s = None
    if spec.get("warmup"):  # a first call pays one-time costs (kernel selection, first-touch pages)
        t = time.perf_counter()
        with torch.no_grad():
            if spec["impl"] == "palm_eval":
                model.score(tokens[:, : spec["warmup"]], targets[:, : spec["warmup"]])
            else:
                model(tokens[:, : spec["warmup"]])
        _sync(device)
        warmup_s = time.perf_counter() - t
    times, nll = [], None
    for _ in range(max(1, spec["repeats"])):
        t = time.perf_counter()
        nll = score()
        times.append(time.perf_counter() - t)
    median = sorted(times)[len(times) // 2]
    status = proc_status()
    import resource

    out = {
        "tokens_per_s": length / median,
        "seconds": times,
        "warmup_tokens": spec.get("warmup"),
        "warmup_s": warmup_s,
        "mean_nll": float(nll.float().mean()),
        "rss_after_load_gb": base / 2**30,
        "peak_rss_gb": status["VmHWM"] / 2**30 if reset_ok else None,
        "lifetime_max_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "threads": torch.get_num_threads(),
    }
    if device.startswith("cuda"):
        out["max_allocated_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def child_generate(spec: dict) -> dict:
    import torch

    from palm_eval.model import top_k_from_filter_thres

    device, prompt_len, new = spec["device"], spec["prompt"], spec["new"]
    model = _load(spec["impl"], spec["weights"], "fp32", device)
    vocab = 50304
    g = torch.Generator().manual_seed(0)
    longest = torch.randint(1, vocab, (1, prompt_len + new), generator=g).to(device)
    if spec["impl"] == "palm_eval":
        top_k = top_k_from_filter_thres(0.9, vocab)
        model.generate(longest[:, :prompt_len], 8, temperature=1.0, top_k=top_k)  # warm-up
        _sync(device)
        t = time.perf_counter()
        out = model.generate(longest[:, :prompt_len], new, temperature=1.0, top_k=top_k,
                             generator=torch.Generator(device=device).manual_seed(0))
        _sync(device)
        seconds = time.perf_counter() - t
        return {"tokens_per_s": out.shape[1] / seconds, "seconds": seconds, "new_tokens": out.shape[1],
                "method": "measured: one run of model.generate with the KV cache"}

    def step_time(length: int) -> float:  # one reference step = its generate over a prompt of `length`
        best = math.inf
        for _ in range(spec["step_repeats"]):
            t = time.perf_counter()
            model.generate(length + 1, longest[:, :length])
            _sync(device)
            best = min(best, time.perf_counter() - t)
        return best

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        step_time(prompt_len)  # warm-up
        points = sorted(set(spec["points"]))
        measured = {n: step_time(n) for n in points}
        lengths = list(range(prompt_len, prompt_len + new))  # the step that makes token i sees prompt + i tokens
        total = sum(_interpolate(measured, n) for n in lengths)
        check_new = spec["check_tokens"]
        t = time.perf_counter()
        model.generate(prompt_len + check_new, longest[:, :prompt_len])
        _sync(device)
        check_s = time.perf_counter() - t
    predicted_check = sum(_interpolate(measured, n) for n in range(prompt_len, prompt_len + check_new))
    return {"tokens_per_s": new / total, "seconds": total, "new_tokens": new,
            "step_seconds_by_length": measured,
            "check": {"new_tokens": check_new, "measured_s": check_s, "predicted_s": predicted_check},
            "method": f"estimated: sum over the {new} steps of per-step times measured at {len(points)} lengths "
                      f"({points[0]}..{points[-1]}), linearly interpolated"}


def _interpolate(points: dict[int, float], n: int) -> float:
    xs = sorted(points)
    if n <= xs[0]:
        return points[xs[0]]
    for a, b in zip(xs, xs[1:]):
        if n <= b:
            return points[a] + (points[b] - points[a]) * (n - a) / (b - a)
    a, b = xs[-2], xs[-1]
    return points[b] + (points[b] - points[a]) * (n - b) / (b - a)


def child_train(spec: dict) -> dict:
    import torch

    from palm_eval.trainer import TrainConfig, Windows, load_tokens
    from palm_eval.tokenizer import load_tokenizer

    cfg = TrainConfig.from_yaml(ROOT / spec["config"])
    if spec["impl"] == "palm_eval":
        from palm_eval.trainer import train

        with tempfile.TemporaryDirectory() as tmp:
            cfg.out_dir, cfg.card, cfg.heldout = tmp, None, None
            cfg.steps, cfg.warmup_steps = spec["steps"], min(cfg.warmup_steps, spec["steps"])
            cfg.eval_every = cfg.checkpoint_every = 10**9
            cfg.eval_windows = 1
            if spec.get("bf16"):
                cfg.bf16 = True
            train(cfg)
            log = [json.loads(line) for line in (Path(tmp) / "log.jsonl").read_text().splitlines()]
        rates = [r["tokens_per_s"] for r in log if "tokens_per_s" in r][spec["skip"]:]
        rates.sort()
        return {"tokens_per_s": rates[len(rates) // 2], "steps_measured": len(rates), "threads": cfg.threads,
                "batch": cfg.batch_size, "seq_len": cfg.seq_len, "bf16_autocast": bool(cfg.bf16),
                "method": "median of the trainer's own per-step tokens/s (log.jsonl), first steps skipped"}

    from palm_rlhf_pytorch import PaLM as RefPaLM

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    tokenizer = load_tokenizer(cfg.tokenizer)
    m = {"num_tokens": tokenizer.vocab_size, "ignore_index": tokenizer.eos_id, **cfg.model}
    windows = Windows(load_tokens(cfg.data, tokenizer), cfg.seq_len, cfg.seed, cfg.data)
    torch.manual_seed(cfg.seed)
    ref = RefPaLM(num_tokens=m["num_tokens"], dim=m["dim"], depth=m["depth"], dim_head=m["dim_head"], heads=m["heads"],
                  ff_mult=m.get("ff_mult", 4), flash_attn=spec["flash_attn"],
                  cross_entropy_ignore_index=m["ignore_index"]).train()
    opt = torch.optim.AdamW(ref.parameters(), lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    rates = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for step in range(spec["steps"]):
            t = time.perf_counter()
            batch = windows.batch(step, cfg.batch_size)
            loss = ref(batch, return_loss=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(ref.parameters(), cfg.grad_clip or float("inf"))
            opt.step()
            opt.zero_grad(set_to_none=True)
            loss.item()
            rates.append(cfg.batch_size * cfg.seq_len / (time.perf_counter() - t))
    rates = sorted(rates[spec["skip"]:])
    return {"tokens_per_s": rates[len(rates) // 2], "steps_measured": len(rates), "threads": torch.get_num_threads(),
            "batch": cfg.batch_size, "seq_len": cfg.seq_len, "flash_attn": spec["flash_attn"],
            "method": "median per-step tokens/s of forward(return_loss=True) + backward + clip + AdamW step"}


CHILDREN = {"peak": child_peak, "eval": child_eval, "generate": child_generate, "train": child_train}


def child_main(kind: str, spec: dict) -> None:
    warnings.filterwarnings("ignore", category=FutureWarning)
    result = CHILDREN[kind](spec)
    print("RESULT " + json.dumps(result), flush=True)


# ----------------------------------------------------------------------------------------------
# parent


def run_child(kind: str, spec: dict, limit_bytes: int | None = None, timeout: float = 3600) -> dict:
    """Run one measurement in a fresh interpreter; kill it if its RSS passes limit_bytes."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, json.dumps(spec)]
    label = f"{kind} {' '.join(f'{k}={v}' for k, v in spec.items() if k in ('impl', 'dtype', 'length', 'flash_attn'))}"
    print(f"  {datetime.now(timezone.utc):%H:%M:%S} running {label} ...", file=sys.stderr, flush=True)
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    peak_seen, killed = 0, None
    while proc.poll() is None:
        rss = proc_status(proc.pid).get("VmRSS", 0)
        peak_seen = max(peak_seen, rss)
        if limit_bytes and rss > limit_bytes:
            proc.send_signal(signal.SIGKILL)
            killed = f"killed by the benchmark at {rss / 2**30:.1f} GB RSS (limit {limit_bytes / 2**30:.1f} GB)"
        elif time.perf_counter() - started > timeout:
            proc.send_signal(signal.SIGKILL)
            killed = f"killed after {timeout:.0f} s"
        time.sleep(0.02)
    stdout, stderr = proc.communicate()
    wall = time.perf_counter() - started
    lines = [line for line in stdout.splitlines() if line.startswith("RESULT ")]
    if killed or not lines:
        reason = killed or f"exit code {proc.returncode}: {stderr.strip().splitlines()[-1] if stderr.strip() else ''}"
        print(f"    -> failed: {reason}", file=sys.stderr, flush=True)
        return {"error": reason, "wall_s": wall}
    result = json.loads(lines[-1][len("RESULT "):])
    result["wall_s"] = wall
    print(f"    -> {_short(result)} ({wall:.0f} s)", file=sys.stderr, flush=True)
    return result


def _short(r: dict) -> str:
    parts = []
    for key in ("gflops", "tokens_per_s", "peak_rss_gb", "max_allocated_gb"):
        if r.get(key) is not None:
            parts.append(f"{key}={r[key]:.3g}")
    return " ".join(parts)


def make_weights(path: Path) -> None:
    """Random palm_150m weights (seed 0), saved once; every child loads this file."""
    import torch

    from palm_eval.checkpoint import save_safetensors
    from palm_eval.model import PaLM, PaLMConfig

    torch.manual_seed(0)
    model = PaLM(PaLMConfig(**CONFIG_150M))
    with torch.no_grad():  # the published models' norms are not all ones: exercise the gains
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.uniform_(0.5, 1.5)
    save_safetensors(model, path, {"purpose": "benchmark, random weights"})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer repeats, fewer reference generation points, fewer steps")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"), help="folder for the JSON and markdown")
    p.add_argument("--only", default="peak,eval,memory,generate,train",
                   help="comma-separated subset of peak,eval,memory,generate,train")
    p.add_argument("--lengths", default="2048,8192", help="evaluation throughput lengths")
    p.add_argument("--memory-lengths", default="2048,8192,16384,32768")
    p.add_argument("--impls", default="palm_eval,reference", help="which implementations to measure")
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child_main(args.child[0], json.loads(args.child[1]))
        return 0

    only = set(args.only.split(","))
    quick, device = args.quick, args.device
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = datetime.now(timezone.utc)
    command = "python benchmarks/run.py " + " ".join(argv if argv is not None else sys.argv[1:])
    results: dict = {"command": command.strip(), "started_utc": started.isoformat(timespec="seconds"),
                     "device": device, "quick": quick, "machine": machine_info(), "runs": {}}
    runs = results["runs"]
    lengths = [int(x) for x in args.lengths.split(",")]
    mem_lengths = [int(x) for x in args.memory_lengths.split(",")]
    impls = [x for x in ("palm_eval", "reference") if x in args.impls.split(",")]

    with tempfile.TemporaryDirectory(prefix="palm-eval-bench-") as tmp:
        weights = str(Path(tmp) / "palm_150m_random.safetensors")
        if only & {"eval", "memory", "generate"}:
            make_weights(Path(weights))

        if "peak" in only:
            for dt in ("fp32", "bf16"):
                runs[f"peak/{dt}"] = run_child("peak", {"dtype": dt, "device": device, "sizes": [1024, 2048, 4096],
                                                        "seconds": 2 if quick else 4})

        if "eval" in only:
            for length in lengths:
                for dt in ("fp32", "bf16"):
                    for impl in impls:
                        short = length <= 4096
                        repeats, warmup = (1 if quick else 5, 512 if quick else length) if short else (1, 512)
                        runs[f"eval/{impl}/{dt}/{length}"] = run_child("eval", {
                            "impl": impl, "dtype": dt, "length": length, "repeats": repeats, "warmup": warmup,
                            "device": device, "weights": weights}, limit_bytes=_limit())

        if "memory" in only:
            for impl in impls:
                for length in mem_lengths:
                    key = f"memory/{impl}/{length}"
                    known = runs.get(f"eval/{impl}/fp32/{length}")
                    if known and "error" not in known:
                        runs[key] = {**known, "from": f"eval/{impl}/fp32/{length}"}
                        continue
                    estimate = _estimate_peak(runs, impl, length)
                    budget = _limit()
                    if estimate is not None and estimate * 2**30 > budget:
                        runs[key] = {"skipped": f"estimated peak {estimate:.1f} GB (linear in length from the measured "
                                                f"runs) exceeds the {budget / 2**30:.1f} GB this benchmark allows itself "
                                                f"now (85% of available memory)", "estimated_peak_rss_gb": estimate}
                        print(f"  skip {key}: {runs[key]['skipped']}", file=sys.stderr)
                        continue
                    runs[key] = run_child("eval", {"impl": impl, "dtype": "fp32", "length": length, "repeats": 1, "warmup": 0,
                                                   "device": device, "weights": weights}, limit_bytes=budget)
                    if estimate is not None:
                        runs[key]["estimated_peak_rss_gb"] = estimate

        if "generate" in only:
            prompt, new = 32, 512
            points = [32, 288, 543] if quick else [32, 96, 160, 224, 288, 352, 416, 480, 543]
            if "palm_eval" in impls:
                runs["generate/palm_eval"] = run_child("generate", {"impl": "palm_eval", "prompt": prompt, "new": new,
                                                                    "device": device, "weights": weights})
            if "reference" in impls:
                runs["generate/reference"] = run_child("generate", {
                "impl": "reference", "prompt": prompt, "new": new, "points": points, "device": device,
                "weights": weights, "step_repeats": 1 if quick else 2, "check_tokens": 8 if quick else 16})

        if "train" in only:
            steps = 25 if quick else 60
            spec = {"config": "configs/tiny_xpos.yaml", "steps": steps, "skip": 5}
            if "palm_eval" in impls:
                runs["train/palm_eval"] = run_child("train", {**spec, "impl": "palm_eval"})
                # for information: the same trainer with its bf16 autocast option (the recipe leaves it off on CPU)
                runs["train/palm_eval/bf16=true"] = run_child("train", {**spec, "impl": "palm_eval", "bf16": True})
            for flash in (False, True) if "reference" in impls else ():
                runs[f"train/reference/flash_attn={flash}"] = run_child("train", {**spec, "impl": "reference",
                                                                                  "flash_attn": flash})

    results["finished_utc"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    results["load_average_at_end"] = os.getloadavg()
    results["summary"] = summarize(results)
    markdown = render(results)
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    for name in (f"results-{stamp}", "latest"):
        (out / f"{name}.json").write_text(json.dumps(results, indent=1))
        (out / f"{name}.md").write_text(markdown)
    print(markdown)
    print(f"wrote {out / f'results-{stamp}.json'} and .md", file=sys.stderr)
    return 0


def _limit() -> int:
    return int(0.85 * mem_available())


def _estimate_peak(runs: dict, impl: str, length: int) -> float | None:
    """Peak RSS at `length` extrapolated linearly from the two longest measured fp32 runs of `impl`."""
    known = sorted((int(k.rsplit("/", 1)[1]), v["peak_rss_gb"]) for k, v in runs.items()
                   if k.startswith((f"memory/{impl}/", f"eval/{impl}/fp32/")) and v.get("peak_rss_gb"))
    known = sorted(dict(known).items())
    if len(known) < 2:
        return None
    (a, pa), (b, pb) = known[-2], known[-1]
    return pb + (pb - pa) * (length - b) / (b - a)


# ----------------------------------------------------------------------------------------------
# summary and markdown


def summarize(results: dict) -> dict:
    runs = results["runs"]
    s: dict = {"eval": [], "memory": [], "targets": {}}
    peak = {dt: runs.get(f"peak/{dt}", {}).get("gflops") for dt in ("fp32", "bf16")}
    s["peak_gflops"] = peak
    for key, r in runs.items():
        if key.startswith("eval/") and "tokens_per_s" in r:
            _, impl, dt, length = key.split("/")
            achieved = r["tokens_per_s"] * flops_per_token(int(length)) / 1e9
            s["eval"].append({"impl": impl, "dtype": dt, "length": int(length), "tokens_per_s": r["tokens_per_s"],
                              "gflops": achieved, "fraction_of_peak": achieved / peak[dt] if peak.get(dt) else None,
                              "mean_nll": r.get("mean_nll")})
        if key.startswith("memory/"):
            _, impl, length = key.split("/")
            s["memory"].append({"impl": impl, "length": int(length), "peak_rss_gb": r.get("peak_rss_gb"),
                                "lifetime_max_rss_gb": r.get("lifetime_max_rss_gb"),
                                "max_allocated_gb": r.get("max_allocated_gb"),
                                "note": r.get("skipped") or r.get("error"),
                                "estimated_peak_rss_gb": r.get("estimated_peak_rss_gb")})
    t = s["targets"]
    e = {(x["impl"], x["dtype"], x["length"]): x for x in s["eval"]}
    if ("palm_eval", "bf16", 2048) in e and e[("palm_eval", "bf16", 2048)]["fraction_of_peak"] is not None:
        got = e[("palm_eval", "bf16", 2048)]["fraction_of_peak"]
        ref = e.get(("reference", "bf16", 2048), {}).get("fraction_of_peak")
        goal = TARGETS["bf16_eval_2k_fraction_of_peak"]
        t["bf16 eval at 2k >= 80% of the bf16 matmul peak"] = {
            "measured": got, "reference": ref, "ratio_to_target": got / goal, "met": got >= goal}
    m = {(x["impl"], x["length"]): x for x in s["memory"]}
    if ("palm_eval", 32768) in m and m[("palm_eval", 32768)]["peak_rss_gb"] is not None:
        got = m[("palm_eval", 32768)]["peak_rss_gb"]
        goal = TARGETS["peak_rss_32k_gb"]
        t["peak RSS at 32k <= 1.5 GB (fp32 weights)"] = {
            "measured": got, "lifetime_max": m[("palm_eval", 32768)]["lifetime_max_rss_gb"],
            "ratio_to_target": got / goal, "met": got <= goal}
    g_ours, g_ref = runs.get("generate/palm_eval", {}), runs.get("generate/reference", {})
    if "tokens_per_s" in g_ours and "tokens_per_s" in g_ref:
        ratio = g_ours["tokens_per_s"] / g_ref["tokens_per_s"]
        goal = TARGETS["generation_speedup"]
        t["generation >= 10x the reference"] = {"measured": ratio, "ratio_to_target": ratio / goal, "met": ratio >= goal}
    tr_ours = runs.get("train/palm_eval", {})  # the recipe as it is (fp32 on CPU)
    refs = {k: v for k, v in runs.items() if k.startswith("train/reference") and "tokens_per_s" in v}
    if "tokens_per_s" in tr_ours and refs:
        best_key = max(refs, key=lambda k: refs[k]["tokens_per_s"])
        ratio = tr_ours["tokens_per_s"] / refs[best_key]["tokens_per_s"]
        goal = TARGETS["training_speedup"]
        t["tiny training >= 2x the reference loop"] = {"measured": ratio, "against": best_key,
                                                       "ratio_to_target": ratio / goal, "met": ratio >= goal}
    return s


def _f(x, fmt="{:.0f}", none="—") -> str:
    return none if x is None else fmt.format(x)


def render(results: dict) -> str:
    s, runs, mi = results["summary"], results["runs"], results["machine"]
    lines = [f"Command: `{results['command']}`  ",
             f"Run: {results['started_utc']} → {results['finished_utc']} UTC, device {results['device']}"
             f"{' (quick)' if results['quick'] else ''}, load average at start "
             f"{', '.join(f'{x:.2f}' for x in mi['load_average_at_start'])}, at end "
             f"{', '.join(f'{x:.2f}' for x in results['load_average_at_end'])}  ",
             f"Machine: {mi['cpu_model']}, {mi['logical_cpus']} logical CPUs, torch threads {mi['torch_threads']}, "
             f"{mi['mem_total_gb']} GB RAM ({mi['mem_available_gb_at_start']} GB available at start); "
             f"matmul-relevant flags: {' '.join(mi['cpu_flags_matmul'])}; torch CPU capability {mi['torch_cpu_capability']}  ",
             f"Versions: Python {mi['python']}, torch {mi['torch']}, palm-eval {mi.get('palm-eval')} "
             f"(git {mi.get('git_commit')}{', model.py modified' if mi.get('model_py_modified') else ''}), "
             f"palm-rlhf-pytorch {mi.get('palm-rlhf-pytorch')}", ""]
    pk = s["peak_gflops"]
    lines += [f"Matrix-multiply peak (best torch.matmul of 1024²–4096² squares): fp32 {_f(pk.get('fp32'))} GFLOP/s, "
              f"bf16 {_f(pk.get('bf16'))} GFLOP/s", ""]
    if s["eval"]:
        lines += ["### Evaluation throughput (palm_150m, batch 1, scored tokens/s)", "",
                  "| length | dtype | palm-eval tok/s | reference tok/s | speed-up | palm-eval GFLOP/s (% of peak) "
                  "| reference GFLOP/s (% of peak) | mean nll palm-eval / reference |",
                  "|---:|---|---:|---:|---:|---:|---:|---|"]
        e = {(x["impl"], x["dtype"], x["length"]): x for x in s["eval"]}
        for length in sorted({x["length"] for x in s["eval"]}):
            for dt in ("fp32", "bf16"):
                o, r = e.get(("palm_eval", dt, length)), e.get(("reference", dt, length))
                if not (o or r):
                    continue
                cell = lambda x: "—" if not x else f"{x['gflops']:.0f} ({_f(x['fraction_of_peak'], '{:.0%}')})"
                lines.append(f"| {length} | {dt} | {_f(o and o['tokens_per_s'])} | {_f(r and r['tokens_per_s'])} | "
                             f"{_f(o and r and o['tokens_per_s'] / r['tokens_per_s'], '{:.2f}×')} | {cell(o)} | {cell(r)} | "
                             f"{_f(o and o['mean_nll'], '{:.4f}')} / {_f(r and r['mean_nll'], '{:.4f}')} |")
        lines.append("")
    if s["memory"]:
        lines += ["### Peak memory while scoring one sequence (fp32 weights, each length in its own process)", "",
                  "| length | palm-eval peak RSS GB | reference peak RSS GB | palm-eval lifetime max RSS GB | notes |",
                  "|---:|---:|---:|---:|---|"]
        m = {(x["impl"], x["length"]): x for x in s["memory"]}
        for length in sorted({x["length"] for x in s["memory"]}):
            o, r = m.get(("palm_eval", length), {}), m.get(("reference", length), {})
            note = r.get("note") or o.get("note") or ""
            ref_cell = _f(r.get("peak_rss_gb"), "{:.2f}")
            if r.get("peak_rss_gb") is None and r.get("estimated_peak_rss_gb"):
                ref_cell = f"not run (est. {r['estimated_peak_rss_gb']:.1f})"
            lines.append(f"| {length} | {_f(o.get('peak_rss_gb'), '{:.2f}')} | {ref_cell} | "
                         f"{_f(o.get('lifetime_max_rss_gb'), '{:.2f}')} | {note} |")
        lines.append("")
    g_ours, g_ref = runs.get("generate/palm_eval"), runs.get("generate/reference")
    if g_ours or g_ref:
        lines += ["### Generation (fp32, 32-token prompt, 512 new tokens, top-k sampling)", "",
                  "| | tokens/s | seconds for 512 | how |", "|---|---:|---:|---|"]
        for name, r in (("palm-eval (KV cache)", g_ours), ("reference (full recompute)", g_ref)):
            if r and "tokens_per_s" in r:
                lines.append(f"| {name} | {r['tokens_per_s']:.2f} | {r['seconds']:.1f} | {r['method']} |")
            elif r:
                lines.append(f"| {name} | — | — | {r.get('error')} |")
        if g_ref and "check" in g_ref:
            c = g_ref["check"]
            lines.append(f"\nCheck of the estimate: a real reference run of {c['new_tokens']} new tokens took "
                         f"{c['measured_s']:.1f} s; the interpolation predicts {c['predicted_s']:.1f} s.")
        lines.append("")
    trains = {k: v for k, v in runs.items() if k.startswith("train/")}
    if trains:
        lines += ["### Training (configs/tiny_xpos.yaml: dim 128, depth 4, 4 heads of 32, vocab 257, 8 × 256 tokens a step)",
                  "", "| | tokens/s | threads | how |", "|---|---:|---:|---|"]
        for k, r in trains.items():
            if "tokens_per_s" in r:
                lines.append(f"| {k} | {r['tokens_per_s']:.0f} | {r.get('threads')} | {r['method']} |")
            else:
                lines.append(f"| {k} | — | — | {r.get('error')} |")
        lines.append("")
    if s["targets"]:
        lines += ["### Targets (issue 7)", "", "| target | measured | ratio to target | met |", "|---|---:|---:|---|"]
        for name, t in s["targets"].items():
            value = t["measured"]
            shown = f"{value:.0%}" if "%" in name else (f"{value:.2f} GB" if "GB" in name else f"{value:.1f}×")
            if t.get("reference") is not None:
                shown += f" (reference {t['reference']:.0%})"
            lines.append(f"| {name} | {shown} | {t['ratio_to_target']:.2f} | {'**met**' if t['met'] else '**not met**'} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
