"""Where a report goes, and writing it without ever replacing a file the report did not write.

    one run:       RUN/report.md, RUN/report.html, RUN/report/*.png        (or --out DIR)
    several runs:  DIR/report.md, DIR/report.html, DIR/report/*.png
                   DIR = --out, default the directory holding the first run

Every file written carries MARKER (a comment in the Markdown, a meta tag in the HTML, a PNG text
chunk), and only a missing file or one carrying it is replaced: a report.md of the user's stops
the report before anything is written. PNGs of an earlier report that this one no longer draws are
removed (they carry the marker too); nothing else in DIR is touched.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from babyllama.config import ConfigError
from babyllama.outputs import OutputError, write_text_atomic
from babyllama.report.collect import SAMPLE_LINES, collect_run, machine_environment
from babyllama.report.document import MARKER, Para, Section, to_html, to_markdown
from babyllama.report.format import when
from babyllama.report.plots import PLOTS, draw_curves
from babyllama.report.render import comparison_blocks, single_run_blocks

MARKDOWN, HTML, IMAGES = "report.md", "report.html", "report"


@dataclass
class ReportConfig:
    runs: list[str]  # run directories: one gives its report, several a comparison
    out: str | None = None  # directory for report.md/.html and report/; None: see the module docstring
    title: str | None = None  # None: "babyllama report: RUN" / "babyllama comparison: A vs B"
    samples: int = SAMPLE_LINES  # generations shown per generation evaluation
    extra_sections: Sequence[Section] = field(default_factory=list)  # added by Python callers (the demo)

    def __post_init__(self) -> None:
        self.runs = _as_list(self.runs)
        if not self.runs:
            raise ConfigError("give at least one run directory")
        if self.samples < 0:
            raise ConfigError(f"--samples must be 0 or more, got {self.samples}")


def write_report(config: ReportConfig | Sequence[str | Path] | str | Path, **options) -> dict:
    """Write the report of one run, or the comparison of several; returns {"markdown", "html",
    "images"} (paths). `write_report(["runs/a", "runs/b"], out=..., extra_sections=[...])` works
    as well as `write_report(ReportConfig(...))`. ConfigError for a directory that is not a run,
    OutputError where a report would replace a file it did not write."""
    if isinstance(config, ReportConfig):
        cfg = dataclasses.replace(config, **options) if options else config
    else:
        cfg = ReportConfig(runs=config, **options)
    runs = [collect_run(path, cfg.samples) for path in cfg.runs]
    _unique_names(runs)
    out = Path(cfg.out) if cfg.out else default_out(cfg.runs)
    targets = (out / MARKDOWN, out / HTML, out / IMAGES)
    check_replaceable(targets)
    out.mkdir(parents=True, exist_ok=True)
    images = draw_curves(runs, out / IMAGES)
    _remove_stale_images(out / IMAGES, keep=set(images.values()))
    title, blocks = _title_and_blocks(cfg, runs, images)
    subtitle = f"written by {MARKER} on {when(time.time())} from " + ", ".join(f"`{run['path']}`" for run in runs)
    write_text_atomic(out / MARKDOWN, to_markdown(title, [Para(subtitle, muted=True), *blocks], base=out))
    write_text_atomic(out / HTML, to_html(title, blocks, subtitle))
    return {"markdown": str(out / MARKDOWN), "html": str(out / HTML), "images": [str(p) for p in images.values()]}


def _title_and_blocks(cfg: ReportConfig, runs: list[dict], images: dict[str, Path]) -> tuple[str, list]:
    machine = machine_environment()
    if len(runs) == 1:
        title = cfg.title or f"babyllama report: {runs[0]['name']}"
        return title, single_run_blocks(runs[0], images, machine, cfg.extra_sections)
    title = cfg.title or "babyllama comparison: " + " vs ".join(run["name"] for run in runs)
    return title, comparison_blocks(runs, images, machine, cfg.extra_sections)


def _as_list(runs) -> list[str]:
    return [str(runs)] if isinstance(runs, (str, Path)) else [str(r) for r in runs]


def default_out(runs: Sequence[str]) -> Path:
    """A run's own directory; for a comparison, the directory that holds the first run."""
    first = Path(runs[0])
    return first if len(runs) == 1 else first.resolve().parent


def _unique_names(runs: list[dict]) -> None:
    """Two runs named alike (a/run, b/run) are told apart by their parent directories."""
    names = [run["name"] for run in runs]
    for run in runs:
        if names.count(run["name"]) > 1:
            path = Path(run["path"]).resolve()
            run["name"] = f"{path.parent.name}/{path.name}"


# --- ownership ----------------------------------------------------------------------------------------

def written_by_report(path: Path) -> bool:
    """True for a file an earlier report wrote: its marker sits in the first few kilobytes."""
    try:
        with open(path, "rb") as f:
            return MARKER.encode() in f.read(4096)
    except OSError:
        return False


def check_replaceable(targets: Sequence[Path]) -> None:
    """Refuse, before writing anything, to replace what the report did not write."""
    markdown, html, images = targets
    if markdown.parent.exists() and not markdown.parent.is_dir():
        raise OutputError(f"--out {markdown.parent} is a file, not a directory")
    for path in (markdown, html):
        if path.is_symlink() or (path.exists() and not (path.is_file() and written_by_report(path))):
            raise OutputError(f"{path} exists and was not written by babyllama report; move it away or "
                              f"choose another --out (nothing was written)")
    if images.exists() and not images.is_dir():
        raise OutputError(f"{images} is a file, not the report's image directory; move it away or choose "
                          f"another --out (nothing was written)")
    for name in PLOTS:
        path = images / f"{name}.png"
        if path.is_symlink() or (path.exists() and not written_by_report(path)):
            raise OutputError(f"{path} exists and was not written by babyllama report; move it away or "
                              f"choose another --out (nothing was written)")


def _remove_stale_images(directory: Path, keep: set[Path]) -> None:
    for path in directory.glob("*.png"):
        if path not in keep and not path.is_symlink() and written_by_report(path):
            os.remove(path)
