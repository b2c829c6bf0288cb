"""Checkpoints: safetensors weights plus the state needed to resume exactly, written atomically.

    OUT/checkpoints/step-00001000/
        model.safetensors     weights (loadable without pickle)
        config.json           the model config (and the run config, for the record)
        optimizer.pt          optimizer state (tensors and numbers only; loaded with weights_only=True)
        state.pt              step, data position, RNG states (same restriction)
        checksums.json        SHA-256 of each file above, written last
    OUT/checkpoints/latest    name of the newest complete checkpoint

A checkpoint is written into `step-N.tmp/`, flushed, then renamed; `latest` is replaced the same
way. A crash at any moment leaves the previous checkpoint intact and `latest` pointing at it.
A checkpoint damaged later (truncated copy, bad disk) fails its checksums: resuming reports it and
falls back to the newest good one. Weights and optimizer state are full (unsharded) tensors keyed
by parameter name, whatever the number of processes that wrote them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file

from babyllama.config import ModelConfig

CKPT_DIR = "checkpoints"
CHECKSUMS = "checksums.json"


class CheckpointError(FileNotFoundError):
    pass


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Weights as contiguous CPU tensors; tied embeddings are stored once."""
    return {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / CKPT_DIR / f"step-{step:08d}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_checkpoint(run_dir: str | Path, step: int, model: torch.nn.Module | dict[str, torch.Tensor],
                    model_config: ModelConfig, optimizer: torch.optim.Optimizer | dict | None = None,
                    state: dict[str, Any] | None = None, run_config: dict[str, Any] | None = None,
                    keep: int = 2, extra_dirs: dict[str, Path] | None = None) -> Path:
    """`model` and `optimizer` may be objects or (full) state dicts already gathered; `extra_dirs`
    (e.g. DeepSpeed's optimizer shards) are moved in before the checksums are taken."""
    final = checkpoint_path(run_dir, step)
    root, name = final.parent, final.name
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / (name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    weights = model_state(model) if isinstance(model, torch.nn.Module) else model
    save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp / "model.safetensors"),
              metadata={"format": "pt"})
    meta = {"model": model_config.__dict__, "step": step, "run": run_config or {}}
    (tmp / "config.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False), encoding="utf-8")
    if optimizer is not None:
        torch.save(optimizer if isinstance(optimizer, dict) else optimizer.state_dict(), tmp / "optimizer.pt")
    if state is not None:
        torch.save(state, tmp / "state.pt")
    for name, src in (extra_dirs or {}).items():
        os.replace(src, tmp / name)
    files = sorted(f for f in tmp.rglob("*") if f.is_file())
    sums = {str(f.relative_to(tmp)): _sha256(f) for f in files}
    (tmp / CHECKSUMS).write_text(json.dumps(sums, indent=1), encoding="utf-8")
    for f in files + [tmp / CHECKSUMS]:
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    _write_text_atomic(root / "latest", name + "\n")
    _prune(root, keep, protect=name)
    return final


def _prune(root: Path, keep: int, protect: str) -> None:
    if keep <= 0:
        return
    done = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and not p.name.endswith(".tmp"))
    for old in done[:-keep]:
        if old.name != protect:
            shutil.rmtree(old, ignore_errors=True)


def verify_checkpoint(ckpt: Path) -> str | None:
    """None if every file matches its recorded SHA-256, else what is wrong. Checkpoints written
    before checksums existed pass (nothing to compare)."""
    sums_file = ckpt / CHECKSUMS
    if not sums_file.is_file():
        return None
    try:
        sums = json.loads(sums_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        return f"{sums_file} unreadable ({e})"
    for name, digest in sums.items():
        f = ckpt / name
        if not f.is_file():
            return f"{f} is missing"
        if _sha256(f) != digest:
            return f"{f} does not match its checksum (truncated or corrupted)"
    return None


def find_checkpoint(path: str | Path, verify: bool = False, warn: Callable[[str], Any] | None = None) -> Path:
    """Accept a run directory (newest checkpoint in it) or a checkpoint directory itself. With
    `verify`, a run directory yields its newest checkpoint that passes its checksums (the damaged
    ones are reported through `warn`); a named checkpoint that fails is an error."""
    path = Path(path)
    if (path / "model.safetensors").is_file():
        problem = verify_checkpoint(path) if verify else None
        if problem:
            raise CheckpointError(f"{path}: damaged checkpoint: {problem}")
        return path
    root = path / CKPT_DIR
    if not path.exists():
        raise CheckpointError(f"{path}: no such directory")
    done = sorted(p for p in root.glob("step-*") if p.is_dir() and not p.name.endswith(".tmp")
                  and (p / "model.safetensors").is_file()) if root.is_dir() else []
    latest = root / "latest"
    if latest.is_file():  # normally the newest; trust it first
        candidate = root / latest.read_text(encoding="utf-8").strip()
        if candidate in done:
            done.remove(candidate)
            done.append(candidate)
    if not done:
        raise CheckpointError(f"{path}: no checkpoint found (expected {root}/step-*/model.safetensors)")
    if not verify:
        return done[-1]
    for candidate in reversed(done):
        problem = verify_checkpoint(candidate)
        if problem is None:
            return candidate
        if warn:
            warn(f"warning: skipping damaged checkpoint {candidate.name}: {problem}")
    raise CheckpointError(f"{path}: every checkpoint is damaged (checksums do not match); the newest: {done[-1]}")


def read_model_config(ckpt: Path) -> ModelConfig:
    meta = json.loads((ckpt / "config.json").read_text(encoding="utf-8"))
    return ModelConfig(**meta["model"])


def load_state_file(ckpt: Path) -> dict[str, torch.Tensor]:
    return load_file(str(ckpt / "model.safetensors"))


def load_weights(model: torch.nn.Module, ckpt: Path) -> None:
    state = load_state_file(ckpt)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{ckpt}: weights do not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})")


def load_training_state(ckpt: Path) -> tuple[dict | None, dict | None]:
    """Optimizer and trainer state, loaded without unpickling arbitrary objects."""
    opt = torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=True) if (ckpt / "optimizer.pt").is_file() else None
    state = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=True) if (ckpt / "state.pt").is_file() else None
    return opt, state


def load_model(path: str | Path, device: str | torch.device = "cpu"):
    """(model, checkpoint dir) from a run directory or checkpoint directory, ready for inference."""
    from babyllama.model import Llama

    import sys

    ckpt = find_checkpoint(path, verify=True, warn=lambda msg: print(msg, file=sys.stderr))
    model = Llama(read_model_config(ckpt))
    load_weights(model, ckpt)
    return model.to(device).eval(), ckpt
