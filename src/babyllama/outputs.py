"""Output directories that never cost a user data: what may be written where, locks, atomic swaps.

Every stage writes into an `--out` directory of one *kind* (a tokenizer, pretraining shards, an SFT
dataset, a training run, the demo). Before writing, a stage claims its output:

- a missing or empty directory is fine;
- a directory that holds a babyllama output of the same kind, and nothing else, may be replaced
  with `--overwrite` (or resumed, for runs); without it the stage stops and says so;
- anything else (your files, another kind of output, `--out .` in a project) is refused, with or
  without `--overwrite`, and so is any output that contains one of the stage's own inputs.

Data and tokenizer outputs are built beside the target (`OUT.partial`) and swapped in when
complete, so a crash leaves the previous output or none, never half of one. A directory being
written is locked (`OUT.lock` beside a built output, `OUT/.lock` inside a run): the lock file
names the holder's pid, host and command, and is held with `flock`, which the kernel releases when
the holder dies, so a lock left by a killed process is stale and taken over, never trusted.
"""

from __future__ import annotations

import errno
import fnmatch
import json
import os
import shutil
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable


class OutputError(ValueError):
    """An output directory cannot be written without risking someone's files; says why and what to do."""


@dataclass(frozen=True)
class OutputKind:
    name: str  # what the user reads: "pretraining dataset"
    signature: tuple[str, ...]  # an entry any output of this kind has (one is enough)
    entries: tuple[str, ...]  # glob patterns of every top-level entry babyllama writes there

    def owns(self, entry: str) -> bool:
        return any(fnmatch.fnmatchcase(entry, pattern) for pattern in self.entries)


PRETRAIN_DATA = OutputKind("pretraining dataset", ("manifest.json",),
                           ("manifest.json", "tokenizer", "train-*.bin", "val-*.bin"))
SFT_DATA = OutputKind("SFT dataset", ("manifest.json",),
                      ("manifest.json", "tokenizer", "train.safetensors", "val.safetensors"))
TOKENIZER = OutputKind("tokenizer", ("tokenizer.model", "tokenizer.json"),
                       ("tokenizer.model", "tokenizer.json", "tokenizer_config.json"))
RUN = OutputKind("training run", ("run.json", "run_config.toml"),
                 ("run.json", "run_config.toml", "checkpoints", "tokenizer", "metrics.jsonl", "metrics.jsonl.tmp",
                  "loss.png", "sft_data.json", "dpo_data.json", "reward_data.json", "tensorboard", "eval", "environment.json", "report.md", "report.html",
                  "report", ".lock"))
HF_EXPORT = OutputKind("Hugging Face model", ("config.json",),
                      ("config.json", "generation_config.json", "model.safetensors", "model-*-of-*.safetensors",
                       "model.safetensors.index.json", "tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                       "adapter"))
DEMO = OutputKind("demo directory", ("demo.json", "report.json"),
                  ("demo.json", "corpus", "tokenizer", "data", "pretrain", "sft", "sft_scratch", "sft_lora", "sft_probe",
                   "samples.json", "loss.png", "report.json", "report.md", "report.html", "report", "curve",
                   "learning_curve.json", "learning_curve.png", ".lock", "*.partial", "*.lock"))


def _entries(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def _manifest_format(directory: Path) -> str | None:
    try:
        return json.loads((directory / "manifest.json").read_text(encoding="utf-8")).get("format")
    except (OSError, ValueError, AttributeError):
        return None


def holds(directory: Path, kind: OutputKind) -> bool:
    """True if `directory` holds an output of `kind` and nothing babyllama did not write there."""
    names = _entries(directory)
    if not any(n in kind.signature for n in names) or not all(kind.owns(n) for n in names):
        return False
    if kind is PRETRAIN_DATA:
        return _manifest_format(directory) == "babyllama-pretrain-v1"
    if kind is SFT_DATA:
        return _manifest_format(directory) == "babyllama-sft-v1"
    if kind is TOKENIZER:  # one `tokenizer train` wrote, not a tokenizer someone downloaded
        try:
            config = json.loads((directory / "tokenizer_config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        return isinstance(config, dict) and config.get("kind") == "babyllama"
    return True


def _describe(directory: Path) -> str:
    names = _entries(directory)
    shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
    for kind in (PRETRAIN_DATA, SFT_DATA, TOKENIZER, RUN, DEMO):
        if holds(directory, kind):
            return f"a babyllama {kind.name}"
    return f"files babyllama did not write ({shown})"


def _inside(path: Path, directory: Path) -> bool:
    try:
        path.resolve().relative_to(directory.resolve())
        return True
    except ValueError:
        return False


def check_inputs_outside(out: Path, inputs: Iterable[str | Path], flag: str = "--out") -> None:
    """Refuse an output that contains one of the inputs: replacing it would delete them."""
    for item in inputs:
        if item and _inside(Path(str(item).split("::")[0]), out):
            raise OutputError(f"{flag} {out} contains the input {item}; write the output somewhere else")


def claim_output(out: str | Path, kind: OutputKind, inputs: Iterable[str | Path] = (), overwrite: bool = False,
                 flag: str = "--out") -> bool:
    """May `out` receive a new `kind`? Returns True when an existing output of that kind will be
    replaced (only with `overwrite`); raises OutputError, having touched nothing, otherwise."""
    out = Path(out)
    check_inputs_outside(out, inputs, flag)
    if not out.exists():
        return False
    if not out.is_dir():
        raise OutputError(f"{flag} {out} is a file, not a directory")
    if not _entries(out):
        return False
    if holds(out, kind):
        if overwrite:
            return True
        raise OutputError(f"{flag} {out} already holds a {kind.name}; pass --overwrite to replace it, "
                          f"or choose another {flag}")
    raise OutputError(f"{flag} {out} is not empty and holds {_describe(out)}, not a {kind.name}; "
                      f"choose another {flag} (nothing was written)")


def foreign_entries(directory: Path, kind: OutputKind) -> list[str]:
    """What stops `directory` from counting as babyllama's own `kind` (runs, the demo: used in place):
    entries babyllama does not write there, or everything when its signature file is missing."""
    names = sorted(p.name for p in directory.iterdir() if p.name != ".lock") if directory.is_dir() else []
    return [n for n in names if not kind.owns(n)] or ([] if set(names) & set(kind.signature) else names)


def remove_owned(directory: Path, kind: OutputKind, keep: Iterable[str] = ()) -> None:
    """Delete the entries of `directory` that babyllama writes for `kind` (and only those)."""
    keep = set(keep)
    for name in _entries(directory):
        if kind.owns(name) and name not in keep:
            path = directory / name
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


def swap_in(work: Path, out: Path) -> None:
    """Move the finished `work` directory to `out`, replacing an output there (already claimed).
    The old one is renamed aside first, so `out` is at every moment the old or the new output."""
    old = None
    if out.exists():
        old = out.with_name(f"{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(work, out)
    fsync_dir(out.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable (where the platform allows opening a directory)."""
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


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write through a temporary file and a rename: readers see the old text or the new, never half."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# --- locks ------------------------------------------------------------------------------------------

def _holder_info() -> dict:
    return {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": " ".join(["babyllama"] + sys.argv[1:])[:300]}


def _read_holder(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _holder_text(info: dict) -> str:
    if not info:
        return "another process"
    return (f"pid {info.get('pid')} on {info.get('host')} since {info.get('since')} "
            f"(`{info.get('command', '?')}`)")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class OutputLock:
    """An exclusive lock on an output, as a file naming its holder.

        with OutputLock(out / ".lock", f"run directory {out}"):
            ...  # only this process writes `out`

    `flock` on the file is the lock: the kernel drops it when the holder exits or is killed, so a
    lock file left behind is recognised as stale and taken over. Where the filesystem has no
    `flock` (some network mounts), the file's existence is the lock and a holder on this host
    whose pid is gone counts as stale; a holder on another host must be cleared by hand.
    """

    def __init__(self, path: str | Path, what: str):
        self.path, self.what = Path(path), what
        self._fd: int | None = None
        self.stale: dict = {}  # what a dead holder left in the file, if anything

    def acquire(self) -> "OutputLock":
        try:
            import fcntl
        except ImportError:  # not POSIX
            fcntl = None
        for _ in range(10):  # another process may unlink the file between our open and lock
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            if fcntl is None or not self._flock(fcntl, fd):
                os.close(fd)
                return self._acquire_by_existence()
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # locked a file its last holder had just removed: try the new one
                os.close(fd)
                continue
            self.stale = _read_holder(self.path)
            self._write(fd)
            return self
        raise OutputError(f"{self.what}: could not lock {self.path}")

    def _flock(self, fcntl, fd: int) -> bool:
        """True when locked; False when the filesystem cannot flock; OutputError when held."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            holder = _read_holder(self.path)
            os.close(fd)
            raise OutputError(f"{self.what} is being written by {_holder_text(holder)}; wait for it to finish "
                              f"or choose another --out") from None
        except OSError as e:
            if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                return False
            raise

    def _acquire_by_existence(self) -> "OutputLock":
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                holder = _read_holder(self.path)
                mine = holder.get("host") == socket.gethostname()
                if not (mine and isinstance(holder.get("pid"), int) and not _pid_alive(holder["pid"])):
                    raise OutputError(f"{self.what} is locked by {_holder_text(holder)}; if that process is gone, "
                                      f"delete {self.path}") from None
                self.stale = holder
                self.path.unlink(missing_ok=True)
                continue
            self._write(fd)
            return self
        raise OutputError(f"{self.what}: could not lock {self.path}")

    def _write(self, fd: int) -> None:
        data = json.dumps(_holder_info(), ensure_ascii=False).encode("utf-8")
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        os.fsync(fd)
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            if _read_holder(self.path).get("pid") == os.getpid():
                self.path.unlink(missing_ok=True)  # removed while still held: no one can take a dead file
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def staged_output(out: Path, what: str) -> tuple[Path, OutputLock]:
    """Lock `out` (as OUT.lock beside it) and give a fresh OUT.partial to build it in. A partial
    directory left by a killed run is ours to remove once we hold the lock."""
    out.parent.mkdir(parents=True, exist_ok=True)
    lock = OutputLock(out.with_name(out.name + ".lock"), f"{what} {out}").acquire()
    try:
        work = out.with_name(out.name + ".partial")
        if work.exists():
            shutil.rmtree(work)
        work.mkdir()
    except BaseException:
        lock.release()
        raise
    return work, lock
