"""Where the time of `model.score` goes: torch.profiler over one scored sequence, grouped into categories.

    python benchmarks/breakdown.py [--dtype bf16] [--length 2048] [--impl palm_eval|reference] [--top 15]

Random palm_150m weights, batch 1, after one warm-up call. Categories: the weight matmuls of the blocks,
the logits matmul, attention (SDPA kernel), the logits' post-processing (log-sum-exp, max, cross-entropy
over [positions, vocab] tensors) and everything else (norms, rotary, SwiGLU, residual adds, copies).
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from palm_eval.model import PaLM, PaLMConfig  # noqa: E402

VOCAB = 50304
MATMULS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear")


def category(name: str, shapes: list) -> str:
    dims = [d for shape in shapes if isinstance(shape, list) for d in shape]
    if name in MATMULS:
        return "logits matmul" if VOCAB in dims else "block matmuls"
    if "scaled_dot_product" in name or "flash_attention" in name:
        return "attention (SDPA)"
    if VOCAB in dims:
        return "logits post-processing"
    return "other (norms, rotary, SwiGLU, adds, copies)"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dtype", default="bf16", choices=["fp32", "bf16"])
    p.add_argument("--length", type=int, default=2048)
    p.add_argument("--impl", default="palm_eval", choices=["palm_eval", "reference"])
    p.add_argument("--top", type=int, default=15, help="also print the most expensive ops")
    args = p.parse_args()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    torch.manual_seed(0)
    if args.impl == "palm_eval":
        model = PaLM(PaLMConfig()).eval().to(dtype)
    else:
        from palm_rlhf_pytorch import PaLM as RefPaLM

        warnings.filterwarnings("ignore", category=FutureWarning)
        model = RefPaLM(num_tokens=VOCAB, dim=768, depth=12, dim_head=128, heads=8, flash_attn=True).eval().to(dtype)
    seq = torch.randint(1, VOCAB, (1, args.length + 1))
    tokens, targets = seq[:, :-1], seq[:, 1:]

    def run():
        with torch.no_grad():
            if args.impl == "palm_eval":
                return model.score(tokens, targets)
            return F.cross_entropy(model(tokens)[0], targets[0], reduction="none")

    run()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        t = time.perf_counter()
        run()
        wall = time.perf_counter() - t
    totals: dict[str, float] = {}
    rows = prof.key_averages(group_by_input_shape=True)
    for row in rows:
        key = category(row.key, row.input_shapes)
        totals[key] = totals.get(key, 0.0) + row.self_cpu_time_total / 1e6
    measured = sum(totals.values())
    print(f"{args.impl} {args.dtype} length {args.length}: {wall:.2f} s wall under the profiler "
          f"({args.length / wall:.0f} tokens/s), {torch.get_num_threads()} threads")
    print("| category | seconds | share |\n|---|---:|---:|")
    for key, seconds in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"| {key} | {seconds:.3f} | {seconds / measured:.0%} |")
    if args.top:
        print()
        print(rows.table(sort_by="self_cpu_time_total", row_limit=args.top, max_name_column_width=40,
                         max_shapes_column_width=60))
    return 0


if __name__ == "__main__":
    sys.exit(main())
