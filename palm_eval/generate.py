"""`palm-eval generate "My dog is very cute" --seq_len 256 --temperature 0.8 --filter_thres 0.9 --model palm_410m`.

The flags are those of the original PaLM repository's inference.py: `--seq_len` is the total length
(prompt included) and `--filter_thres` keeps the top ceil((1 - thres) * vocab) logits before sampling.
"""

from __future__ import annotations

import argparse
import time

import torch

from palm_eval.errors import PalmEvalError
from palm_eval.model import top_k_from_filter_thres
from palm_eval.registry import load_model
from palm_eval.tokenizer import load_tokenizer


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="palm-eval generate", description=__doc__.split("\n\n")[0])
    p.add_argument("prompt", help="text to continue")
    p.add_argument("--model", default="palm_410m", help="registered name, card (.yaml) or checkpoint file")
    p.add_argument("--tokenizer", help="tokenizer file or hub id (default: the model card's)")
    p.add_argument("--seq_len", type=int, default=256, help="total tokens, prompt included")
    p.add_argument("--temperature", type=float, default=0.8, help="0 for greedy decoding")
    p.add_argument("--filter_thres", type=float, default=0.9, help="top-k as a fraction: keeps ceil((1-thres)*vocab)")
    p.add_argument("--top_p", type=float, help="nucleus sampling threshold, applied after top-k")
    p.add_argument("--no_stop_at_eos", action="store_true", help="keep generating after end-of-text")
    p.add_argument("--device", help="cpu, cuda, cuda:N (default: cuda if available)")
    p.add_argument("--dtype", default="fp32", help="fp32 or bf16")
    p.add_argument("--pos_emb", choices=["xpos", "rope", "none"], help="override the position handling")
    p.add_argument("--attn_window", type=int, help="windowed attention over this many recent tokens")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    overrides = {"pos_emb": args.pos_emb}
    if args.attn_window is not None:
        overrides["attn_window"] = args.attn_window
    model = load_model(args.model, device=args.device, dtype=args.dtype, **overrides)
    tokenizer_name = args.tokenizer or model.card.tokenizer
    if tokenizer_name is None:
        raise PalmEvalError(f"{args.model} names no tokenizer: pass --tokenizer PATH_OR_ID")
    tokenizer = load_tokenizer(tokenizer_name)
    device = next(model.parameters()).device
    prompt = torch.tensor([tokenizer.encode(args.prompt)], device=device)
    if prompt.shape[1] == 0:
        raise PalmEvalError("the prompt encodes to no tokens: give some text")
    new_tokens = args.seq_len - prompt.shape[1]
    if new_tokens < 1:
        raise PalmEvalError(f"--seq_len {args.seq_len} leaves no room after the {prompt.shape[1]}-token prompt")

    generator = torch.Generator(device=device).manual_seed(args.seed)
    start = time.perf_counter()
    out = model.generate(
        prompt,
        new_tokens,
        temperature=args.temperature,
        top_k=top_k_from_filter_thres(args.filter_thres, model.config.num_tokens),
        top_p=args.top_p,
        eos_id=None if args.no_stop_at_eos else tokenizer.eos_id,
        generator=generator,
    )[0].tolist()
    elapsed = time.perf_counter() - start
    if tokenizer.eos_id in out:
        out = out[: out.index(tokenizer.eos_id)]
    print(args.prompt + tokenizer.decode(out))
    print(f"[{len(out)} tokens in {elapsed:.2f} s, {len(out) / elapsed:.1f} tokens/s]", flush=True)
    return 0
