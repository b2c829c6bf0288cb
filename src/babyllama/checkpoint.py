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

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file

from babyllama.config import ModelConfig
from babyllama.outputs import fsync_dir, write_text_atomic

CKPT_DIR = "checkpoints"
CHECKSUMS = "checksums.json"


class CheckpointError(FileNotFoundError):
    pass


WEIGHTS = "model.safetensors"
ADAPTER_WEIGHTS = "adapter_model.safetensors"  # an adapter checkpoint in PEFT's layout (adapters/peft.py)
TIED_HEAD = "output.weight"  # with tied embeddings, the embedding itself: stored once, under its own name


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Weights as contiguous CPU tensors; tied embeddings are stored once."""
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    config = getattr(model, "config", None)
    if config is not None and config.tie_embeddings:
        state.pop(TIED_HEAD, None)
    return state


def trained_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Of a full `state`, the entries of parameters that train (an adapter's, when the rest is frozen)."""
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in state.items() if k in trained}


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
                    keep: int = 2, extra_dirs: dict[str, Path] | None = None, transforms: list[dict] | None = None,
                    base: str | None = None) -> Path:
    """`model` and `optimizer` may be objects or (full) state dicts already gathered; `extra_dirs`
    (e.g. DeepSpeed's optimizer shards) are moved in before the checksums are taken.
    `transforms`: the records of the transformations applied to the model (transforms.applied),
    reapplied by `load_model`. `base`: the checkpoint whose weights this one completes (an adapter
    checkpoint holds only the parameters it trained)."""
    final = checkpoint_path(run_dir, step)
    root, name = final.parent, final.name
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / (name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    weights = model_state(model) if isinstance(model, torch.nn.Module) else dict(model)
    if model_config.tie_embeddings:
        weights.pop(TIED_HEAD, None)
    adapter = _adapter_format(transforms or []) if base else None
    if adapter:  # the adapter's own files (LoRA: a PEFT adapter directory)
        cls, settings = adapter
        cls.save_weights(tmp, weights, model_config, settings, str(base))
    else:
        save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp / WEIGHTS), metadata={"format": "pt"})
    meta = {"model": model_config.__dict__, "step": step, "run": run_config or {}}
    if transforms:
        meta["transforms"] = transforms
    if base:  # where the rest of the weights are, and which weights they were (checked on loading)
        meta["base"] = str(base)
        meta["base_weights_sha256"] = weights_fingerprint(Path(base))
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
    fsync_dir(root)
    write_text_atomic(root / "latest", name + "\n")
    _prune(root, keep, protect=name)
    return final


def _adapter_format(transforms: list[dict]):
    """(class, settings) of the recorded transformation that stores its own weights, or None."""
    import babyllama.adapters  # noqa: F401  (registers LoRA, so records naming it resolve)
    from babyllama.transforms import TRANSFORMS

    for record in transforms:
        cls = TRANSFORMS.get(record.get("name"))
        if cls is not None and hasattr(cls, "save_weights"):
            return cls, {k: v for k, v in record.items() if k != "name"}
    return None


def weights_fingerprint(ckpt: Path) -> str:
    """SHA-256 of a checkpoint's weights file (from its checksums.json when it has one)."""
    try:
        sums = json.loads((ckpt / CHECKSUMS).read_text(encoding="utf-8"))
        if WEIGHTS in sums:
            return sums[WEIGHTS]
    except (OSError, ValueError):
        pass
    if not (ckpt / WEIGHTS).is_file():
        raise CheckpointError(f"{ckpt}: no {WEIGHTS}; an adapter's base must be a checkpoint with full weights "
                              f"(merge an adapter run first: babyllama lora merge)")
    return _sha256(ckpt / WEIGHTS)


def _prune(root: Path, keep: int, protect: str) -> None:
    if keep <= 0:
        return
    done = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and not p.name.endswith(".tmp"))
    for old in done[:-keep]:
        if old.name != protect:
            shutil.rmtree(old, ignore_errors=True)


def verify_checkpoint(ckpt: Path, allow_unverified: bool = False) -> str | None:
    """None if every file matches its recorded SHA-256, else what is wrong. A checkpoint without
    checksums (written by hand or by another tool) cannot be told from a damaged one: it is refused
    unless `allow_unverified`."""
    sums_file = ckpt / CHECKSUMS
    if not sums_file.is_file():
        if not (ckpt / WEIGHTS).is_file() and not (ckpt / ADAPTER_WEIGHTS).is_file():
            return f"{WEIGHTS} is missing"
        return None if allow_unverified else f"it has no {CHECKSUMS}, so it cannot be verified"
    try:
        sums = json.loads(sums_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        return f"{CHECKSUMS} unreadable ({e})"
    for name, digest in sums.items():
        f = ckpt / name
        if not f.is_file():
            return f"{name} is missing"
        if _sha256(f) != digest:
            return f"{name} does not match its checksum (truncated or corrupted)"
    return None


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Every finished checkpoint directory of a run, oldest first; the `latest` pointer is not needed
    to find them, and damaged ones are listed too (verification says which)."""
    root = Path(run_dir) / CKPT_DIR
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if p.is_dir() and p.name[5:].isdigit())


UNVERIFIED_HINT = "pass --allow-unverified to load a checkpoint that lacks checksums.json anyway"


def find_checkpoint(path: str | Path, verify: bool = False, warn: Callable[[str], Any] | None = None,
                    allow_unverified: bool = False) -> Path:
    """Accept a run directory (newest checkpoint in it) or a checkpoint directory itself. With
    `verify`, a run directory yields its newest checkpoint that passes its checksums (the damaged
    ones are reported through `warn`); a named checkpoint that fails is an error, and so is a run
    whose checkpoints all fail (each named, with what is wrong)."""
    path = Path(path)
    if any((path / f).is_file() for f in (WEIGHTS, ADAPTER_WEIGHTS, CHECKSUMS)):
        problem = verify_checkpoint(path, allow_unverified) if verify else None
        if problem:
            raise CheckpointError(f"{path}: {problem}" + ("; " + UNVERIFIED_HINT if "verified" in problem else ""))
        return path
    if not path.exists():
        raise CheckpointError(f"{path}: no such directory")
    done = list_checkpoints(path)
    latest = path / CKPT_DIR / "latest"
    if latest.is_file():  # normally the newest; trust it first
        candidate = path / CKPT_DIR / latest.read_text(encoding="utf-8").strip()
        if candidate in done:
            done.remove(candidate)
            done.append(candidate)
    if not done:
        raise CheckpointError(f"{path}: no checkpoint found (expected {path / CKPT_DIR}/step-*/model.safetensors)")
    if not verify:
        return done[-1]
    problems = []
    for candidate in reversed(done):
        problem = verify_checkpoint(candidate, allow_unverified)
        if problem is None:
            if warn:  # the newer ones it passed over, said once a good one is found (else: the error says it)
                for skipped in problems:
                    warn(f"warning: skipping damaged checkpoint {skipped}")
                if allow_unverified and not (candidate / CHECKSUMS).is_file():
                    warn(f"warning: {candidate.name} has no {CHECKSUMS}; loading it unverified as asked")
            return candidate
        problems.append(f"{candidate.name}: {problem}")
    hint = "; " + UNVERIFIED_HINT if any("verified" in p for p in problems) else ""
    raise CheckpointError(f"{path}: no usable checkpoint ({'; '.join(problems)}); nothing was changed{hint}")


def read_model_config(ckpt: Path) -> ModelConfig:
    try:
        meta = json.loads((ckpt / "config.json").read_text(encoding="utf-8"))
        return ModelConfig(**meta["model"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{ckpt / 'config.json'}: not a babyllama model config ({e})") from None


def read_meta(ckpt: Path) -> dict:
    try:
        return json.loads((ckpt / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{ckpt / 'config.json'}: unreadable ({e})") from None


def load_state_file(ckpt: Path) -> dict[str, torch.Tensor]:
    """The weights a checkpoint holds, under our parameter names (an adapter checkpoint's through
    its own format); a tied head is given back under its own name too."""
    if not (ckpt / WEIGHTS).is_file() and (ckpt / ADAPTER_WEIGHTS).is_file():
        adapter = _adapter_format(read_meta(ckpt).get("transforms", []))
        if adapter is None:
            raise CheckpointError(f"{ckpt}: holds {ADAPTER_WEIGHTS} but its config.json names no adapter; "
                                  f"a PEFT adapter from elsewhere is brought in with `babyllama lora import`")
        cls, settings = adapter
        return cls.load_weights(ckpt, read_model_config(ckpt), settings)
    state = load_file(str(ckpt / WEIGHTS))
    if "tok_embeddings.weight" in state and TIED_HEAD not in state and read_model_config(ckpt).tie_embeddings:
        state[TIED_HEAD] = state["tok_embeddings.weight"]
    return state


def load_weights(model: torch.nn.Module, ckpt: Path, partial: bool = False, fresh: tuple[str, ...] = ()) -> None:
    """Load `ckpt`'s weights into `model`; `partial`: the checkpoint holds only some of them (an
    adapter's), and every one it holds must fit; `fresh`: name prefixes of new parameters it may
    lack (CLEX's ODE, added to a model trained without it), which keep their initial values."""
    state = load_state_file(ckpt)
    own = model.state_dict()
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items()
             if k in own and v.shape != own[k].shape]
    if wrong:
        raise CheckpointError(f"{ckpt}: its weights have another shape than this model ({wrong[0]}"
                              f"{f' and {len(wrong) - 1} more' if len(wrong) > 1 else ''}); "
                              f"{describe_shape_difference(ckpt, getattr(model, 'config', None))}")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if partial:
        missing = []
    missing = [k for k in missing if not k.startswith(fresh)] if fresh else missing
    if missing or unexpected:
        raise CheckpointError(f"{ckpt}: weights do not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})")


def describe_shape_difference(ckpt: Path, config: ModelConfig | None) -> str:
    """'model.dim: 64 in the checkpoint, 256 here; ...' for the shape fields that differ."""
    try:
        theirs = read_model_config(ckpt)
    except (OSError, ValueError, TypeError, KeyError):
        return "use the model settings it was trained with"
    if config is None:
        return "use the model settings it was trained with"
    diffs = [f"model.{f.name}: {getattr(theirs, f.name)} in the checkpoint, {getattr(config, f.name)} here"
             for f in dataclasses.fields(ModelConfig) if getattr(theirs, f.name) != getattr(config, f.name)]
    return "; ".join(diffs) + " (use the checkpoint's model settings)" if diffs else \
        "use the model settings it was trained with"


def load_training_state(ckpt: Path) -> tuple[dict | None, dict | None]:
    """Optimizer and trainer state, loaded without unpickling arbitrary objects."""
    opt = torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=True) if (ckpt / "optimizer.pt").is_file() else None
    state = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=True) if (ckpt / "state.pt").is_file() else None
    return opt, state


def load_model(path: str | Path, device: str | torch.device = "cpu", allow_unverified: bool = False,
               base: str | Path | None = None, merge: bool = False, rope=None):
    """(model, checkpoint dir) from a run directory or checkpoint directory, ready for inference.
    `rope` (a config.RopeScaling) replaces the RoPE scaling the checkpoint records.
    The transformations the checkpoint records are applied again before its weights are loaded;
    an adapter checkpoint loads its base checkpoint's weights first (`base` overrides where that
    is; either way its weights must be the ones the adapter was trained on). `merge` folds
    adapters into plain weights (the same outputs, faster to run)."""
    import sys

    import babyllama.adapters  # noqa: F401  (registers the adapters checkpoints may name)
    import babyllama.quant  # noqa: F401  (registers the quantizations checkpoints may name)
    from babyllama.model import Llama
    from babyllama.transforms import ADAPTER, applied, apply_transforms, from_record

    warn = lambda msg: print(msg, file=sys.stderr)  # noqa: E731
    ckpt = find_checkpoint(path, verify=True, warn=warn, allow_unverified=allow_unverified)
    meta = read_meta(ckpt)
    model = Llama(read_model_config(ckpt))
    transforms = [from_record(r) for r in meta.get("transforms", [])]
    if meta.get("base"):
        # the base's own transformations (a quantized base under an adapter) shape what its weights fill
        apply_transforms(model, [t for t in transforms if t.order < ADAPTER])
        transforms = [t for t in transforms if t.order >= ADAPTER]
        base_ckpt = find_base(ckpt, meta, base, allow_unverified)
        load_weights(model, base_ckpt)
    apply_transforms(model, transforms)
    load_weights(model, ckpt, partial=bool(meta.get("base")))
    if merge and not any(r["name"] == "quantize" for r in applied(model)):  # over quantized codes, adapters stay
        babyllama.adapters.merge_adapters(model)
    if rope is not None:
        from babyllama.model.rope import rescale_rope

        rescale_rope(model, rope.kind, rope.factor, rope.original, rope.max_len)
    return model.to(device).eval(), ckpt


def find_base(ckpt: Path, meta: dict, base: str | Path | None = None, allow_unverified: bool = False) -> Path:
    """The checkpoint an adapter checkpoint completes: where it says (or `base`), refused unless its
    weights are the very ones the adapter was trained on."""
    where = Path(base) if base else Path(meta["base"])
    hint = "pass the right one with --base" if base is None else "check --base"
    try:
        found = find_checkpoint(where, verify=True, allow_unverified=allow_unverified)
    except CheckpointError as e:
        raise CheckpointError(f"{ckpt} is an adapter over {meta['base']}, which cannot be loaded ({e}); "
                              f"{hint}") from None
    expected = meta.get("base_weights_sha256")
    if expected and weights_fingerprint(found) != expected:
        raise CheckpointError(f"{ckpt} is an adapter trained over other weights than {found}'s (recorded "
                              f"{expected[:12]}, found {weights_fingerprint(found)[:12]}): applied to another "
                              f"base it computes nonsense; {hint} (the checkpoint it was trained from)")
    return found
