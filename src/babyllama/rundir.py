"""The run directory of a training stage: claimed, locked, and resumed only on what it was trained on.

    OUT/run.json           stage, data and tokenizer fingerprints: what a resume must match
    OUT/run_config.toml    the resolved configuration
    OUT/tokenizer/         the tokenizer the run trains with
    OUT/metrics.jsonl      one record per logged step (continued without duplicates after a resume)
    OUT/checkpoints/       see checkpoint.py
    OUT/.lock              held while a process trains into OUT

Rules, the same for every stage:
- a fresh start needs an empty or new `OUT`, or one a failed start left without checkpoints (its
  leftovers are replaced); a run with checkpoints needs `--resume` (continue) or `--overwrite`
  (start over: babyllama's own files are removed, nothing else);
- `--resume` needs a checkpoint, and refuses data or a tokenizer other than the run's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from babyllama.outputs import (RUN, OutputError, OutputLock, check_inputs_outside, foreign_entries, remove_owned,
                               write_text_atomic)
from babyllama.checkpoint import CheckpointError, list_checkpoints
from babyllama.config import ConfigError

RUN_INFO = "run.json"
METRICS = "metrics.jsonl"


@dataclass
class RunDir:
    path: Path
    lock: OutputLock | None  # held by the process that writes (rank 0)
    created: bool = False  # the directory did not exist before this run

    def close(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None
            if self.created and not any(self.path.iterdir()):
                self.path.rmdir()  # a start that failed before writing anything leaves nothing behind


def open_run_dir(out: str | Path, resume: bool, overwrite: bool = False, inputs: Iterable = (),
                 writer: bool = True) -> RunDir:
    """Claim and lock `out` for a run (see the module docstring). Only the writer (rank 0 under a
    launcher) checks and locks; the others just use the directory."""
    out = Path(out)
    if not writer:
        return RunDir(out, None)
    if resume and overwrite:
        raise OutputError("--resume continues a run and --overwrite starts it over: pass one of them")
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} is a file, not a directory")
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    run = RunDir(out, OutputLock(out / ".lock", f"run directory {out}").acquire(), created)
    try:
        _claim(out, resume, overwrite, list(inputs))
    except BaseException:
        run.close()
        raise
    if run.lock.stale:
        print(f"note: {out} was left locked by pid {run.lock.stale.get('pid')}, which has ended; continuing")
    return run


def _claim(out: Path, resume: bool, overwrite: bool, inputs: list) -> None:
    foreign = foreign_entries(out, RUN)  # babyllama's own run (run.json or run_config.toml), or nothing
    if foreign:
        shown = ", ".join(foreign[:4]) + (f" and {len(foreign) - 4} more" if len(foreign) > 4 else "")
        raise OutputError(f"--out {out} is not empty and is not a babyllama run directory (it holds {shown}); "
                          f"choose another --out (nothing was written)")
    steps = list_checkpoints(out)
    if resume:
        if not steps:
            raise CheckpointError(f"{out}: nothing to resume (no checkpoint yet); start without --resume")
        return
    if steps and not overwrite:
        raise OutputError(f"{out} already holds a run (checkpoints up to {steps[-1].name}); pass --resume to "
                          f"continue it, --overwrite to start it over, or choose another --out")
    check_inputs_outside(out, inputs)
    remove_owned(out, RUN, keep={".lock"})  # --overwrite, or what a start that never checkpointed left


def write_run_info(out: Path, stage: str, data: dict, tokenizer: str, **extra) -> None:
    info = {"stage": stage, "data": data, "tokenizer": tokenizer, **extra}
    write_text_atomic(out / RUN_INFO, json.dumps(info, indent=2, ensure_ascii=False) + "\n")


def tokenizer_dir(ckpt: Path) -> Path:
    """The tokenizer/ directory of a checkpoint, or of the run it belongs to."""
    for candidate in (ckpt / "tokenizer", ckpt.parent.parent / "tokenizer"):
        if candidate.is_dir():
            return candidate
    raise ConfigError(f"{ckpt}: no tokenizer/ directory next to the checkpoint")


def write_checkpoint_run(out: Path, stage: str, model, ckpt_from: Path, step: int, info: dict,
                         base: str | None = None, tokenizer=None) -> Path:
    """A run directory holding one checkpoint of `model` (an adapter's alone when `base`), made by a
    stage that transforms a checkpoint rather than training (merge, import, quantize). The tokenizer
    is `ckpt_from`'s unless given."""
    import shutil

    import babyllama.checkpoint as ckpt_io
    from babyllama.config import RunConfig
    from babyllama.tokenizer import load_tokenizer
    from babyllama.transforms import applied

    tokenizer = tokenizer or load_tokenizer(tokenizer_dir(ckpt_from))
    write_run_info(out, stage, {"path": str(ckpt_from), "fingerprint": None}, tokenizer.fingerprint, **info)
    (out / "run_config.toml").write_text(RunConfig(model=model.config).to_toml(), encoding="utf-8")
    if (out / "tokenizer").exists():
        shutil.rmtree(out / "tokenizer")
    tokenizer.save(out / "tokenizer")
    weights = ckpt_io.model_state(model)
    if base:
        weights = ckpt_io.trained_state(model, weights)
    return ckpt_io.save_checkpoint(out, step, weights, model.config, transforms=applied(model) or None, base=base,
                                   run_config={"stage": stage, **info})


def check_resume_matches(out: Path, stage: str, data: dict, tokenizer: str, retry_hint: str) -> None:
    """Refuse to resume on data or a tokenizer other than the run's: it would train on wrong ids
    or another stream without a word. Runs from before run.json existed: the tokenizer is checked."""
    info_file = out / RUN_INFO
    info = json.loads(info_file.read_text(encoding="utf-8")) if info_file.is_file() else {}
    if info.get("stage", stage) != stage:
        raise OutputError(f"{out} is a {info['stage']} run; resume it with `babyllama {info['stage']} --resume`")
    run_tok = info.get("tokenizer") or _saved_tokenizer_fingerprint(out)
    if run_tok and run_tok != tokenizer:
        raise OutputError(f"{out} was trained with tokenizer {run_tok}, but the tokenizer now given is {tokenizer}; "
                          f"resume with the run's own data and tokenizer ({retry_hint})")
    run_data = info.get("data", {}).get("fingerprint")
    if run_data and run_data != data["fingerprint"]:
        raise OutputError(f"{data['path']} is not the data {out} was trained on (fingerprint {data['fingerprint']}, "
                          f"the run's {run_data} from {info['data'].get('path')}); resuming on other data would "
                          f"not continue the same run ({retry_hint})")


def _saved_tokenizer_fingerprint(out: Path) -> str | None:
    if not (out / "tokenizer").is_dir():
        return None
    from babyllama.tokenizer import load_tokenizer

    return load_tokenizer(out / "tokenizer").fingerprint


def trim_metrics(out: Path, step: int) -> int:
    """Drop the records after `step` (logged after the checkpoint a resume starts from, and about
    to be logged again) and any line a kill cut short. Returns how many were dropped."""
    path = out / METRICS
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            dropped += bool(line.strip())
            continue
        if record.get("step", 0) <= step:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        write_text_atomic(path, "".join(line + "\n" for line in kept))
    return dropped
