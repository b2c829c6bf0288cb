"""Model transformations: how a built model is changed from outside, never by the model class.

The decoding layout (infer/decode.py) and LoRA/DoRA adapters (adapters/lora.py) are two; quantized
linears and BitNet come next. Each is a small class registered here by name:

    name                 its key in TRANSFORMS and in checkpoints
    order                its place in a composition: HEAD (5), QUANTIZE (8), ADAPTER (10), LAYOUT (90);
                         a transformation is never applied after one of a higher order (an adapter
                         after the decoding layout would wrap modules that no longer train)
    settings()           what reapplying it needs (JSON: recorded in each checkpoint's config.json)
    apply(model)         changes the model in place, usually through `replace_modules`
    trains_own_params    True for adapters: the model's other parameters are frozen, and a
                         checkpoint holds only the parameters it trains (plus where the base is)

An adapter class may also define how its checkpoints are stored (LoRA writes PEFT's files):
    save_weights(directory, weights, model_config, settings, base)   writes the trained weights
    load_weights(directory, model_config, settings) -> weights        reads them back (our names)
checkpoint.py uses them for a checkpoint that records the transformation, model.safetensors otherwise.

`apply_transforms(model, [t, ...])` applies them in order and records them on the instance (the
class never reads them); `applied(model)` lists the records, which checkpoint.save_checkpoint writes and checkpoint.load_model reapplies before it
loads the weights. The LM head is a module (`model.output`), so the same transformations wrap it.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar, Protocol

import torch.nn as nn

from babyllama.config import ConfigError

HEAD, QUANTIZE, ADAPTER, LAYOUT = 5, 8, 10, 90


class Transform(Protocol):
    name: ClassVar[str]
    order: ClassVar[int]
    trains_own_params: ClassVar[bool]

    def settings(self) -> dict[str, Any]: ...
    def apply(self, model: nn.Module) -> None: ...


TRANSFORMS: dict[str, type] = {}  # name -> class; `register` fills it


def register(cls: type) -> type:
    """Class decorator: make a transformation loadable by name from a checkpoint."""
    TRANSFORMS[cls.name] = cls
    return cls


RECORDS = "transform_records"  # the instance attribute that carries them (copied with the model)


def _records(model: nn.Module) -> list[dict[str, Any]]:
    if RECORDS not in model.__dict__:
        setattr(model, RECORDS, [])  # a plain list: nn.Module keeps it in the instance, not as state
    return model.__dict__[RECORDS]


def applied(model: nn.Module) -> list[dict[str, Any]]:
    """The transformations applied to `model`, in order, as {"name": ..., **settings}."""
    return [dict(r) for r in model.__dict__.get(RECORDS, [])]


def apply_transforms(model: nn.Module, transforms: list) -> nn.Module:
    """Apply in their defined order (stable for equal orders); returns the model (changed in place)."""
    records = _records(model)
    for t in sorted(transforms, key=lambda t: t.order):
        highest = max((TRANSFORMS[r["name"]].order for r in records if r["name"] in TRANSFORMS), default=0)
        if t.order < highest:
            later = [r["name"] for r in records if TRANSFORMS.get(r["name"]) and TRANSFORMS[r["name"]].order > t.order]
            raise ConfigError(f"transformation {t.name!r} must come before {', '.join(later)} (already applied); "
                              f"apply it to the model as loaded, before preparing it for decoding")
        t.apply(model)
        records.append({"name": t.name, **t.settings()})
    return model


def unrecord(model: nn.Module, name: str) -> None:
    """Forget that `name` was applied (a transformation undone or folded away, e.g. merged adapters)."""
    records = _records(model)
    records[:] = [r for r in records if r["name"] != name]


def from_record(record: dict[str, Any]):
    """The transformation a checkpoint recorded, ready to apply again."""
    settings = dict(record)
    name = settings.pop("name", None)
    if name not in TRANSFORMS:
        known = ", ".join(sorted(TRANSFORMS)) or "none"
        raise ConfigError(f"this checkpoint was trained with the transformation {name!r}, which this babyllama "
                          f"does not have (it knows: {known}); upgrade babyllama to load it")
    return TRANSFORMS[name](**settings)


def trains_own_params(model: nn.Module) -> bool:
    """True when an applied adapter trains only its own parameters (checkpoints then save only those)."""
    return any(TRANSFORMS[r["name"]].trains_own_params for r in applied(model) if r["name"] in TRANSFORMS)


def replace_modules(model: nn.Module, swap: Callable[[str, nn.Module], nn.Module | None]) -> int:
    """Offer every submodule to `swap(qualified_name, module)`; where it returns a module, that one
    takes the place of the old (whose children are then not visited), else the walk goes inside.
    So a transformation that swaps only plain `nn.Linear`s (exact type) reaches the linear inside an
    adapter wrapper and leaves the wrapper and its adapter in place. Returns the number swapped."""
    count = 0

    def visit(parent: nn.Module, prefix: str) -> None:
        nonlocal count
        for name, child in list(parent.named_children()):
            qualified = f"{prefix}{name}"
            new = swap(qualified, child)
            if new is not None and new is not child:
                setattr(parent, name, new)
                count += 1
            else:
                visit(child, qualified + ".")

    visit(model, "")
    return count
