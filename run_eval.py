"""Evaluate models on tasks: `python run_eval.py --model palm_1b --tasks lambada,c4_ppl_16k`.

With no arguments, evaluates the bundled tiny models on the built-in held-out corpus and writes a report.
Same as `palm-eval eval`.
"""

import sys

from palm_eval.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
