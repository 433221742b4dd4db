"""`palm-eval train --config run.yaml`: train a PaLM from one YAML file, on one process or under torchrun.

The same code runs as a single CPU process and as `torchrun --nproc_per_node N` (DDP: gloo on CPU, nccl on
GPU). Why it is built this way:
- the batch of step s is a function of (seed, s) alone: every process draws the whole global batch and
  keeps its rows, so the data position in a checkpoint is just the step and N processes see exactly the
  batches one process sees;
- the loss of a step is the mean over every scored target of the global batch (not a mean of per-process
  means), so 1 and N processes give the same losses up to float rounding;
- a checkpoint is a directory written under a temporary name and renamed, then `latest` is switched to it
  atomically: a run killed at any moment resumes from a complete checkpoint and, the batches being
  functions of the step, ends with the same weights and losses as an uninterrupted run;
- optimizer as the published runs (AdamW 0.9/0.95, decoupled weight decay on Linear weights only, warmup
  then cosine or linear decay, gradient clipping), the learning rate computed from the step (nanoGPT
  style) so the schedule needs no saved state.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import yaml
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from palm_eval import data
from palm_eval.checkpoint import atomic_write, load_weights, read_state_dict, save_safetensors
from palm_eval.errors import PalmEvalError
from palm_eval.model import PaLM, PaLMConfig
from palm_eval.registry import CONFIG_FIELDS, resolve_device
from palm_eval.tokenizer import load_tokenizer

DECAYS = ("cosine", "linear")


@dataclass
class TrainConfig:
    """One training run; every field can be set in the YAML file. `model` holds PaLMConfig fields."""

    out_dir: str  # checkpoints, log.jsonl and the final model.safetensors; a run resumes from here
    model: dict = field(default_factory=dict)  # num_tokens defaults to the tokenizer's vocab, ignore_index to its eos
    data: str = "builtin:train"  # documents (read_documents) or a pre-tokenized `input_ids` parquet file / folder
    heldout: str | None = "builtin:heldout"
    tokenizer: str = "byte"
    seq_len: int = 256  # training length: tokens per window fed to the model
    batch_size: int = 16  # windows per optimizer step, over all processes
    micro_batch_size: int | None = None  # windows per forward pass in each process (None: all of its share)
    steps: int = 1000
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100
    decay: str = "cosine"  # cosine | linear, from lr after warmup down to min_lr at the last step
    weight_decay: float = 0.1  # decoupled, Linear weights only
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float | None = 1.0
    bf16: bool | None = None  # bfloat16 autocast; None: on CUDA only (on CPU it is slower for small models)
    device: str | None = None  # None: cuda when available, else cpu
    threads: int | None = None  # CPU threads per process (None: torch's default); 1 is fastest on a busy machine
    seed: int = 0
    eval_every: int = 250  # held-out loss every this many steps (and at the end)
    eval_windows: int = 64  # held-out windows of seq_len, evenly spaced over the held-out stream
    checkpoint_every: int = 250
    card: str | None = None  # also write a model card here (e.g. models/tiny_xpos.yaml) with the weights beside it
    description: str = ""  # the card's description

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        unknown = set(self.model) - CONFIG_FIELDS
        if unknown:
            raise PalmEvalError(f"unknown model fields {sorted(unknown)}; valid: {', '.join(sorted(CONFIG_FIELDS))}")
        positive = ("seq_len", "batch_size", "steps", "eval_every", "eval_windows", "checkpoint_every")
        for name in positive:
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise PalmEvalError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            raise PalmEvalError(f"micro_batch_size must be a positive integer or null, got {self.micro_batch_size!r}")
        if self.decay not in DECAYS:
            raise PalmEvalError(f"decay must be one of {', '.join(DECAYS)}, got {self.decay!r}")
        if not 0 <= self.warmup_steps <= self.steps:
            raise PalmEvalError(f"warmup_steps must lie in [0, steps={self.steps}], got {self.warmup_steps}")
        if not (self.lr > 0 and 0 <= self.min_lr <= self.lr):
            raise PalmEvalError(f"need lr > 0 and 0 <= min_lr <= lr, got lr={self.lr}, min_lr={self.min_lr}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise PalmEvalError(f"betas must be two numbers in [0, 1), got {list(self.betas)}")
        if self.card is not None and not self.card.endswith((".yaml", ".yml")):
            raise PalmEvalError(f"card must be a .yaml path (e.g. models/tiny_xpos.yaml), got {self.card!r}")

    @classmethod
    def from_yaml(cls, path: str | os.PathLike, overrides: list[str] = ()) -> TrainConfig:
        """The YAML file's fields, then `key=value` overrides (YAML values; `model.dim=64` for model fields)."""
        try:
            raw = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError) as e:
            raise PalmEvalError(f"cannot read training config {path}: {e}") from None
        if not isinstance(raw, dict):
            raise PalmEvalError(f"training config {path} must be a mapping of fields (out_dir, model, steps, ...)")
        for item in overrides:
            key, sep, value = item.partition("=")
            if not sep:
                raise PalmEvalError(f"override {item!r} must look like key=value (e.g. steps=100 or model.dim=64)")
            target = raw.setdefault("model", {}) if key.startswith("model.") else raw
            target[key.removeprefix("model.")] = yaml.safe_load(value)
        valid = {f.name for f in fields(cls)}
        unknown = set(raw) - valid
        if unknown:
            raise PalmEvalError(f"{path}: unknown fields {sorted(unknown)}; valid: {', '.join(sorted(valid))}")
        if "out_dir" not in raw:
            raise PalmEvalError(f"{path} needs `out_dir:` (where checkpoints and logs go)")
        try:
            return cls(**raw)
        except TypeError as e:
            raise PalmEvalError(f"{path}: {e}") from None


# ----------------------------------------------------------------------------------------------
# processes


@dataclass
class Dist:
    rank: int
    world: int
    device: torch.device

    def all_sum(self, x: Tensor) -> Tensor:
        if self.world > 1:
            dist.all_reduce(x)
        return x


def setup_distributed(device: str | None) -> Dist:
    """One process, or the process group torchrun describes in the environment."""
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    dev = resolve_device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank, world, dev)


# ----------------------------------------------------------------------------------------------
# data


def load_tokens(source: str, tokenizer) -> np.ndarray:
    """The token stream of a source: pre-tokenized parquet as is, documents tokenized with eos after each."""
    if data.is_pretokenized(source):
        return data.read_pretokenized(source)
    return data.token_stream(data.read_documents(source), tokenizer)


class Windows:
    """Training windows of seq_len + 1 tokens drawn from a token stream; step s's batch depends on (seed, s) only."""

    def __init__(self, tokens: np.ndarray, seq_len: int, seed: int, name: str):
        if len(tokens) < seq_len + 1:
            raise PalmEvalError(f"{name} holds {len(tokens)} tokens, fewer than seq_len + 1 = {seq_len + 1}")
        self.tokens = torch.from_numpy(tokens.astype(np.int64))
        self.seq_len, self.seed = seq_len, seed
        self.offsets = torch.arange(seq_len + 1)

    def batch(self, step: int, size: int) -> Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        starts = torch.randint(0, len(self.tokens) - self.seq_len, (size,), generator=g)
        return self.tokens[starts[:, None] + self.offsets]

    def evenly_spaced(self, count: int) -> Tensor:
        """`count` fixed windows spread over the whole stream (for held-out and final train losses)."""
        starts = torch.linspace(0, len(self.tokens) - self.seq_len - 1, count).long()
        return self.tokens[starts[:, None] + self.offsets]


# ----------------------------------------------------------------------------------------------
# optimization


class LossModel(nn.Module):
    """DDP synchronizes gradients of what runs through `forward`; here that is the training loss."""

    def __init__(self, model: PaLM):
        super().__init__()
        self.model = model

    def forward(self, tokens: Tensor) -> Tensor:
        return self.model.loss(tokens)


def build_optimizer(model: PaLM, cfg: TrainConfig, fused: bool) -> torch.optim.AdamW:
    """AdamW with weight decay on Linear weights only: not on norms, the tied embedding or q/k scales."""
    decay = [m.weight for m in model.modules() if isinstance(m, nn.Linear)]
    decay_ids = {id(p) for p in decay}
    no_decay = [p for p in model.parameters() if id(p) not in decay_ids]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, fused=fused or None)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of step `step` (0-based): linear warmup, then cosine or linear decay to min_lr."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.decay == "cosine" else 1 - progress
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * shape


# ----------------------------------------------------------------------------------------------
# checkpoints: out_dir/checkpoints/step_NNNNNNN/{model.safetensors,state.pt}, out_dir/latest names the newest


def save_checkpoint(out: Path, model: PaLM, optimizer: torch.optim.Optimizer, state: dict) -> None:
    step_dir = out / "checkpoints" / f"step_{state['step']:07d}"
    tmp = step_dir.with_name(f".tmp-{step_dir.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(step_dir, ignore_errors=True)  # an orphan of a run killed before `latest` named it
    tmp.mkdir(parents=True)
    meta = {"step": state["step"], "data_fingerprint": state["fingerprint"]}
    save_safetensors(model, tmp / "model.safetensors", meta)
    rng = {"rng_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["rng_cuda"] = torch.cuda.get_rng_state_all()
    torch.save({"optimizer": optimizer.state_dict(), **state, **rng}, tmp / "state.pt")
    tmp.rename(step_dir)
    previous = (out / "latest").read_text().strip() if (out / "latest").is_file() else None
    atomic_write(out / "latest", lambda p: p.write_text(step_dir.name + "\n"))
    if previous and previous != step_dir.name:
        shutil.rmtree(out / "checkpoints" / previous, ignore_errors=True)


def latest_checkpoint(out: Path) -> Path | None:
    pointer = out / "latest"
    if not pointer.is_file():
        return None
    path = out / "checkpoints" / pointer.read_text().strip()
    if not (path / "state.pt").is_file():
        raise PalmEvalError(f"{pointer} names {path}, which is incomplete; delete {out} to start over")
    return path


def load_checkpoint(path: Path, model: PaLM) -> dict:
    """Weights into `model` (before the optimizer is built: loading replaces the parameters); the rest returned."""
    state, _ = read_state_dict(path / "model.safetensors")
    load_weights(model, state, str(path), gamma_offset=False)
    saved = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    torch.set_rng_state(saved["rng_cpu"])
    if "rng_cuda" in saved and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(saved["rng_cuda"])
    return saved


# ----------------------------------------------------------------------------------------------
# the loop


def resolved_config(cfg: TrainConfig, tokenizer) -> dict:
    resolved = asdict(cfg)
    resolved["model"] = {"num_tokens": tokenizer.vocab_size, "ignore_index": tokenizer.eos_id, **cfg.model}
    resolved["betas"] = list(cfg.betas)
    return resolved


@torch.no_grad()
def mean_loss(model: PaLM, windows: Tensor, micro: int, proc: Dist, autocast) -> float:
    """Token-weighted mean loss of `windows`, each process scoring its share."""
    model.eval()
    ignore = -100 if model.config.ignore_index is None else model.config.ignore_index
    total = torch.zeros(2, dtype=torch.float64, device=proc.device)
    for s in range(proc.rank * micro, len(windows), proc.world * micro):
        tokens = windows[s : s + micro].to(proc.device)
        count = (tokens[:, 1:] != ignore).sum()
        with autocast:
            total += torch.stack([model.loss(tokens).double() * count, count.double()])
    model.train()
    total = proc.all_sum(total)
    return (total[0] / total[1].clamp(min=1)).item()


def train(cfg: TrainConfig, command: str = "") -> dict:
    """Run (or resume) the training `cfg` describes; returns the final summary written into the card."""
    proc = setup_distributed(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out_dir)
    tokenizer = load_tokenizer(cfg.tokenizer)
    resolved = resolved_config(cfg, tokenizer)
    model_cfg = PaLMConfig(**resolved["model"])

    train_tokens = load_tokens(cfg.data, tokenizer)
    if train_tokens.size and int(train_tokens.max()) >= model_cfg.num_tokens:
        raise PalmEvalError(
            f"{cfg.data} has token ids up to {int(train_tokens.max())} but model.num_tokens is {model_cfg.num_tokens}"
        )
    fingerprint = data.fingerprint(train_tokens)
    windows = Windows(train_tokens, cfg.seq_len, cfg.seed, cfg.data)
    heldout = Windows(load_tokens(cfg.heldout, tokenizer), cfg.seq_len, cfg.seed, cfg.heldout) if cfg.heldout else None

    share, rest = divmod(cfg.batch_size, proc.world)
    micro = cfg.micro_batch_size or share
    if rest or share % micro:
        raise PalmEvalError(
            f"batch_size {cfg.batch_size} must split evenly over {proc.world} processes x micro_batch_size {micro}"
        )

    torch.manual_seed(cfg.seed)
    model = PaLM(model_cfg)
    ckpt = latest_checkpoint(out)
    saved: dict = {"step": 0, "elapsed_s": 0.0, "tokens_seen": 0}
    if ckpt is not None:
        saved = load_checkpoint(ckpt, model)
        if saved["config"] != json.dumps(resolved, sort_keys=True):
            raise PalmEvalError(
                f"{out} holds a run with a different config; use another out_dir, or delete {out} to start over"
            )
        if saved["fingerprint"] != fingerprint:
            raise PalmEvalError(f"{out} was trained on different data ({saved['fingerprint']}, now {fingerprint})")
    model.to(proc.device).train()
    optimizer = build_optimizer(model, cfg, fused=proc.device.type == "cuda")
    if ckpt is not None:
        optimizer.load_state_dict(saved["optimizer"])
    wrapped = DistributedDataParallel(LossModel(model)) if proc.world > 1 else LossModel(model)
    use_bf16 = cfg.bf16 if cfg.bf16 is not None else proc.device.type == "cuda"
    autocast = torch.autocast(proc.device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext()

    log = Log(out / "log.jsonl", proc.rank == 0, keep_through=saved["step"])
    if proc.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
        print(f"{model.num_params():,} parameters; {len(train_tokens):,} training tokens ({fingerprint[:19]}); "
              f"{proc.world} process(es) on {proc.device}" + (f"; resuming at step {saved['step']}" if ckpt else ""))

    ignore = -100 if model_cfg.ignore_index is None else model_cfg.ignore_index
    step, elapsed, tokens_seen = saved["step"], saved["elapsed_s"], saved["tokens_seen"]
    heldout_loss = saved.get("heldout_loss")
    started = time.perf_counter() - elapsed
    bar = _progress(cfg.steps, step, proc.rank == 0)
    while step < cfg.steps:
        t0 = time.perf_counter()
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = windows.batch(step, cfg.batch_size)
        scored = (batch[:, 1:] != ignore).sum().item()  # over the global batch: the loss is one mean over it
        mine = batch[proc.rank * share : (proc.rank + 1) * share]
        loss_sum = torch.zeros((), dtype=torch.float64, device=proc.device)
        for i in range(0, share, micro):
            tokens = mine[i : i + micro].to(proc.device)
            sync = i + micro >= share or proc.world == 1
            with (nullcontext() if sync else wrapped.no_sync()), autocast:
                loss = wrapped(tokens)
                count = (tokens[:, 1:] != ignore).sum()
                # DDP averages gradients over processes, hence * world: the sum is the mean over `scored`
                (loss * count * proc.world / max(scored, 1)).backward()
            loss_sum += loss.detach().double() * count
        train_loss = proc.all_sum(loss_sum).item() / max(scored, 1)
        grad_norm = nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or float("inf")).item()
        if not (math.isfinite(train_loss) and math.isfinite(grad_norm)):
            last = latest_checkpoint(out)
            raise PalmEvalError(
                f"training loss {train_loss} / gradient norm {grad_norm} at step {step + 1} is not finite; the last "
                f"good checkpoint is {last or 'none'}: lower lr (now {lr:.3g}) or raise warmup_steps, then run again"
            )
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens_seen += cfg.batch_size * cfg.seq_len
        elapsed = time.perf_counter() - started
        log.write(step=step, loss=train_loss, lr=lr, grad_norm=grad_norm,
                  tokens_per_s=cfg.batch_size * cfg.seq_len / (time.perf_counter() - t0), elapsed_s=elapsed)
        bar.update(1)
        bar.set_postfix(loss=f"{train_loss:.4f}", lr=f"{lr:.2e}", refresh=False)
        if heldout is not None and (step % cfg.eval_every == 0 or step == cfg.steps):
            heldout_loss = mean_loss(model, heldout.evenly_spaced(cfg.eval_windows), micro, proc, autocast)
            log.write(step=step, heldout_loss=heldout_loss, elapsed_s=time.perf_counter() - started)
            bar.write(f"step {step}: train loss {train_loss:.4f}, held-out loss {heldout_loss:.4f}, {elapsed:.0f} s")
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            elapsed = time.perf_counter() - started
            if proc.rank == 0:
                save_checkpoint(out, model, optimizer, {
                    "step": step, "elapsed_s": elapsed, "tokens_seen": tokens_seen, "fingerprint": fingerprint,
                    "config": json.dumps(resolved, sort_keys=True), "heldout_loss": heldout_loss,
                })
            if proc.world > 1:
                dist.barrier()
    bar.close()

    final_train = mean_loss(model, windows.evenly_spaced(cfg.eval_windows), micro, proc, autocast)
    summary = {
        "steps": step,
        "tokens_seen": tokens_seen,
        "final_train_loss": round(final_train, 4),
        "final_heldout_loss": None if heldout_loss is None else round(heldout_loss, 4),
        "wall_time_s": round(elapsed, 1),
        "data": {"source": cfg.data, "fingerprint": fingerprint, "tokens": len(train_tokens), "heldout": cfg.heldout},
    }
    if proc.rank == 0:
        meta = {"train_length": cfg.seq_len, "tokenizer": cfg.tokenizer, **summary, "command": command}
        save_safetensors(model, out / "model.safetensors", meta)
        if cfg.card:
            write_card(Path(cfg.card), model, cfg, summary, command, proc)
        print(json.dumps(summary))
    if proc.world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return summary


class Log:
    """Per-step JSON lines; on resume, lines after the checkpoint's step are dropped (they are redone)."""

    def __init__(self, path: Path, active: bool, keep_through: int):
        self.path, self.active = path, active
        if active and path.is_file():
            kept = [line for line in path.read_text().splitlines() if _step_of(line) <= keep_through]
            atomic_write(path, lambda p: p.write_text("".join(line + "\n" for line in kept)))

    def write(self, **record) -> None:
        if self.active:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


def _step_of(line: str) -> float:
    """A log line's step; a line cut short by a killed process counts as after any checkpoint."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


def _progress(total: int, initial: int, active: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, disable=not active, unit="step", mininterval=1.0, dynamic_ncols=True)


def write_card(path: Path, model: PaLM, cfg: TrainConfig, summary: dict, command: str, proc: Dist) -> None:
    """A registry card (models/<name>.yaml) and its weights beside it, with what reproduces them."""
    weights = path.with_suffix(".safetensors")
    meta = {"train_length": cfg.seq_len, "tokenizer": cfg.tokenizer, "data_fingerprint": summary["data"]["fingerprint"]}
    save_safetensors(model, weights, meta)
    card = {
        "name": path.stem,
        "description": cfg.description,
        "bundled": True,
        "config": model.config.to_dict(),
        "parameters": model.num_params(),
        "train_length": cfg.seq_len,
        "tokenizer": cfg.tokenizer,
        "weights": {"path": weights.name},
        **summary,
        "hardware": f"{proc.world} process(es), {proc.device.type}, {torch.get_num_threads()} threads each",
        "software": f"python {platform.python_version()} (its stdlib is the built-in corpus), "
        f"torch {torch.__version__}",
        "command": command,
    }
    header = "# Written by `palm-eval train`; the numbers below were measured by the run that made the weights.\n"
    atomic_write(path, lambda p: p.write_text(header + yaml.safe_dump(card, sort_keys=False)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="palm-eval train", description="Train a PaLM model from a YAML config.")
    parser.add_argument("--config", required=True, help="training config (YAML), e.g. configs/tiny_xpos.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set steps=100 --set model.dim=64 (repeatable)")
    args = parser.parse_args(argv)
    cfg = TrainConfig.from_yaml(args.config, args.overrides)
    argv = sys.argv[1:] if argv is None else argv
    world = int(os.environ.get("WORLD_SIZE", 1))
    launcher = f"torchrun --nproc_per_node {world} -m palm_eval.cli train" if world > 1 else "palm-eval train"
    train(cfg, command=f"{launcher} {shlex.join(argv)}")
    return 0
