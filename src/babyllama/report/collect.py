"""Everything a report shows about a run, read from its directory into a plain dict.

Only files are read (run.json, run_config.toml, metrics.jsonl, checkpoints/*/config.json and the
safetensors header, tokenizer/, eval/*.json, the dataset manifest run.json names): no model is
loaded and torch is not imported, so a report of a run being trained elsewhere costs nothing.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import platform
import struct
import sys
from pathlib import Path

from babyllama.config import ConfigError
from babyllama.machine import cpu_model, gpus

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

METRICS = "metrics.jsonl"
SIGNATURE = ("run.json", "run_config.toml")  # what makes a directory a babyllama run (outputs.RUN)
RUN_ENVIRONMENT = "environment.json"  # shown as the run's own environment when a stage writes one
SAMPLE_LINES = 3  # generations shown per generation evaluation


def collect_run(path: str | Path, samples: int = SAMPLE_LINES) -> dict:
    """A run directory as a plain dict (see the keys below). ConfigError, naming the path, when
    `path` is not a run or its metrics.jsonl is missing or unreadable."""
    run = Path(path)
    _check_is_run(run)
    metrics = read_metrics(run / METRICS)
    info = _read_json(run / "run.json") or {}
    config = _read_config(run)
    checkpoints = _checkpoints(run)
    return {
        "path": str(run),
        "name": run.resolve().name,
        "stage": info.get("stage", "?"),
        "info": info,
        "config": config["values"],
        "config_text": config["text"],
        **metrics,
        "checkpoints": checkpoints,
        "params": _parameter_count(checkpoints, config["values"]),
        "data": _data_manifest(run, info),
        "tokenizer": _tokenizer(run, info),
        "evals": read_evals(run / "eval", samples),
        "environment": _read_json(run / RUN_ENVIRONMENT),
        "times": _times(run, metrics["train"], checkpoints),
    }


def _check_is_run(run: Path) -> None:
    if not run.exists():
        raise ConfigError(f"{run}: no such run directory")
    if not run.is_dir():
        raise ConfigError(f"{run} is a file, not a run directory")
    if not any((run / name).is_file() for name in SIGNATURE):
        raise ConfigError(f"{run} is not a babyllama run directory (no run.json or run_config.toml): "
                          f"give the --out of `babyllama pretrain` or `babyllama sft`")
    if not (run / METRICS).is_file():
        raise ConfigError(f"{run / METRICS} is missing: the run has not logged a step yet, so there is "
                          f"nothing to report")


def _read_json(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _read_config(run: Path) -> dict:
    path = run / "run_config.toml"
    try:
        text = path.read_text(encoding="utf-8")
        return {"text": text, "values": tomllib.loads(text)}
    except FileNotFoundError:
        return {"text": "", "values": {}}
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"{path}: unreadable ({e})") from None


# --- metrics ----------------------------------------------------------------------------------------

def read_metrics(path: Path) -> dict:
    """{"train": [...], "val": [...], "notes": [...]} in step order. As training reads it: a step
    logged twice counts once (its last record). A last line without its newline is what a kill
    leaves and is skipped with a note; an unreadable line before it means the file was damaged."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: unreadable ({e})") from None
    lines, notes, latest = text.split("\n"), [], {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        record = _parse_record(line)
        if record is None:
            if number == len(lines):  # no newline after it: cut short while being written
                notes.append(f"the last line of {path.name} was cut short (the run was stopped while "
                             f"writing it) and is left out")
                continue
            raise ConfigError(f"{path}: line {number} is not a metrics record ({line[:60]!r}); the file is "
                              f"damaged")
        latest[(record.get("step", 0), "val_loss" in record)] = record
    records = [latest[key] for key in sorted(latest)]
    if not records:
        raise ConfigError(f"{path} holds no records yet: the run has not logged a step, so there is nothing "
                          f"to report")
    return {"train": [r for r in records if "loss" in r], "val": [r for r in records if "val_loss" in r],
            "notes": notes}


def _parse_record(line: str) -> dict | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


# --- checkpoints and parameters ---------------------------------------------------------------------

def _checkpoints(run: Path) -> dict:
    """{"names": [...], "latest": name or None, "meta": the latest's config.json}."""
    root = run / "checkpoints"
    names = sorted(p.name for p in root.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp")) \
        if root.is_dir() else []
    try:
        latest = (root / "latest").read_text(encoding="utf-8").strip()
    except OSError:
        latest = ""
    if latest not in names:
        latest = names[-1] if names else ""
    meta = _read_json(root / latest / "config.json") if latest else None
    return {"names": names, "latest": latest or None, "meta": meta or {},
            "path": str(root / latest) if latest else None}


def millions_text(n: int) -> str:
    return f"{n / 1e6:.2f}M"


def safetensors_numel(path: Path, skip: tuple[str, ...] = ()) -> int | None:
    """Parameters stored in a safetensors file, from its JSON header (no tensor is read); `skip`:
    tensor names not to count (a copy of a tied weight)."""
    try:
        with open(path, "rb") as f:
            size = struct.unpack("<Q", f.read(8))[0]
            if size > 100_000_000:
                return None
            header = json.loads(f.read(size))
    except (OSError, ValueError, struct.error):
        return None
    return sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__" and k not in skip)


def _parameter_count(checkpoints: dict, config: dict) -> dict:
    """From the latest checkpoint's weights; from the model config when there is no checkpoint yet."""
    adapter_file = Path(checkpoints["path"] or ".") / "adapter_model.safetensors"
    if checkpoints["path"] and adapter_file.is_file():  # a LoRA/DoRA run: the adapter over a frozen base
        trained = safetensors_numel(adapter_file, skip=("base_model.model.lm_head.weight",))
        total = _parameter_count({"path": None}, config)["count"]
        share = f" ({100 * trained / total:.2f}% of {millions_text(total)})" if trained and total else ""
        return {"count": total, "trained": trained, "adapter_bytes": adapter_file.stat().st_size,
                "source": f"the model; an adapter of {trained:,} parameters{share} trains, "
                          f"stored in {adapter_file.stat().st_size / 1e6:.2f} MB over "
                          f"{checkpoints['meta'].get('base', 'its base')}"}
    if checkpoints["path"]:
        stored = safetensors_numel(Path(checkpoints["path"]) / "model.safetensors")
        if stored is not None:
            adapter = bool(checkpoints["meta"].get("base"))
            return {"count": stored, "source": "the weights an adapter checkpoint stores" if adapter
                    else f"the weights of {checkpoints['latest']}"}
    model = config.get("model")
    if isinstance(model, dict):
        from babyllama.config import ModelConfig

        try:
            return {"count": ModelConfig(**model).num_params(), "source": "computed from the model config"}
        except (TypeError, ConfigError):
            pass
    return {"count": None, "source": "unknown (no checkpoint and no model config)"}


# --- data, tokenizer ----------------------------------------------------------------------------------

def _data_manifest(run: Path, info: dict) -> dict:
    """The dataset run.json names, as it was: its manifest is shown only when its fingerprint is the
    run's (a path may since point at other data, or be relative to another working directory)."""
    data = info.get("data") if isinstance(info.get("data"), dict) else {}
    out = {"path": data.get("path"), "fingerprint": data.get("fingerprint"), "manifest": None,
           "sft": _read_json(run / "sft_data.json"), "note": ""}
    if not data.get("path"):
        out["note"] = "run.json names no dataset"
        return out
    for candidate in _candidates(Path(data["path"]), run):
        manifest = _read_json(candidate / "manifest.json") if candidate.is_dir() else None
        if manifest and manifest.get("fingerprint") == data.get("fingerprint"):
            out["manifest"], out["manifest_path"] = manifest, str(candidate / "manifest.json")
            return out
    if not out["sft"]:
        out["note"] = (f"the dataset's manifest was not found at {data['path']} (moved, or relative to another "
                       f"working directory), or it no longer has the run's fingerprint")
    return out


def _candidates(path: Path, run: Path) -> list[Path]:
    return [path] if path.is_absolute() else [path, run.parent / path, run.parent.parent / path]


def _tokenizer(run: Path, info: dict) -> dict:
    directory = run / "tokenizer"
    config = _read_json(directory / "tokenizer_config.json") or {}
    files = sorted(p.name for p in directory.iterdir()) if directory.is_dir() else []
    return {"fingerprint": config.get("fingerprint") or info.get("tokenizer"), "config": config, "files": files}


# --- evaluations --------------------------------------------------------------------------------------

def read_evals(eval_dir: Path, samples: int = SAMPLE_LINES) -> list[dict]:
    """Every RUN/eval/*.json, by name: {"name", "file", "kind", "result" | "error", "samples"}.
    A file that cannot be read becomes an entry saying why: one bad file never stops a report."""
    evals = []
    for path in sorted(eval_dir.glob("*.json")) if eval_dir.is_dir() else []:
        entry = {"name": path.stem, "file": str(path), "kind": "unreadable", "samples": []}
        try:
            result = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as e:
            entry["error"] = f"could not read {path.name}: {e}"
            evals.append(entry)
            continue
        if not isinstance(result, dict):
            entry["error"] = f"{path.name} holds a JSON {type(result).__name__}, not an object"
        else:
            entry["kind"], entry["result"] = str(result.get("kind") or "unknown"), result
            entry["samples"] = _generation_samples(path, result, samples)
        evals.append(entry)
    return evals


def _generation_samples(eval_file: Path, result: dict, limit: int) -> list[dict]:
    """The first lines of a generation evaluation's outputs file (beside its JSON, or absolute)."""
    name = result.get("outputs")
    if not isinstance(name, str) or not name:
        return []
    path = Path(name) if Path(name).is_absolute() else eval_file.parent / name
    rows = []
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                record = _parse_record(line)
                if record is not None:
                    rows.append(record)
                if len(rows) >= limit:
                    break
    except (OSError, UnicodeDecodeError):
        return []
    return rows


# --- time -------------------------------------------------------------------------------------------

def _times(run: Path, train: list[dict], checkpoints: dict) -> dict:
    """Training time from metrics.jsonl: each resume restarts its `time` clock, so a drop in it
    starts a new segment and the segments' last values add up. Elapsed: run.json to the latest
    checkpoint, by file times (includes validation, checkpointing and any time between resumes)."""
    segments, last = [], None
    for record in train:
        t = record.get("time")
        if not isinstance(t, (int, float)):
            continue
        if last is None or t < last:
            segments.append(0.0)
        segments[-1], last = t, t
    started = _mtime(run / "run.json") or _mtime(run / "run_config.toml")
    finished = _mtime(Path(checkpoints["path"]) / "config.json") if checkpoints["path"] else None
    finished = finished or _mtime(run / METRICS)
    return {"train_seconds": sum(segments) if segments else None, "sessions": len(segments),
            "started": started, "finished": finished,
            "elapsed_seconds": finished - started if started and finished and finished >= started else None}


def _mtime(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except OSError:
        return None


# --- the machine writing the report -------------------------------------------------------------------

VERSIONED = ("torch", "numpy", "sentencepiece", "tokenizers", "safetensors", "matplotlib")


def machine_environment() -> dict:
    """Versions, CPU, GPU and threads of this machine (torch is not imported to find them)."""
    import babyllama

    env = {"python": platform.python_version(), "babyllama": babyllama.__version__}
    for name in VERSIONED:
        try:
            env[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            env[name] = "not installed"
    env["os"] = platform.platform()
    env["cpu"] = cpu_model()
    env["cpu cores"] = os.cpu_count()
    env["threads"] = _threads()
    env["gpu"] = gpus()
    return env


def _threads() -> str:
    if "torch" in sys.modules:  # already loaded by the caller (the demo): ask it
        return f"{sys.modules['torch'].get_num_threads()} (torch)"
    omp = os.environ.get("OMP_NUM_THREADS")
    return f"{omp} (OMP_NUM_THREADS)" if omp else "torch's default (one per physical core)"
