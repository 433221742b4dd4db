"""`palm-eval convert palm_1b_8k_v0.pt [out.safetensors]`: a pickled state dict to safetensors.

The input is read with `torch.load(weights_only=True)`, so an untrusted file cannot run code here.
"""

from __future__ import annotations

import argparse

from palm_eval.checkpoint import convert_to_safetensors


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="palm-eval convert", description=__doc__.split("\n\n")[0])
    p.add_argument("src", help=".pt / .pth / .bin state dict saved by palm-rlhf-pytorch <= 0.2.3 or palm-eval")
    p.add_argument("dst", nargs="?", help="output .safetensors (default: beside the input)")
    p.add_argument("--gamma-offset", action="store_true",
                   help="the file comes from palm-rlhf-pytorch >= 0.2.4 (LayerNorm gains stored minus 1)")
    args = p.parse_args(argv)
    out = convert_to_safetensors(args.src, args.dst, gamma_offset=True if args.gamma_offset else None)
    print(f"wrote {out}")
    return 0
