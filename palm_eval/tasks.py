"""Task registry: one YAML file per task in `tasks/`; adding a task is adding a file.

A task file names its `task`, its `task_type` (perplexity | lambada | passkey) and its options; where its
data comes from is `data:` — a fixed `source` (e.g. builtin:heldout), or file name patterns looked up in
--data-dir plus the command-line `option` that overrides them (e.g. c4_path for --c4-path).
`text_ppl_<L>` (L like 512, 2k, 32k or 4x the training length) needs no file: it is perplexity over the
corpus given with --text-path.

Lengths are written as tokens (2048), kibi-tokens (2k) or multiples of the model's training length (4x).
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from palm_eval.errors import PalmEvalError
from palm_eval.registry import resource_dir

TASK_TYPES = ("perplexity", "lambada", "passkey")
TEXT_PPL = re.compile(r"text_ppl_(\d+k?|\d+(?:\.\d+)?x)$")


def parse_length(spec: str | int, train_length: int | None, task: str = "") -> int:
    """2048, "2k" (= 2048) or "4x" (4 x the model's training length) -> tokens."""
    text = str(spec).strip().lower()
    try:
        if text.endswith("x"):
            if train_length is None:
                raise PalmEvalError(
                    f"{task}: length {spec} is relative to the training length, which this model's card does not "
                    "give; use lengths in tokens (e.g. text_ppl_2k) or a card with train_length"
                )
            length = round(float(text[:-1]) * train_length)
        elif text.endswith("k"):
            length = int(text[:-1]) * 1024
        else:
            length = int(text)
    except ValueError:
        raise PalmEvalError(
            f"{task}: bad length {spec!r}: use tokens (2048), 2k or a multiple of the training length (4x)"
        ) from None
    if length < 1:
        raise PalmEvalError(f"{task}: length {spec!r} must be at least one token")
    return length


def format_length(length: int) -> str:
    return f"{length // 1024}k" if length % 1024 == 0 else str(length)


@dataclass
class RunContext:
    """What every task of one model run shares: the model, its tokenizer, the options, the data read so far."""

    model: object
    tokenizer: object
    train_length: int | None = None
    data_dir: Path | None = None
    paths: dict = field(default_factory=dict)  # per-task data options: c4_path, lambada_path, text_path
    limit: int | None = None
    stride: int | None = None
    seed: int = 0
    skip_target: int | None = None  # target id never scored (end-of-text for the published models)
    warn: Callable[[str], None] = lambda message: print(f"warning: {message}", file=sys.stderr)
    progress: bool = False  # progress bars (on the main process, in a terminal)
    _streams: dict = field(default_factory=dict)
    _byte_lengths: np.ndarray | None = None

    def token_stream(self, sources: tuple[str, ...], max_tokens: int | None) -> np.ndarray:
        """The concatenated token streams of the sources (read once per run)."""
        from palm_eval.data import load_token_stream

        key = (sources, max_tokens)
        if key not in self._streams:
            parts, total = [], 0
            for source in sources:
                wanted = None if max_tokens is None else max_tokens - total
                parts.append(load_token_stream(source, self.tokenizer, wanted, progress=self.progress))
                total += len(parts[-1])
                if max_tokens is not None and total >= max_tokens:
                    break
            self._streams[key] = np.concatenate(parts)
        return self._streams[key]

    @property
    def byte_lengths(self) -> np.ndarray:
        if self._byte_lengths is None:
            self._byte_lengths = self.tokenizer.token_byte_lengths()
        return self._byte_lengths


class Task:
    """Items with stable ids (evaluated in batches, cached, sharded by the evaluator) and their aggregation."""

    def __init__(self, name: str, config: dict, ctx: RunContext):
        self.name, self.config, self.ctx = name, config, ctx

    def items(self) -> list[tuple[str, object]]:
        raise NotImplementedError

    def evaluate(self, batch: list[tuple[str, object]]) -> list[dict]:
        """One JSON-able result per item; each has `tokens_in` (tokens fed to the model, for tokens/s)."""
        raise NotImplementedError

    def aggregate(self, results: dict[str, dict]) -> tuple[dict, dict]:
        """(results entries by name, details by name) from every item's result."""
        raise NotImplementedError

    def fingerprint(self) -> dict:
        """Whatever, besides the model and the task config, decides the items' numbers (e.g. the data)."""
        return {}


def task_files() -> dict[str, Path]:
    """Task name -> YAML file, for every file in `tasks/`."""
    files = {}
    for path in sorted(resource_dir("tasks").glob("*.yaml")):
        files[_read_yaml(path).get("task", path.stem)] = path
    return files


def _read_yaml(path: Path) -> dict:
    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise PalmEvalError(f"cannot read task file {path}: {str(e).splitlines()[0]}") from None
    if not isinstance(config, dict):
        raise PalmEvalError(f"task file {path} must be a mapping with at least `task_type:`")
    return config


def task_config(name: str) -> dict:
    """The configuration of a registered task, a `text_ppl_<L>` name, or a task YAML file path."""
    if name.endswith((".yaml", ".yml")):
        path = Path(name).expanduser()
        if not path.is_file():
            raise PalmEvalError(f"task file not found: {path}")
        config = {"task": path.stem, **_read_yaml(path)}
    elif name in (files := task_files()):
        config = {"task": name, **_read_yaml(files[name])}
    elif match := TEXT_PPL.match(name):
        config = {"task": name, "task_type": "perplexity", "family": "text_ppl", "lengths": [match.group(1)],
                  "data": {"option": "text_path"}}
    else:
        known = ", ".join([*files, "text_ppl_<L>"])
        raise PalmEvalError(f"unknown task {name!r}: available tasks are {known} (or a task .yaml file)")
    if config.get("task_type") not in TASK_TYPES:
        types = ", ".join(TASK_TYPES)
        raise PalmEvalError(f"task {name}: task_type must be one of {types}, got {config.get('task_type')!r}")
    return config


def make_task(config: dict, ctx: RunContext) -> Task:
    from palm_eval.lambada import LambadaTask
    from palm_eval.passkey import PasskeyTask
    from palm_eval.perplexity import PerplexityTask

    cls = {"perplexity": PerplexityTask, "lambada": LambadaTask, "passkey": PasskeyTask}[config["task_type"]]
    return cls(config["task"], config, ctx)


def data_flag(config: dict) -> str | None:
    """The command-line option that gives a task its data (--c4-path for `option: c4_path`)."""
    option = (config.get("data") or {}).get("option")
    return f"--{option.replace('_', '-')}" if option else None


def resolve_source(name: str, config: dict, ctx: RunContext) -> tuple[str, ...]:
    """Where a task's data is: its option (--c4-path ...), else its file patterns in --data-dir, else its source."""
    data = config.get("data") or {}
    option, patterns, flag = data.get("option"), data.get("files", []), data_flag(config)
    if option and ctx.paths.get(option):
        path = str(ctx.paths[option])
        if not path.startswith(("hf:", "builtin:")) and not Path(path).expanduser().exists():
            raise PalmEvalError(f"{name}: {flag} {path} does not exist")
        return (path,)
    if patterns and ctx.data_dir is not None:
        for pattern in patterns:
            found = sorted(p for p in Path(ctx.data_dir).expanduser().glob(pattern) if p.is_file())
            if found:
                return tuple(str(p) for p in found)
    if data.get("source"):
        return (data["source"],)
    ways = []
    if patterns:
        where = f"--data-dir (nothing matches in {ctx.data_dir})" if ctx.data_dir else "--data-dir DIR"
        ways.append(f"put {' or '.join(patterns)} in {where}")
    if flag:
        ways.append(f"pass {flag} PATH")
    raise PalmEvalError(f"{name} needs data: {', or '.join(ways)}")
