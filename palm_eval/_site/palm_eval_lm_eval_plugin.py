"""Makes `lm_eval --model palm` work right after `pip install palm-eval`, with lm-eval 0.4.13.

lm-eval 0.4.13 resolves `--model` against its registry before any user code runs and reads no plugin entry
points (later versions read `[project.entry-points."lm_eval.models"]`, which pyproject.toml declares too).
So the wheel puts this module and `palm_eval_lm_eval.pth` at the top of site-packages, and Python's `site`
runs the .pth's `autoregister()` at every start-up. The module uses only the standard library (a start-up
costs microseconds); only when the process is `lm_eval` / `lm-eval` or `python -m lm_eval` (what
`accelerate launch -m lm_eval` and `torchrun -m lm_eval` start) it registers `palm`, as a lazy "module:Class"
placeholder (torch and the adapter load only when the model is used), the moment lm-eval's registry is
imported. Editable installs copy both files at install time: re-run `pip install -e .` after editing them.
"""

from __future__ import annotations

import os
import sys

MODEL_NAME = "palm"
TARGET = "palm_eval.lm_eval_adapter:PalmLM"
REGISTRY_MODULE = "lm_eval.api.registry"
LM_EVAL_MODULES = ("lm_eval", "lm_eval.__main__")
LM_EVAL_SCRIPTS = ("lm_eval", "lm-eval")
_OPTIONS_WITH_VALUE = ("-X", "-W", "--check-hash-based-pycs")


def runs_lm_eval(argv: list[str]) -> bool:
    """Whether a command line (`sys.orig_argv`: the interpreter first) runs the lm-eval CLI."""
    args = iter(argv[1:])
    for arg in args:
        if arg == "-m":
            return next(args, "") in LM_EVAL_MODULES
        if arg.startswith("-m"):
            return arg[2:] in LM_EVAL_MODULES
        if arg == "-c":
            return False
        if arg in _OPTIONS_WITH_VALUE:
            next(args, None)
        elif not arg.startswith("-"):
            name = os.path.basename(arg)
            return os.path.splitext(name)[0] in LM_EVAL_SCRIPTS
    return False


def register() -> None:
    """Register `palm` in lm-eval's model registry (idempotent), keeping every built-in model resolvable."""
    import lm_eval.models  # noqa: F401  get_model imports the built-ins only while the registry is empty
    from lm_eval.api.registry import model_registry

    if MODEL_NAME not in model_registry:
        model_registry.register(MODEL_NAME, target=TARGET)


def autoregister() -> None:
    """Called at start-up by the .pth: in lm-eval processes, register as soon as lm-eval's registry exists.

    Registering right away could fail: lm-eval may sit in a site directory that `site` adds after this one
    (a user install of palm-eval, a venv with system site-packages).
    """
    waiting = any(isinstance(finder, _RegisterAfterImport) for finder in sys.meta_path)  # site may run a .pth twice
    if runs_lm_eval(getattr(sys, "orig_argv", [])) and not waiting:
        sys.meta_path.insert(0, _RegisterAfterImport())


class _RegisterAfterImport:
    """A `sys.meta_path` finder that finds nothing itself: it wraps the loading of `lm_eval.api.registry` so
    that `register()` runs right after (importing importlib.abc for a base class would slow every start-up)."""

    def find_spec(self, fullname, path, target=None):
        if fullname != REGISTRY_MODULE:
            return None
        import importlib.util

        sys.meta_path.remove(self)  # once, and so that the real finders locate the module
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            exec_module = spec.loader.exec_module

            def exec_then_register(module) -> None:
                exec_module(module)
                try:
                    register()
                except Exception as e:  # `lm_eval --model hf` must still work and report its own errors
                    print(f"palm-eval: could not register the `palm` model with lm-eval: {type(e).__name__}: {e}",
                          file=sys.stderr)

            spec.loader.exec_module = exec_then_register
        return spec
