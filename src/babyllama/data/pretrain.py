"""Tokenize a corpus into pretraining shards: flat token arrays on disk plus a JSON manifest.

Layout of the output directory:

    manifest.json          format, dtype, tokenizer fingerprint, counts, sources, shards
    tokenizer/             a copy of the tokenizer, so training needs nothing else
    train-00000.bin ...    uint16 (uint32 when the vocabulary needs it) tokens, doc EOS doc EOS ...
    val-00000.bin ...      the validation split, chosen per document by a hash of its text

The main process cuts the input into chunks (about 1 MB; for text and JSON lines only the byte
ranges, which the workers read themselves) and writes results in input order; workers read, decode,
parse, clean and encode. At most 4 x workers chunks are in flight (enough that a worker never waits
for the busy main process to hand it the next one), so memory stays flat whatever the corpus size,
and the bytes written do not depend on the number of workers.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import shutil
import sys
import time
import zlib
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from babyllama.config import ConfigError, check_float, check_int
from babyllama.outputs import PRETRAIN_DATA, claim_output, staged_output, swap_in
from babyllama.corpus.readers import DataError, RawChunk, ReadStats, parse_chunk, read_chunks, split_input_spec

FORMAT = "babyllama-pretrain-v1"
MANIFEST = "manifest.json"


@dataclass
class PrepareConfig:
    inputs: list[str]
    tokenizer: str
    out: str
    layout: str = "auto"  # one layout for all inputs, or per input as "FILE::LAYOUT"
    workers: int = 1
    val_fraction: float = 0.005
    shard_tokens: int = 1 << 28  # 256M tokens (512 MB of uint16) per shard
    on_error: str = "raise"  # raise | skip (bad records counted and reported)
    overwrite: bool = False  # replace an existing pretraining dataset in `out` (never anything else)
    chunk_bytes: int = 1 << 20
    progress: bool = True
    exclude: list[str] = field(default_factory=list)  # files of texts (one per line) to keep out
    encoding: str = "utf-8"  # of the input files (UTF-8 may have a byte-order mark); e.g. gb18030, big5

    def __post_init__(self) -> None:  # checked before any work, flag names in the messages
        check_int("--workers", self.workers, 1)
        check_float("--val-fraction", self.val_fraction, 0, 1, high_open=True)
        check_int("shard_tokens", self.shard_tokens, 1)
        check_int("chunk_bytes", self.chunk_bytes, 1)
        if self.on_error not in ("raise", "skip"):
            raise ConfigError(f"--on-error must be raise or skip, got {self.on_error!r}")


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def is_validation(text: str, val_fraction: float) -> bool:
    """Split by a hash of the text: stable across runs and worker counts, and exact duplicates
    always land on the same side, so they cannot leak from training into validation."""
    return (zlib.crc32(text.encode("utf-8")) % 1_000_000) < val_fraction * 1_000_000


# --- worker side ----------------------------------------------------------------------------------

_WORKER: dict = {}


def _init_worker(tokenizer_dir: str, val_fraction: float, on_error: str, exclude: frozenset) -> None:
    from babyllama.tokenizer import load_tokenizer

    tok = load_tokenizer(tokenizer_dir)
    _WORKER.update(tok=tok, dtype=token_dtype(tok.vocab_size), val_fraction=val_fraction,
                   on_error=on_error, exclude=exclude)


@dataclass
class ChunkResult:
    source: str
    train: np.ndarray
    val: np.ndarray
    train_docs: int
    val_docs: int
    stats: ReadStats
    excluded: int
    nbytes: int


def _encode_chunk(chunk: RawChunk) -> ChunkResult:
    tok, dtype = _WORKER["tok"], _WORKER["dtype"]
    stats = ReadStats()
    docs = parse_chunk(chunk, _WORKER["on_error"], stats)
    exclude = _WORKER["exclude"]
    excluded = 0
    if exclude:
        kept = [d for d in docs if d not in exclude]
        excluded = len(docs) - len(kept)
        docs = kept
    ids = tok.encode_batch(docs)
    streams: dict[bool, list[int]] = {False: [], True: []}
    counts = {False: 0, True: 0}
    eos, fraction = tok.eos_id, _WORKER["val_fraction"]
    for doc, doc_ids in zip(docs, ids):
        is_val = fraction > 0 and is_validation(doc, fraction)
        streams[is_val].extend(doc_ids)
        streams[is_val].append(eos)
        counts[is_val] += 1
    return ChunkResult(chunk.source, np.array(streams[False], dtype=dtype), np.array(streams[True], dtype=dtype),
                       counts[False], counts[True], stats, excluded, chunk.nbytes)


# --- main side ------------------------------------------------------------------------------------

class ShardWriter:
    """Appends token arrays to numbered shard files; a document never straddles two shards."""

    def __init__(self, directory: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.directory, self.split, self.dtype, self.shard_tokens = directory, split, dtype, shard_tokens
        self.shards: list[dict] = []
        self._file = None

    def write(self, tokens: np.ndarray, docs: int) -> None:
        if tokens.size == 0:
            return
        if self._file is None or self.shards[-1]["tokens"] + tokens.size > self.shard_tokens:
            self._open_next()
        data = tokens.tobytes()
        self._file.write(data)
        self._hash.update(data)
        self.shards[-1]["tokens"] += int(tokens.size)
        self.shards[-1]["documents"] += docs

    def _open_next(self) -> None:
        self.close()
        name = f"{self.split}-{len(self.shards):05d}.bin"
        self._file = open(self.directory / name, "wb")
        self._hash = hashlib.sha256()
        self.shards.append({"file": name, "tokens": 0, "documents": 0})

    def close(self) -> None:
        if self._file is not None:
            self.shards[-1]["sha256"] = self._hash.hexdigest()
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None


def _all_chunks(cfg: PrepareConfig) -> Iterator[RawChunk]:
    for spec in cfg.inputs:
        path, layout = split_input_spec(spec, cfg.layout)
        yield from read_chunks(path, layout, cfg.chunk_bytes, cfg.encoding)  # chunks carry it to the workers


def _load_exclusions(paths: list[str], encoding: str = "utf-8") -> frozenset:
    from babyllama.corpus.readers import clean_text

    out = set()
    for p in paths:
        with open(p, encoding="utf-8-sig" if encoding.lower().replace("_", "-") in ("utf-8", "utf8") else encoding) as f:
            out.update(clean_text(line) for line in f if line.strip())
    return frozenset(out)


def _results(cfg: PrepareConfig, tokenizer_dir: str, exclude: frozenset) -> Iterator[ChunkResult]:
    """Encoded chunks in input order: inline for one worker, else a bounded window of a pool."""
    if cfg.workers <= 1:
        _init_worker(tokenizer_dir, cfg.val_fraction, cfg.on_error, exclude)
        for chunk in _all_chunks(cfg):
            yield _encode_chunk(chunk)
        return
    method = "fork" if sys.platform == "linux" else "spawn"
    ctx = mp.get_context(method)
    with ctx.Pool(cfg.workers, initializer=_init_worker,
                  initargs=(tokenizer_dir, cfg.val_fraction, cfg.on_error, exclude)) as pool:
        pending: deque = deque()
        for chunk in _all_chunks(cfg):
            pending.append(pool.apply_async(_encode_chunk, (chunk,)))
            if len(pending) >= 4 * cfg.workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def prepare_pretrain(cfg: PrepareConfig) -> dict:
    """Tokenize `cfg.inputs` into shards under `cfg.out`; returns the manifest."""
    from babyllama.tokenizer import load_tokenizer

    if not cfg.inputs:
        raise DataError("no input files given")
    for spec in cfg.inputs:
        path, _ = split_input_spec(spec, cfg.layout)
        if not Path(path).is_file():
            raise DataError(f"{path}: no such file")
        if Path(path).stat().st_size == 0:
            raise DataError(f"{path}: file is empty")
    tok = load_tokenizer(cfg.tokenizer)
    dtype = token_dtype(tok.vocab_size)
    out = Path(cfg.out)
    inputs = [split_input_spec(spec, cfg.layout)[0] for spec in cfg.inputs] + [cfg.tokenizer, *cfg.exclude]
    claim_output(out, PRETRAIN_DATA, inputs, cfg.overwrite)
    work, lock = staged_output(out, "pretraining dataset")
    try:
        return _prepare_into(cfg, tok, dtype, out, work)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)  # no half-written output left behind
        raise
    finally:
        lock.release()


def _prepare_into(cfg: PrepareConfig, tok, dtype: np.dtype, out: Path, work: Path) -> dict:
    from tqdm import tqdm

    claim_output(out, PRETRAIN_DATA, (), cfg.overwrite)  # again under the lock: nobody swapped in since
    tok.save(work / "tokenizer")
    exclude = _load_exclusions(cfg.exclude, cfg.encoding)

    writers = {"train": ShardWriter(work, "train", dtype, cfg.shard_tokens),
               "val": ShardWriter(work, "val", dtype, cfg.shard_tokens)}
    sources: dict[str, dict] = {}
    total_bytes = sum(Path(split_input_spec(s, cfg.layout)[0]).stat().st_size for s in cfg.inputs)
    start = time.perf_counter()
    n_tokens = n_chars = n_docs = 0
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, disable=not cfg.progress,
               desc="tokenizing", dynamic_ncols=True, delay=1)  # (an input refused at once shows no bar)
    try:
        for res in _results(cfg, str(work / "tokenizer"), exclude):
            writers["train"].write(res.train, res.train_docs)
            writers["val"].write(res.val, res.val_docs)
            src = sources.setdefault(res.source, {"path": res.source, "documents": 0, "characters": 0,
                                                  "skipped": 0, "skipped_where": [], "excluded": 0})
            src["documents"] += res.stats.documents - res.excluded
            src["characters"] += res.stats.characters
            src["skipped"] += res.stats.skipped
            src["excluded"] += res.excluded
            src["skipped_where"] = (src["skipped_where"] + res.stats.skipped_where)[:5]
            n_tokens += res.train.size + res.val.size
            n_chars += res.stats.characters
            n_docs += res.train_docs + res.val_docs
            elapsed = max(time.perf_counter() - start, 1e-9)
            bar.update(res.nbytes)
            bar.set_postfix_str(f"{n_docs / elapsed:,.0f} docs/s {n_tokens / elapsed / 1e3:,.0f}k tokens/s "
                                f"{n_chars / elapsed / 1e6:.2f}M chars/s")
    finally:
        bar.close()
        for w in writers.values():
            w.close()

    if writers["train"].shards == [] or sum(s["tokens"] for s in writers["train"].shards) == 0:
        raise DataError(f"no documents found in {', '.join(cfg.inputs)}")
    elapsed = time.perf_counter() - start
    manifest = {
        "format": FORMAT,
        "dtype": dtype.name,
        "tokenizer": {"fingerprint": tok.fingerprint, "kind": tok.kind, "vocab_size": tok.vocab_size,
                      "eos_id": tok.eos_id, "bos_id": tok.bos_id},
        "val_fraction": cfg.val_fraction,
        "splits": {name: {"shards": w.shards, "tokens": sum(s["tokens"] for s in w.shards),
                          "documents": sum(s["documents"] for s in w.shards)} for name, w in writers.items()},
        "sources": list(sources.values()),
        "characters": n_chars,
        "seconds": round(elapsed, 2),
        "workers": cfg.workers,
    }
    manifest["fingerprint"] = dataset_fingerprint(manifest)
    (work / MANIFEST).write_text(json.dumps(manifest, indent=2, ensure_ascii=False), encoding="utf-8")
    swap_in(work, out)  # the output directory appears complete or not at all
    skipped = sum(s["skipped"] for s in sources.values())
    if skipped and cfg.progress:
        print(f"skipped {skipped} bad records (--on-error skip); first: "
              + "; ".join(w for s in sources.values() for w in s["skipped_where"][:2]), file=sys.stderr)
    return manifest


def dataset_fingerprint(manifest: dict) -> str:
    """What identifies the token stream: the tokenizer and every shard's content hash (counts only,
    for datasets prepared before shards were hashed). A run resumes only on the same fingerprint."""
    if manifest.get("fingerprint"):
        return manifest["fingerprint"]
    key = {"tokenizer": manifest["tokenizer"]["fingerprint"], "dtype": manifest["dtype"],
           "splits": {name: [[s["file"], s["tokens"], s.get("sha256")] for s in split["shards"]]
                      for name, split in manifest["splits"].items()}}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def load_manifest(directory: str | Path) -> dict:
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        raise DataError(f"{directory}: no {MANIFEST}; prepare the data first with `babyllama data pretrain`")
    manifest = json.loads(path.read_text(encoding="utf-8"))
    if manifest.get("format") != FORMAT:
        raise DataError(f"{path}: unknown format {manifest.get('format')!r} (expected {FORMAT})")
    return manifest
