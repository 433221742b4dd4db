"""Report figures, drawn on `matplotlib.figure.Figure` objects and saved as PNG and SVG.

No pyplot: creating a `Figure` directly needs no backend switch, so other matplotlib users in the same
process keep theirs, and nothing ever opens a window. Every figure is made and saved inside `style()`,
whose fixed SVG hash salt and stripped metadata make a regenerated report byte-identical when the
numbers are.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib import ticker
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

# Okabe & Ito's colour-blind-safe palette, most distinct colours first, yellow (faint on white) last.
PALETTE = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442"]
MARKERS = ["o", "s", "^", "D", "v", "P", "*", "h"]  # "x" is kept for non-finite points
LINESTYLES = ["-", "--", ":", "-."]  # cycled after the palette, so more than 8 models stay distinguishable
TRAIN_LINE = {"color": "0.35", "linestyle": "--", "linewidth": 1.0}
TRAIN_DASHES = ["--", ":", "-.", (0, (8, 2, 1, 2, 1, 2))]  # one per distinct training length when they differ
NONFINITE = {"marker": "x", "markersize": 8, "markeredgewidth": 2.0, "linestyle": "none"}
ACCURACY_CMAP = "cividis"  # optimised for colour-vision deficiency; used for accuracy heatmaps
MEMORY_KINDS = {"rss": "process RSS", "cuda_max_allocated": "CUDA max allocated"}

RC = {
    "svg.hashsalt": "palm-eval",
    "svg.fonttype": "path",  # text as outlines: the SVG looks the same without our fonts installed
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "legend.fontsize": 8.5,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
}


@contextmanager
def style():
    """Our rc settings for everything made or saved inside, restored afterwards."""
    with matplotlib.rc_context(RC):
        yield


def save(fig: Figure, directory: Path, stem: str) -> None:
    """Write `stem.png` (150 dpi) and `stem.svg` without dates or version strings, so outputs don't churn."""
    png, svg = directory / f"{stem}.png", directory / f"{stem}.svg"
    fig.savefig(png, dpi=150, metadata={"Software": None})
    fig.set_layout_engine("none")  # keep the layout just computed: the SVG is the same picture, at half the cost
    fig.savefig(svg, metadata={"Date": None, "Creator": None})


def styles(labels: list[str]) -> dict[str, dict]:
    """A fixed colour, marker and line style per model, the same in every figure."""
    return {
        label: {
            "color": PALETTE[i % len(PALETTE)],
            "marker": MARKERS[i % len(MARKERS)],
            "linestyle": LINESTYLES[(i // len(PALETTE)) % len(LINESTYLES)],
        }
        for i, label in enumerate(labels)
    }


def length_label(n: float) -> str:
    """Token counts the way papers write them: 256, 512, 1k, 1.5k, 32k, 1M."""
    if n >= 2**20 and n % 2**19 == 0:
        return f"{n / 2**20:g}M"
    if n >= 1024 and n % 512 == 0:
        return f"{n / 1024:g}k"
    return f"{n:g}"


def _log2_axis(ax, lo: float, hi: float, max_ticks: int = 9) -> None:
    """Log2 x scale with power-of-two ticks labelled 256, 512, 1k, ... (every other one when crowded)."""
    e0, e1 = math.floor(math.log2(lo)), math.ceil(math.log2(hi))
    step = math.ceil((e1 - e0 + 1) / max_ticks)
    ax.set_xscale("log", base=2)
    axis = ax.xaxis
    axis.set_major_locator(ticker.FixedLocator([2.0**e for e in range(e0, e1 + 1, step)]))
    axis.set_major_formatter(ticker.FuncFormatter(lambda v, _: length_label(v)))
    axis.set_minor_locator(ticker.NullLocator())


def _value_axis(ax, values: pd.Series, fmt=None) -> bool:
    """Log y scale when the values span more than 10×, with enough labelled ticks to read values off."""
    axis = ax.yaxis
    finite = values[np.isfinite(values) & (values > 0)]
    if len(finite) == 0 or finite.max() / finite.min() <= 10:
        if fmt:
            axis.set_major_formatter(ticker.FuncFormatter(lambda v, _: fmt(v)))
        return False
    ax.set_yscale("log")
    decades = math.log10(finite.max() / finite.min())
    axis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0) if decades <= 3 else (1.0,)))
    axis.set_minor_locator(ticker.LogLocator(base=10, subs="auto"))
    axis.set_major_formatter(ticker.FuncFormatter(lambda v, _: (fmt or _plain)(v)))
    axis.set_minor_formatter(ticker.NullFormatter())
    return True


def _plain(v: float) -> str:
    return f"{v:,.0f}" if v >= 1 else f"{v:g}"


def _fit_y(ax, values: pd.Series, log: bool, top_band: float) -> None:
    """Put the finite values between 5% of the axes height and 1 - top_band.

    A band kept for non-finite marks is shaded and carries no tick labels, so that nobody reads a value off an ‘×’.
    """
    finite = values[np.isfinite(values) & ((values > 0) if log else True)]
    if len(finite) == 0:
        ax.set_ylim(1, 10) if log else ax.set_ylim(0, 1)
        ax.set_yticks([])
        return
    f, inv = (np.log10, lambda v: 10**v) if log else (lambda v: v, lambda v: v)
    lo, hi = f(finite.min()), f(finite.max())
    span = hi - lo or (0.1 * abs(hi) or 1.0)  # a single value still gets a readable scale around it
    if hi == lo:
        lo, hi = lo - span / 2, hi + span / 2
    total = span / (1 - top_band - 0.05)
    bottom = lo - 0.05 * total
    ax.set_ylim(inv(bottom), inv(bottom + total))
    if top_band > 0.05:
        limit = inv(hi + 0.04 * total)
        ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: "" if v > limit else f"{v:,.7g}"))
        ax.axhspan(limit, inv(bottom + total), color="0.94", zorder=1.6, linewidth=0)  # over the grid


def _mark_nonfinite(ax, points: list[tuple[float, str]], style_of: dict[str, dict]) -> float:
    """An ‘×’ in the model's colour at the top edge for each point without a finite value, stacked per length,
    labelled "non-finite". Returns the fraction of the axes height the marks take."""
    stacked: dict[float, int] = {}
    for x, label in points:
        k = stacked.get(x, 0)
        stacked[x] = k + 1
        ax.plot([x], [0.955 - 0.055 * k], transform=ax.get_xaxis_transform(), clip_on=False,
                color=style_of[label]["color"], **NONFINITE)
    for x, k in stacked.items():
        ax.annotate("non-finite", (x, 0.955 - 0.055 * (k - 1)), xycoords=ax.get_xaxis_transform(),
                    xytext=(0, -9), textcoords="offset points", ha="center", va="top", fontsize=7, color="0.25")
    return 0.11 + 0.055 * max(stacked.values()) if stacked else 0.04


def _train_lines(train_length: dict[str, int | None]) -> dict[int, dict]:
    """Line style and legend label per distinct training length, naming the models when they differ."""
    groups: dict[int, list[str]] = {}
    for label, t in train_length.items():
        if t:
            groups.setdefault(t, []).append(label)
    if len(groups) == 1:
        t = next(iter(groups))
        return {t: {**TRAIN_LINE, "label": f"training length ({length_label(t)})"}}
    return {
        t: {**TRAIN_LINE, "linestyle": TRAIN_DASHES[i % len(TRAIN_DASHES)],
            "label": f"training length {length_label(t)}: {', '.join(models)}"}
        for i, (t, models) in enumerate(sorted(groups.items()))
    }


def _draw_train_lines(ax, lines: dict[int, dict], upto: float) -> None:
    for t, kw in lines.items():
        if t <= upto:
            ax.axvline(t, **{k: v for k, v in kw.items() if k != "label"})


def _multiples_axis(ax, train_length: int) -> None:
    """On top, the evaluation length as a multiple of the (shared) training length: 1×, 2×, 4×, ..."""
    top = ax.secondary_xaxis("top", functions=(lambda x: x / train_length, lambda m: m * train_length))
    lo, hi = ax.get_xlim()
    e0, e1 = math.ceil(math.log2(lo / train_length) - 1e-9), math.floor(math.log2(hi / train_length) + 1e-9)
    step = math.ceil((e1 - e0 + 1) / 9)
    top.xaxis.set_major_locator(ticker.FixedLocator([2.0**e for e in range(e0, e1 + 1, step)]))
    top.xaxis.set_major_formatter(ticker.FuncFormatter(lambda m, _: f"{m:g}×"))
    top.xaxis.set_minor_locator(ticker.NullLocator())
    top.set_xlabel(f"multiple of the training length ({length_label(train_length)})", fontsize=8)


def _grid(n: int, ncols: int, width: float, height: float, legend_rows: int = 1) -> tuple[Figure, list]:
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(width * ncols, height * nrows + 0.35 * legend_rows + 0.2), layout="constrained")
    axes = list(fig.subplots(nrows, ncols, squeeze=False).ravel())
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes[:n]


def _legend(fig: Figure, handles: list, ncols: int = 4, title: str | None = None) -> None:
    fig.legend(handles=handles, loc="outside lower center", ncols=min(ncols, len(handles)), frameon=False, title=title)


def _model_handle(label: str, st: dict) -> Line2D:
    return Line2D([], [], label=label, **st)


def perplexity_vs_length(ppl: pd.DataFrame, style_of: dict[str, dict], train_length: dict[str, int | None]) -> Figure:
    """One panel per task family, one line per model; missing perplexities become ‘×’ marks at the top."""
    families = list(dict.fromkeys(ppl["family"]))
    ncols = min(2, len(families))
    fig, axes = _grid(len(families), ncols, 5.4 if ncols > 1 else 6.8, 3.9, legend_rows=2)
    shown: list[str] = []
    any_nonfinite = any_partial = False
    lines = _train_lines(train_length)
    for ax, family in zip(axes, families):
        fam = ppl[ppl["family"] == family]
        labels = [label for label in style_of if label in set(fam["label"])]
        for label in labels:
            rows = fam[fam["label"] == label].sort_values("length")
            st = style_of[label]
            ax.plot(rows["length"], rows["perplexity"], label=label, **st)
            partial = rows[(rows["nonfinite_tokens"] > 0) & rows["perplexity"].notna()]
            ax.scatter(partial["length"], partial["perplexity"], s=150, facecolors="none", edgecolors=st["color"],
                       linewidths=1.2, zorder=3)
            any_partial |= len(partial) > 0
            shown += [label] if label not in shown else []
        lo, hi = fam["length"].min(), fam["length"].max()
        _log2_axis(ax, lo, hi)
        ax.set_xlim(lo / 2**0.35, hi * 2**0.35)
        log = _value_axis(ax, fam["perplexity"].astype(float))
        missing = fam[fam["perplexity"].isna()]
        band = _mark_nonfinite(ax, list(zip(missing["length"], missing["label"])), style_of)
        _fit_y(ax, fam["perplexity"].astype(float), log, band)
        any_nonfinite |= len(missing) > 0
        _draw_train_lines(ax, {t: kw for t, kw in lines.items() if t in {train_length.get(x) for x in labels}}, hi * 2)
        trains = {train_length.get(label) for label in labels}
        if len(trains) == 1 and None not in trains:
            _multiples_axis(ax, trains.pop())
        ax.set_title(family, loc="left", fontweight="bold")
        ax.set_xlabel("evaluation length (tokens, log scale)")
        ax.set_ylabel("perplexity" + (" (log scale)" if log else ""))
    handles = [_model_handle(label, style_of[label]) for label in shown]
    handles += [Line2D([], [], **kw) for kw in lines.values()]
    if any_partial:
        handles.append(Line2D([], [], marker="o", markersize=11, markerfacecolor="none", markeredgecolor="0.2",
                              linestyle="none", label="some token losses non-finite (not averaged in)"))
    if any_nonfinite:
        handles.append(Line2D([], [], color="0.2", label="perplexity not finite",
                              **NONFINITE))
    _legend(fig, handles, ncols=2 if ncols == 1 else 3)
    return fig


def loss_by_position(curves: pd.DataFrame, style_of: dict[str, dict], train_length: dict[str, int | None]) -> Figure:
    """One panel per family × evaluation length, one line per model: mean NLL per log-spaced position bucket.

    `curves` has one row per bucket: family, label, length, start, end, nll (NaN if no finite token), nonfinite.
    A bucket is drawn at the geometric centre of its 1-based positions start+1 .. end.
    """
    families = {f: sorted(curves.loc[curves["family"] == f, "length"].unique()) for f in dict.fromkeys(curves["family"])}
    ncols = min(3, max(len(lengths) for lengths in families.values()))
    panels: list[tuple[str, int] | None] = []  # row-major grid; each family starts on a new row
    for family, lengths in families.items():
        panels += [(family, n) for n in lengths] + [None] * (-len(lengths) % ncols)
    fig, grid = _grid(len(panels), ncols, 4.2, 3.1, legend_rows=2)
    for ax in (ax for ax, panel in zip(grid, panels) if panel is None):
        ax.set_visible(False)
    axes = [ax for ax, panel in zip(grid, panels) if panel is not None]
    panels = [panel for panel in panels if panel is not None]
    labels = [label for label in style_of if label in set(curves["label"])]
    lines = _train_lines({label: train_length.get(label) for label in labels})
    for ax, (family, length) in zip(axes, panels):
        panel = curves[(curves["family"] == family) & (curves["length"] == length)]
        stacked = 0
        for label in labels:
            rows = panel[panel["label"] == label]
            if rows.empty:
                continue
            x = np.sqrt((rows["start"].to_numpy() + 1.0) * rows["end"].to_numpy())
            st = style_of[label]
            ax.plot(x, rows["nll"], color=st["color"], linestyle=st["linestyle"], marker=st["marker"], markersize=3,
                    linewidth=1.4)
            bad = x[(rows["nonfinite"] > 0).to_numpy()]
            if len(bad):
                ax.plot(bad, np.full(len(bad), 0.96 - 0.05 * stacked), transform=ax.get_xaxis_transform(),
                        clip_on=False, color=st["color"], **{**NONFINITE, "markersize": 6})
                stacked += 1
        _draw_train_lines(ax, lines, length)
        _log2_axis(ax, 1, length, max_ticks=7)
        ax.set_xlim(0.8, length * 1.25)
        finite = curves.loc[curves["family"] == family, "nll"].dropna()  # one y scale per family
        pad = 0.06 * ((finite.max() - finite.min()) or 1.0)
        ax.set_ylim(finite.min() - pad, finite.max() + 4 * pad)
        shared = len(lines) == 1 and all(train_length.get(label) for label in labels)
        multiple = f" ({length / next(iter(lines)):g}× training length)" if shared else ""
        ax.set_title(f"{family} at length {length_label(length)}{multiple}", loc="left", fontsize=9.5)
        ax.set_xlabel("target position (log scale)")
        ax.set_ylabel("mean NLL (nats)")
    handles = [_model_handle(label, style_of[label]) for label in labels]
    handles += [Line2D([], [], **kw) for kw in lines.values()]
    if (curves["nonfinite"] > 0).any():
        handles.append(Line2D([], [], color="0.2", label="bucket with non-finite token losses",
                              **{**NONFINITE, "markersize": 6}))
    _legend(fig, handles, ncols=3)
    return fig


def passkey_heatmaps(cells: pd.DataFrame, labels: list[str]) -> Figure:
    """Accuracy per length × passkey depth, greedy and log-likelihood scoring side by side, one row per model.

    Each row shows its own grid of lengths and depths; "n/a" marks a cell of that grid without trials.
    """
    cmap = matplotlib.colormaps[ACCURACY_CMAP]
    most_lengths = cells.groupby("label")["length"].nunique().max()
    most_depths = cells.groupby("label")["depth"].nunique().max()
    width = 2 * (0.62 * most_lengths + 1.3) + 1.2
    fig = Figure(figsize=(width, len(labels) * (0.36 * most_depths + 1.2) + 0.4), layout="constrained")
    axes = fig.subplots(len(labels), 2, squeeze=False)
    mesh = None
    for row, label in enumerate(labels):
        model = cells[cells["label"] == label]
        lengths, depths = sorted(model["length"].unique()), sorted(model["depth"].unique())
        for col, (metric, name) in enumerate([("acc_greedy", "greedy decoding"), ("acc_loglik", "log-likelihood")]):
            ax = axes[row, col]
            grid = model.pivot_table(index="depth", columns="length", values=metric, aggfunc="first", dropna=False)
            grid = grid.reindex(index=depths, columns=lengths).to_numpy(dtype=float)
            mesh = ax.pcolormesh(np.ma.masked_invalid(grid), cmap=cmap, vmin=0, vmax=1, edgecolors="white",
                                 linewidth=1.5)
            ax.set_facecolor("0.9")
            for (i, j), v in np.ndenumerate(grid):
                dark = not math.isnan(v) and sum(to_rgb(cmap(v))) < 1.6
                ax.text(j + 0.5, i + 0.5, "n/a" if math.isnan(v) else f"{v:.2f}", ha="center", va="center",
                        fontsize=8, color="white" if dark else "black")
            ax.invert_yaxis()
            ax.grid(False)
            ax.set_xticks(np.arange(len(lengths)) + 0.5, [length_label(n) for n in lengths])
            ax.set_yticks(np.arange(len(depths)) + 0.5, [f"{d:.0%}" for d in depths])
            ax.tick_params(length=0)
            ax.set_title(f"{label} · {name}", loc="left", fontsize=9.5)
            ax.set_xlabel("context length (tokens)")
            ax.set_ylabel("passkey depth" if col == 0 else "")
    fig.colorbar(mesh, ax=axes, shrink=min(1.0, 0.9 / len(labels) + 0.3), label="accuracy")
    return fig


def throughput_memory(timing: pd.DataFrame, style_of: dict[str, dict]) -> Figure:
    """Tokens per second and peak memory against evaluation length, one line per model (and memory kind)."""
    fig, (speed, memory) = _grid(2, 2, 4.8, 3.4)
    kinds = list(dict.fromkeys(timing["memory_kind"].fillna("unknown")))
    peak = timing["peak_memory_bytes"].astype(float)
    unit, scale = ("GiB", 2.0**30) if peak.max() >= 2**30 else ("MiB", 2.0**20)
    labels = [label for label in style_of if label in set(timing["label"])]
    for label in labels:
        rows = timing[timing["label"] == label].sort_values("length")
        speed.plot(rows["length"], rows["tokens_per_s"], **style_of[label])
        memory.plot(rows["length"], rows["peak_memory_bytes"] / scale, **style_of[label])
    for ax in (speed, memory):
        _log2_axis(ax, timing["length"].min(), timing["length"].max())
        ax.set_xlim(timing["length"].min() / 2**0.35, timing["length"].max() * 2**0.35)
        ax.set_xlabel("evaluation length (tokens, log scale)")
    _value_axis(speed, timing["tokens_per_s"].astype(float), fmt=_plain)
    _value_axis(memory, peak / scale, fmt=lambda v: f"{v:g}")
    speed.set_ylabel("throughput (tokens/s)")
    kind = " / ".join(MEMORY_KINDS.get(k, k) for k in kinds)
    memory.set_ylabel(f"peak memory ({unit}, {kind})")
    speed.set_title("throughput", loc="left", fontweight="bold")
    memory.set_title("peak memory", loc="left", fontweight="bold")
    _legend(fig, [_model_handle(label, style_of[label]) for label in labels], ncols=3)
    return fig
