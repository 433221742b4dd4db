"""`palm-eval <command>`: one entry point; each command lives in the module that implements it.

Errors the user can fix (`PalmEvalError`) print as one line and exit with status 2.
"""

from __future__ import annotations

import importlib
import sys

from palm_eval.errors import PalmEvalError

COMMANDS = {
    "eval": ("palm_eval.evaluator", "evaluate models on tasks and write results + report (run_eval.py)"),
    "report": ("palm_eval.report", "build a report from one or more results.json files"),
    "train": ("palm_eval.trainer", "train a model from a YAML config"),
    "generate": ("palm_eval.generate", "generate text from a model"),
    "convert": ("palm_eval.convert", "convert a .pt state dict to .safetensors"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = [f"  {name:<9} {help}" for name, (_, help) in COMMANDS.items()]
        print("usage: palm-eval <command> [options]\n\ncommands:\n" + "\n".join(lines))
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nerror: unknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    module = importlib.import_module(COMMANDS[argv[0]][0])
    try:
        return module.main(argv[1:]) or 0
    except PalmEvalError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
