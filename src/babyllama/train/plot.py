"""Loss curve of a run, from its metrics.jsonl, as a PNG."""

from __future__ import annotations

import json
from pathlib import Path


def read_metrics(path: str | Path) -> list[dict]:
    """The records in step order; a step logged twice (a log from before the resume fix) counts
    once, its last record; a line a kill cut short is ignored."""
    latest: dict[tuple, dict] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            latest[(record.get("step", 0), "val_loss" in record)] = record
    return [latest[key] for key in sorted(latest)]


def plot_loss(metrics_file: str | Path, png: str | Path, title: str = "babyllama") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_file)
    train = [(r["tokens"], r["loss"]) for r in records if "loss" in r]
    val = [(r["tokens"], r["val_loss"]) for r in records if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    if train:
        ax.plot([t / 1e6 for t, _ in train], [v for _, v in train], label="train loss", alpha=0.6, lw=1)
    if val:
        ax.plot([t / 1e6 for t, _ in val], [v for _, v in val], "o-", label="validation loss", lw=2, ms=3)
    ax.set_xlabel("tokens seen (millions)")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    png = Path(png)
    fig.savefig(png)
    plt.close(fig)
    return png
