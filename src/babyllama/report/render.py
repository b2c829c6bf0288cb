"""The report's sections as blocks: one run in full, or several side by side.

Input is what collect.py read (plain dicts) and the PNGs plots.py drew; output is the list of
blocks document.py writes as Markdown and HTML. Nothing is read from disk here.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Sequence

from babyllama.report.document import Block, Code, Heading, Image, Para, Section, Table
from babyllama.report.evals import eval_blocks, flatten_scalars, headline, sample_rows
from babyllama.report.format import MISSING, duration, millions, number, percent, when
from babyllama.report.plots import legend_names

# (anchor, heading) of a one-run report, in order; tests check that each is there
SINGLE_SECTIONS = (("overview", "Overview"), ("curves", "Loss and learning rate"),
                   ("throughput", "Throughput and MFU"), ("evaluations", "Evaluations"),
                   ("samples", "Sample generations"), ("configuration", "Configuration"),
                   ("data", "Data and tokenizer"), ("environment", "Environment"), ("time", "Wall time"))
COMPARISON_SECTIONS = (("runs", "Final figures"), ("evaluations", "Evaluations"), ("curves", "Curves"),
                       ("configuration", "Configuration differences"), ("environment", "Environment"))

# what every training record holds besides the objective's own metrics (shown in their own table)
STANDARD_KEYS = {"step", "loss", "lr", "grad_norm", "tokens", "tok_s", "time", "mfu", "val_loss"}


def _heading(anchor: str, sections: Sequence[tuple[str, str]]) -> Heading:
    return Heading(dict(sections)[anchor], 2, anchor=anchor)


def no_evaluations_hint(path: str) -> str:
    return (f"no evaluations yet: run `babyllama eval ppl --ckpt {path} --data ...` (or `eval mc`, `eval gen`; "
            f"results go to {path}/eval/)")


# --- figures both kinds of report use --------------------------------------------------------------

def final_figures(run: dict) -> dict:
    """The numbers a run ends with (None where it has not logged them)."""
    train, val = run["train"], run["val"]
    speeds = [r["tok_s"] for r in train if isinstance(r.get("tok_s"), (int, float))]
    mfus = [r["mfu"] for r in train if isinstance(r.get("mfu"), (int, float))]
    best = min(val, key=lambda r: r["val_loss"]) if val else None
    last = max(train + val, key=lambda r: r.get("step", 0)) if train or val else {}
    return {"steps": last.get("step"), "tokens": last.get("tokens"),
            "train_loss": train[-1]["loss"] if train else None, "val_loss": val[-1]["val_loss"] if val else None,
            "best_val": (best["val_loss"], best.get("step")) if best else None,
            "tok_s": statistics.median(speeds) if speeds else None, "tok_s_last": speeds[-1] if speeds else None,
            "tok_s_max": max(speeds) if speeds else None,
            "mfu": statistics.median(mfus) if mfus else None, "mfu_last": mfus[-1] if mfus else None,
            "train_seconds": run["times"]["train_seconds"], "params": run["params"]["count"]}


def _best_val(figures: dict) -> str:
    if not figures["best_val"]:
        return MISSING
    loss, step = figures["best_val"]
    return f"{number(loss)} (step {step})"


# --- one run ------------------------------------------------------------------------------------------

def single_run_blocks(run: dict, images: dict[str, Path], machine: dict,
                      extra: Sequence[Section] = ()) -> list[Block]:
    figures = final_figures(run)
    blocks: list[Block] = []
    blocks += _overview(run, figures)
    blocks += _curves(run, images)
    blocks += _throughput(figures, images)
    blocks += _evaluations(run)
    blocks += _samples(run)
    for section in extra:
        blocks += section.blocks()
    blocks += _configuration(run)
    blocks += _data_and_tokenizer(run)
    blocks += _environment([run], machine, SINGLE_SECTIONS)
    blocks += _wall_time(run)
    return blocks


def _overview(run: dict, figures: dict) -> list[Block]:
    info, ckpts = run["info"], run["checkpoints"]
    start = info.get("init") or info.get("source_checkpoint")
    rows = [["run", f"`{run['path']}`"], ["stage", run["stage"]],
            ["started from", f"`{start}`" if start else "random weights"],
            ["parameters", f"{millions(figures['params'])} — {run['params']['source']}"],
            ["steps", number(figures["steps"])], ["tokens seen", number(figures["tokens"])],
            ["final train loss", number(figures["train_loss"])],
            ["final validation loss", number(figures["val_loss"])],
            ["best validation loss", _best_val(figures)],
            ["checkpoints", f"{', '.join(ckpts['names'])} (latest {ckpts['latest']})" if ckpts["names"]
             else "none yet"],
            ["evaluations", str(len(run["evals"])) if run["evals"] else "none yet"],
            ["training time", duration(figures["train_seconds"])]]
    return [_heading("overview", SINGLE_SECTIONS), Table(["", ""], rows)]


def _curves(run: dict, images: dict[str, Path]) -> list[Block]:
    blocks: list[Block] = [_heading("curves", SINGLE_SECTIONS)]
    blocks += [Para(note, muted=True) for note in run["notes"]]
    if not run["train"]:
        blocks.append(Para("no training step logged yet (only the validation loss before training)", muted=True))
    blocks += [Image(images[name], alt) for name, alt in (("loss", "loss curve"), ("lr", "learning rate"))
               if name in images]
    other = _other_metrics(run)
    if other:
        blocks += [Para("Other metrics the run logged (last value):"), Table(["metric", "step", "value"], other)]
    return blocks


def _other_metrics(run: dict) -> list[list[object]]:
    last: dict[str, tuple] = {}
    for record in run["train"] + run["val"]:
        for key, value in record.items():
            if key not in STANDARD_KEYS and isinstance(value, (int, float)):
                last[key] = (record.get("step"), value)
    return [[key, step, number(value)] for key, (step, value) in sorted(last.items())]


def _throughput(figures: dict, images: dict[str, Path]) -> list[Block]:
    rows = [["tokens/s", number(figures["tok_s"]), number(figures["tok_s_last"]), number(figures["tok_s_max"])],
            ["MFU", percent(figures["mfu"]), percent(figures["mfu_last"]), MISSING]]
    blocks: list[Block] = [_heading("throughput", SINGLE_SECTIONS),
                           Table(["", "median over logged windows", "last window", "best window"], rows)]
    if figures["mfu"] is None:
        blocks.append(Para("MFU was not logged (the peak FLOP/s of the training device is unknown)", muted=True))
    else:
        blocks.append(Para("MFU: model FLOPs per second over the peak of the device and dtype (a table for GPUs, "
                           "a matmul measured at the start on CPUs)", muted=True))
    if "throughput" in images:
        blocks.append(Image(images["throughput"], "throughput and MFU"))
    return blocks


def _evaluations(run: dict) -> list[Block]:
    blocks: list[Block] = [_heading("evaluations", SINGLE_SECTIONS)]
    if not run["evals"]:
        return blocks + [Para(no_evaluations_hint(run["path"]))]
    rows = [[e["name"], e["kind"], headline(e)] for e in run["evals"]]
    blocks.append(Table(["evaluation", "kind", "headline"], rows))
    for entry in run["evals"]:
        blocks += eval_blocks(entry, run["checkpoints"]["latest"])
    return blocks


def _samples(run: dict) -> list[Block]:
    blocks: list[Block] = [_heading("samples", SINGLE_SECTIONS)]
    shown = [(e["name"], sample_rows(e)) for e in run["evals"] if sample_rows(e)]
    if not shown:
        return blocks + [Para("no sample generations yet: a generation evaluation (`kind: gen`, in "
                              f"{run['path']}/eval/) shows its first outputs here", muted=True)]
    for name, rows in shown:
        blocks += [Heading(name, 3), Table(["prompt", "answer", "reference"], rows)]
    return blocks


def _configuration(run: dict) -> list[Block]:
    blocks: list[Block] = [_heading("configuration", SINGLE_SECTIONS)]
    if not run["config_text"]:
        return blocks + [Para("no run_config.toml in the run", muted=True)]
    return blocks + [Para("The resolved configuration (`run_config.toml`: preset, config file and flags applied):"),
                     Code(run["config_text"], "toml")]


def _data_and_tokenizer(run: dict) -> list[Block]:
    data, tok = run["data"], run["tokenizer"]
    blocks: list[Block] = [_heading("data", SINGLE_SECTIONS), Heading("Dataset", 3),
                           Table(["", ""], [["path", f"`{data['path']}`" if data["path"] else MISSING],
                                            ["fingerprint", data["fingerprint"] or MISSING]])]
    if data["manifest"]:
        blocks += _manifest_blocks(data["manifest"], data["manifest_path"])
    if data["sft"]:
        rows = [[k, number(v)] for k, v in flatten_scalars(data["sft"])]
        blocks += [Para("SFT data (`sft_data.json`):"), Table(["", ""], rows)]
    if data["note"]:
        blocks.append(Para(data["note"], muted=True))
    vocab = (run["config"].get("model") or {}).get("vocab_size")
    config = tok["config"]
    rows = [["fingerprint", tok["fingerprint"] or MISSING], ["kind", config.get("kind", MISSING)],
            ["model vocabulary", number(vocab)],
            ["bos / eos / pad ids", " / ".join(str(config.get(k, MISSING)) for k in ("bos", "eos", "pad"))],
            ["added special tokens", ", ".join(map(str, config.get("appended_specials") or [])) or "none"],
            ["files", ", ".join(tok["files"]) or "none (no tokenizer/ in the run)"]]
    return blocks + [Heading("Tokenizer", 3), Table(["", ""], rows)]


def _manifest_blocks(manifest: dict, path: str) -> list[Block]:
    splits = manifest.get("splits") or {}
    rows = [[name, number(split.get("tokens")), number(split.get("documents")), len(split.get("shards") or [])]
            for name, split in splits.items() if isinstance(split, dict)]
    facts = [["format", manifest.get("format", MISSING)], ["token dtype", manifest.get("dtype", MISSING)],
             ["characters", number(manifest.get("characters"))],
             ["validation fraction", number(manifest.get("val_fraction"))],
             ["tokenizer", (manifest.get("tokenizer") or {}).get("fingerprint", MISSING)]]
    blocks: list[Block] = [Para(f"Manifest `{path}`:"), Table(["", ""], facts)]
    if rows:
        blocks.append(Table(["split", "tokens", "documents", "shards"], rows))
    sources = [s for s in manifest.get("sources") or [] if isinstance(s, dict)]
    if sources:
        blocks.append(Table(["source", "documents", "characters", "skipped", "excluded"],
                            [[f"`{s.get('path')}`", number(s.get("documents")), number(s.get("characters")),
                              number(s.get("skipped")), number(s.get("excluded"))] for s in sources]))
    return blocks


def _environment(runs: list[dict], machine: dict, sections) -> list[Block]:
    blocks: list[Block] = [_heading("environment", sections)]
    for run in runs:
        prefix = f"{run['name']}: " if len(runs) > 1 else ""
        train = run["config"].get("train") or {}
        configured = ", ".join(f"{key} `{json.dumps(train[key])}`" for key in ("device", "dtype", "compile", "parallel")
                               if key in train)
        if run["environment"]:
            rows = [[k, number(v)] for k, v in flatten_scalars(run["environment"])]
            blocks += [Para(f"{prefix}the machine the run trained on (`environment.json`):"), Table(["", ""], rows)]
        else:
            blocks.append(Para(f"{prefix}as configured: {configured or 'defaults'}. The run directory does not "
                               f"record the machine it trained on, nor what `auto` resolved to there.", muted=True))
    rows = [[key, str(value)] for key, value in machine.items()]
    return blocks + [Para("The machine that wrote this report:"), Table(["", ""], rows)]


def _wall_time(run: dict) -> list[Block]:
    times = run["times"]
    sessions = times["sessions"]
    resumed = f" in {sessions} sessions (resumed {sessions - 1} times)" if sessions > 1 else ""
    rows = [["training time", f"{duration(times['train_seconds'])}{resumed} — logged steps, from metrics.jsonl"],
            ["run started", when(times["started"])], ["last checkpoint written", when(times["finished"])],
            ["elapsed", f"{duration(times['elapsed_seconds'])} — includes validation, checkpoints and pauses "
                        f"between sessions"]]
    return [_heading("time", SINGLE_SECTIONS), Table(["", ""], rows)]


# --- several runs -------------------------------------------------------------------------------------

def comparison_blocks(runs: list[dict], images: dict[str, Path], machine: dict,
                      extra: Sequence[Section] = ()) -> list[Block]:
    blocks: list[Block] = []
    blocks += _final_figures_table(runs)
    blocks += _evaluations_table(runs)
    blocks += [_heading("curves", COMPARISON_SECTIONS)]
    renamed = [f"{label} = {run['name']}" for run, label in zip(runs, legend_names(runs)) if label != run["name"]]
    if renamed:  # no font with these names' glyphs here
        blocks.append(Para("In the plots: " + ", ".join(renamed), muted=True))
    blocks += [Image(images[name], alt) for name, alt in
               (("loss", "loss, all runs"), ("lr", "learning rate, all runs"), ("throughput", "throughput, all runs"))
               if name in images]
    for section in extra:
        blocks += section.blocks()
    blocks += _config_differences(runs)
    blocks += _environment(runs, machine, COMPARISON_SECTIONS)
    return blocks


def _final_figures_table(runs: list[dict]) -> list[Block]:
    figures = [final_figures(run) for run in runs]
    rows = [["path", *(f"`{run['path']}`" for run in runs)], ["stage", *(run["stage"] for run in runs)],
            ["parameters", *(millions(f["params"]) for f in figures)],
            ["steps", *(number(f["steps"]) for f in figures)], ["tokens seen", *(number(f["tokens"]) for f in figures)],
            ["final train loss", *(number(f["train_loss"]) for f in figures)],
            ["final validation loss", *(number(f["val_loss"]) for f in figures)],
            ["best validation loss", *(_best_val(f) for f in figures)],
            ["tokens/s (median)", *(number(f["tok_s"]) for f in figures)],
            ["MFU (median)", *(percent(f["mfu"]) for f in figures)],
            ["training time", *(duration(f["train_seconds"]) for f in figures)]]
    return [_heading("runs", COMPARISON_SECTIONS), Table(["", *(run["name"] for run in runs)], rows)]


def _evaluations_table(runs: list[dict]) -> list[Block]:
    blocks: list[Block] = [_heading("evaluations", COMPARISON_SECTIONS)]
    names = sorted({e["name"] for run in runs for e in run["evals"]})
    if not names:
        return blocks + [Para("no evaluations yet in any of the runs: run `babyllama eval ppl --ckpt RUN --data ...` "
                              "on each")]
    rows = []
    for name in names:
        found = [next((e for e in run["evals"] if e["name"] == name), None) for run in runs]
        rows.append([name, *(headline(e) if e else MISSING for e in found)])
    blocks.append(Table(["evaluation", *(run["name"] for run in runs)], rows))
    missing = [run["name"] for run in runs if not run["evals"]]
    if missing:
        blocks.append(Para(f"no evaluations yet in {', '.join(missing)}", muted=True))
    return blocks


def _config_differences(runs: list[dict]) -> list[Block]:
    blocks: list[Block] = [_heading("configuration", COMPARISON_SECTIONS)]
    flat = [dict(flatten_scalars(run["config"])) for run in runs]
    for values, run in zip(flat, runs):
        values["data"] = run["data"]["path"]
        values["data fingerprint"] = run["data"]["fingerprint"]
        values["tokenizer"] = run["tokenizer"]["fingerprint"]
    keys = sorted({k for values in flat for k in values}, key=lambda k: (k.startswith(("model", "train")), k))
    rows = [[key, *(number(v.get(key)) for v in flat)] for key in keys if len({repr(v.get(key)) for v in flat}) > 1]
    if not rows:
        return blocks + [Para("the runs have the same configuration, data and tokenizer")]
    return blocks + [Para("The settings that differ (everything else is the same):"),
                     Table(["", *(run["name"] for run in runs)], rows)]
