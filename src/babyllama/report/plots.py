"""The report's curves as PNG files: loss, learning rate, throughput and MFU, one run or several overlaid.

Figures are drawn on matplotlib's Agg canvas through `Figure` (not pyplot), so drawing a report
changes no global backend or state of a caller that plots too (the demo). Axis labels and titles
are ASCII; run names in legends may be Chinese, so a CJK font installed here is put behind the
default one as a fallback. Where there is none, such runs are labelled "run N" (legend_names; the
report's captions say which is which) rather than drawn as boxes.
Every PNG carries MARKER in its metadata: a later report may replace it, and nothing else.
"""

from __future__ import annotations

import os
import re
from functools import lru_cache
from pathlib import Path

from babyllama.report.document import MARKER

PLOTS = ("loss", "lr", "throughput")  # the PNGs a report may draw, as report/NAME.png
CJK_FONTS = ("Noto Sans CJK SC", "Noto Sans CJK JP", "Noto Sans SC", "Source Han Sans SC", "WenQuanYi Micro Hei",
             "WenQuanYi Zen Hei", "PingFang SC", "Microsoft YaHei", "SimHei", "Droid Sans Fallback")
# font files to register when matplotlib's font cache predates their installation
CJK_FILES = re.compile(r"(sans.?cjk|wqy|wenquanyi|droidsansfallback|sourcehansans|notosanssc|msyh|simhei|pingfang)",
                       re.IGNORECASE)


def draw_curves(runs: list[dict], directory: Path) -> dict[str, Path]:
    """loss.png, lr.png and throughput.png in `directory`, each only when the runs logged what it
    shows; returns {"loss": path, ...}."""
    directory.mkdir(parents=True, exist_ok=True)
    return {name: save_png(figure, directory / f"{name}.png") for name, figure in curve_figures(runs).items()}


def curve_figures(runs: list[dict]) -> dict:
    """{"loss": Figure, ...} for what the runs logged (one run, or several overlaid)."""
    from matplotlib import rc_context

    figures = {}
    with rc_context(_font_settings()):  # texts keep the fonts they were made with, when saved too
        for name, draw in zip(PLOTS, (_loss_figure, _lr_figure, _throughput_figure)):
            figure = draw(runs)
            if figure is not None:
                figures[name] = figure
    return figures


@lru_cache(maxsize=1)
def cjk_font() -> str | None:
    """The name of a font with Chinese glyphs matplotlib can use, or None. Its font list is cached
    on first use, so fonts installed since (`apt-get install fonts-noto-cjk`) are looked up too."""
    from matplotlib import font_manager

    installed = {f.name for f in font_manager.fontManager.ttflist}
    known = next((name for name in CJK_FONTS if name in installed), None)
    if known:
        return known
    for path in sorted(font_manager.findSystemFonts(), key=lambda p: ("bold" in p.lower(), p)):  # regular first
        if CJK_FILES.search(Path(path).name):
            try:
                font_manager.fontManager.addfont(path)
                return font_manager.FontProperties(fname=path).get_name()
            except (OSError, RuntimeError, ValueError):
                continue
    return None


def legend_names(runs: list[dict]) -> list[str]:
    """The runs' names as legends show them: "run N" for a name this machine has no glyphs for."""
    if cjk_font():
        return [run["name"] for run in runs]
    return [run["name"] if run["name"].isascii() else f"run {i + 1}" for i, run in enumerate(runs)]


def _font_settings() -> dict:
    fallback = [cjk_font()] if cjk_font() else []
    return {"font.family": ["DejaVu Sans", *fallback]}  # a list: matplotlib falls back glyph by glyph only here


def save_png(figure, path: Path) -> Path:
    """Through a temporary file and a rename, as every output here: never half a PNG."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    figure.savefig(tmp, format="png", metadata={"Software": MARKER})
    os.replace(tmp, path)
    return path


def _new_figure(rows: int = 1, height: float = 4.0):
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, height * rows), dpi=100)
    axes = figure.subplots(rows, 1, squeeze=False)[:, 0]
    return figure, list(axes)


def _finish(figure, axes) -> None:
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    figure.tight_layout()


def _label(name: str, what: str, several: bool) -> str:
    return f"{name} {what}" if several else what


def _marker(points: list) -> str | None:
    """Dots on a series too short to draw a line (a run that logged once): otherwise it is invisible."""
    return "o" if len(points) < 3 else None


def _token_scale(runs: list[dict]) -> tuple[float, str]:
    """Tokens in thousands for tiny runs, millions otherwise, so the axis reads in plain numbers."""
    most = max((r["tokens"] for run in runs for r in run["train"] + run["val"] if "tokens" in r), default=0)
    return (1e6, "millions") if most >= 1e6 else (1e3, "thousands")


def _loss_figure(runs: list[dict]):
    if not any(run["train"] or run["val"] for run in runs):
        return None
    figure, (ax,) = _new_figure()
    scale, unit = _token_scale(runs)
    several = len(runs) > 1
    for i, (run, name) in enumerate(zip(runs, legend_names(runs))):
        color = f"C{i}"
        train = [(r["tokens"] / scale, r["loss"]) for r in run["train"] if "tokens" in r]
        val = [(r["tokens"] / scale, r["val_loss"]) for r in run["val"] if "tokens" in r]
        if train:
            ax.plot(*zip(*train), color=color, alpha=0.55, lw=1, marker=_marker(train), ms=3,
                    label=_label(name, "train loss", several))
        if val:
            ax.plot(*zip(*val), "o-", color=color, lw=2, ms=3, label=_label(name, "validation loss", several))
    ax.set_xlabel(f"tokens seen ({unit})")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title("loss")
    _finish(figure, [ax])
    return figure


def _lr_figure(runs: list[dict]):
    if not any("lr" in r for run in runs for r in run["train"]):
        return None
    figure, (ax,) = _new_figure(height=3.2)
    several = len(runs) > 1
    for i, (run, name) in enumerate(zip(runs, legend_names(runs))):
        points = [(r["step"], r["lr"]) for r in run["train"] if "lr" in r]
        if points:
            ax.plot(*zip(*points), color=f"C{i}", lw=1.5, marker=_marker(points), ms=3,
                    label=_label(name, "learning rate", several))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("learning rate")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    ax.set_title("learning rate")
    _finish(figure, [ax])
    return figure


def _throughput_figure(runs: list[dict]):
    has_mfu = any("mfu" in r for run in runs for r in run["train"])
    if not any("tok_s" in r for run in runs for r in run["train"]):
        return None
    figure, axes = _new_figure(rows=2 if has_mfu else 1, height=3.0)
    several = len(runs) > 1
    for i, (run, name) in enumerate(zip(runs, legend_names(runs))):
        speed = [(r["step"], r["tok_s"]) for r in run["train"] if "tok_s" in r]
        if speed:
            axes[0].plot(*zip(*speed), "o-", color=f"C{i}", lw=1.2, ms=2.5, label=_label(name, "tokens/s", several))
        mfu = [(r["step"], 100 * r["mfu"]) for r in run["train"] if "mfu" in r]
        if has_mfu and mfu:
            axes[1].plot(*zip(*mfu), "o-", color=f"C{i}", lw=1.2, ms=2.5, label=_label(name, "MFU", several))
    axes[0].set_ylabel("tokens/s")
    axes[0].set_title("throughput")
    if has_mfu:
        axes[1].set_ylabel("MFU (% of peak FLOP/s)")
    axes[-1].set_xlabel("optimizer step")
    _finish(figure, axes)
    return figure
