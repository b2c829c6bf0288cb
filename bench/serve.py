"""`babyllama serve` under load on loopback: throughput and latency with 1, 8 and 32 concurrent
clients against the same model served one request at a time, llama.cpp's own server on the GGUF
export when its binary is given, and a memory soak.

Each client is an asyncio task with its own connection that sends streamed chat requests one after
another (a question from a fixed set of 16, `max_tokens` 64, temperature 0.8, a seed per request),
and records the time to the first token and to the end. Throughput is completion tokens (the
server's usage count) per second of wall time over the whole level. Rows:

- `babyllama serve --max-batch 32` at 1, 8 and 32 clients;
- `--max-batch 1` at 32 clients: the same server decoding one request at a time (the baseline);
- llama.cpp's `llama-server` on the f32 GGUF of the same model (`--llama-server PATH`; built from
  llama-cpp-python's vendored source, `--parallel 32` slots, continuous batching), same clients.

The soak (`--soak SECONDS`) runs `babyllama serve` with a mixed crowd for that long: clients that
stream whole replies, clients that disconnect after a few tokens, clients sending bad requests
(malformed JSON, unknown model, a prompt longer than the context, max_tokens out of range, a
wrong key), and prints the server's resident memory every 30 s.

    python -m bench.serve [--ckpt RUN] [--threads N] [--requests N] [--soak SECONDS [--soak-only]] [--llama-server PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

from bench.common import ROOT, markdown_table

QUESTIONS = ["你好", "今天天气怎么样？", "推荐一本书", "这家店的服务怎么样", "物流快不快", "价格便宜吗", "质量好吗",
             "介绍一下北京", "写一首诗", "什么是人工智能", "如何学习编程", "讲个故事", "明天会下雨吗",
             "你喜欢什么", "中国的首都是哪里", "谢谢你"]
MAX_TOKENS = 64
KEY = "bench-key"


def default_ckpt() -> Path:
    for run in (ROOT / "runs/bench/quant/original", ROOT / "runs/demo/sft"):
        if (run / "checkpoints").is_dir():
            return run
    sys.exit("no model: run `make demo` (or `python -m bench.quant`) first, or pass --ckpt")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ours(ckpt: Path, max_batch: int, threads: int, max_queue: int = 256) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "babyllama", "serve", "--ckpt", str(ckpt), "--port", str(port), "--api-key", KEY,
           "--max-batch", str(max_batch), "--max-queue", str(max_queue), "--threads", str(threads),
           "--model-name", "m"]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), f"http://127.0.0.1:{port}"


def start_llama_server(binary: str, gguf: Path, threads: int, slots: int, context: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [binary, "-m", str(gguf), "--port", str(port), "--api-key", KEY, "-t", str(threads), "-tb", str(threads),
           "--parallel", str(slots), "-c", str(context * slots), "--alias", "m", "--jinja", "--no-webui"]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), f"http://127.0.0.1:{port}"


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited ({proc.returncode})")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError("the server did not start")


def rss_mb(pid: int) -> float:
    import psutil

    return psutil.Process(pid).memory_info().rss / 2**20


async def one_request(client, url: str, i: int) -> dict:
    body = {"model": "m", "messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}], "stream": True,
            "max_tokens": MAX_TOKENS, "temperature": 0.8, "seed": i, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first, tokens = None, 0
    async with client.stream("POST", url + "/v1/chat/completions", json=body,
                             headers={"Authorization": f"Bearer {KEY}"}) as response:
        if response.status_code != 200:
            return {"ok": False, "status": response.status_code}
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            if first is None and event.get("choices") and event["choices"][0].get("delta", {}).get("content"):
                first = time.perf_counter() - start
    total = time.perf_counter() - start
    return {"ok": True, "ttft": first if first is not None else total, "total": total, "tokens": tokens}


async def load(url: str, clients: int, requests: int) -> dict:
    import httpx

    counter = iter(range(requests))
    results = []

    async def client_loop():
        async with httpx.AsyncClient(timeout=600) as client:
            for i in counter:
                try:
                    results.append(await one_request(client, url, i))
                except Exception as err:  # a failed request is a result, not the end of the bench
                    results.append({"ok": False, "status": f"{type(err).__name__}: {str(err)[:80]}"})

    start = time.perf_counter()
    await asyncio.gather(*(client_loop() for _ in range(clients)))
    wall = time.perf_counter() - start
    ok = [r for r in results if r["ok"]]

    def pct(key, q):
        values = sorted(r[key] for r in ok)
        return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")

    return {"requests": len(results), "failed": len(results) - len(ok), "wall": wall,
            "why": sorted({str(r["status"]) for r in results if not r["ok"]}),
            "tok_s": sum(r["tokens"] for r in ok) / wall, "ttft_p50": pct("ttft", 0.5), "ttft_p99": pct("ttft", 0.99),
            "total_p50": pct("total", 0.5), "total_p99": pct("total", 0.99)}


def measure(name: str, start, levels: list[int], requests: int, log) -> list[dict]:
    proc, url = start()
    try:
        wait_ready(url, proc)
        asyncio.run(load(url, 1, 2))  # warm-up (first-call costs: kernels, allocations)
        rows = []
        for clients in levels:
            log(f"{name}: {clients} clients")
            r = asyncio.run(load(url, clients, max(requests, 2 * clients) if clients > 1 else max(4, requests // 4)))
            r.update(name=name, clients=clients, rss=rss_mb(proc.pid))
            rows.append(r)
        return rows
    finally:
        proc.terminate()
        proc.wait(30)


async def soak(url: str, seconds: float, pid: int, log) -> list[tuple[float, float]]:
    """A mixed crowd for `seconds`: (elapsed s, server RSS MB) every 30 s."""
    import httpx

    end = time.time() + seconds
    curve: list[tuple[float, float]] = []
    counts = {"ok": 0, "cut": 0, "bad": 0, "unexpected": 0}
    head = {"Authorization": f"Bearer {KEY}"}
    bad = [(b"{not json", 400), (json.dumps({"model": "nope", "messages": [{"role": "user", "content": "x"}]}), 404),
           (json.dumps({"model": "m", "messages": [{"role": "user", "content": "长" * 5000}]}), 400),
           (json.dumps({"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}), 400)]

    async def streamer(client, rng):
        while time.time() < end:
            r = await one_request(client, url, rng.randrange(1000))
            counts["ok" if r["ok"] else "unexpected"] += 1

    async def quitter(client, rng):
        while time.time() < end:
            body = {"model": "m", "messages": [{"role": "user", "content": rng.choice(QUESTIONS)}], "stream": True,
                    "max_tokens": MAX_TOKENS, "temperature": 1.0}
            async with client.stream("POST", url + "/v1/chat/completions", json=body, headers=head) as response:
                n = 0
                async for _ in response.aiter_lines():
                    n += 1
                    if n > rng.randrange(2, 12):
                        break  # leave mid-reply
            counts["cut"] += 1

    async def vandal(client, rng):
        while time.time() < end:
            content, status = rng.choice(bad)
            key = head if rng.random() < 0.8 else {"Authorization": "Bearer wrong"}
            r = await client.post(url + "/v1/chat/completions", content=content,
                                  headers={**key, "Content-Type": "application/json"})
            expected = status if key is head else 401
            counts["bad" if r.status_code == expected and "error" in r.json() else "unexpected"] += 1
            await asyncio.sleep(0.05)

    async def sampler():
        start = time.time()
        while time.time() < end:
            curve.append((time.time() - start, rss_mb(pid)))
            log(f"soak {curve[-1][0]:.0f} s: RSS {curve[-1][1]:.0f} MB, {counts}")
            await asyncio.sleep(max(0.0, min(30.0, end - time.time())))
        curve.append((time.time() - start, rss_mb(pid)))

    async with httpx.AsyncClient(timeout=600) as client:
        rngs = [random.Random(i) for i in range(12)]
        await asyncio.gather(*(streamer(client, rngs[i]) for i in range(6)), *(quitter(client, rngs[6 + i]) for i in range(4)),
                             *(vandal(client, rngs[10 + i]) for i in range(2)), sampler())
    return curve, counts


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.serve", description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", type=Path)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--requests", type=int, default=64, help="requests per level with several clients (default 64)")
    p.add_argument("--soak", type=float, default=0, help="seconds of the memory soak (0: none)")
    p.add_argument("--llama-server", help="path of llama.cpp's llama-server binary, to serve the GGUF export too")
    p.add_argument("--soak-only", action="store_true", help="skip the throughput table")
    args = p.parse_args()
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    ckpt = args.ckpt or default_ckpt()
    if not args.soak_only:
        table(ckpt, args, log)
    if args.soak:
        soak_table(ckpt, args, log)


def table(ckpt: Path, args, log) -> None:
    rows = []
    rows += measure("babyllama serve, --max-batch 32", lambda: start_ours(ckpt, 32, args.threads), [1, 8, 32],
                    args.requests, log)
    rows += measure("babyllama serve, --max-batch 1", lambda: start_ours(ckpt, 1, args.threads), [32],
                    args.requests, log)
    if args.llama_server:
        gguf = ROOT / "runs" / "bench" / "serve" / f"{ckpt.name}-f32.gguf"
        gguf.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "babyllama", "export", "--ckpt", str(ckpt), "--format", "gguf",
                        "--type", "f32", "--out", str(gguf), "--overwrite"], cwd=ROOT, check=True, capture_output=True)
        from babyllama.checkpoint import find_checkpoint, read_model_config

        context = read_model_config(find_checkpoint(ckpt)).max_seq_len
        rows += measure("llama.cpp llama-server (f32 GGUF), --parallel 32",
                        lambda: start_llama_server(args.llama_server, gguf, args.threads, 32, context), [1, 8, 32],
                        args.requests, log)
    sequential = next(r["tok_s"] for r in rows if r["name"].endswith("--max-batch 1"))
    table = markdown_table(
        ["server", "clients", "requests (failed)", "tok/s (vs one at a time)", "TTFT p50 / p99 s", "total p50 / p99 s",
         "server RSS MB"],
        [[r["name"], r["clients"], f"{r['requests']} ({r['failed']})", f"{r['tok_s']:.1f} ({r['tok_s'] / sequential:.2f}x)",
          f"{r['ttft_p50']:.2f} / {r['ttft_p99']:.2f}", f"{r['total_p50']:.2f} / {r['total_p99']:.2f}",
          f"{r['rss']:.0f}"] for r in rows])
    print(f"### Serving ({ckpt}, {os.cpu_count()} CPUs, {args.threads} threads, streamed chat, max_tokens "
          f"{MAX_TOKENS}, temperature 0.8)\n\n{table}\n")
    for r in rows:
        if r["failed"]:
            print(f"- failed, {r['name']} at {r['clients']} clients: {'; '.join(r['why'])}")


def soak_table(ckpt: Path, args, log) -> None:
    proc, url = start_ours(ckpt, 32, args.threads)
    try:
        wait_ready(url, proc)
        curve, counts = asyncio.run(soak(url, args.soak, proc.pid, log))
        alive = proc.poll() is None
    finally:
        proc.terminate()
        proc.wait(30)
    print(f"### Soak: {args.soak:.0f} s, 6 streaming clients, 4 leaving mid-reply, 2 sending bad requests "
          f"(server alive at the end: {alive}; {counts})\n")
    print(markdown_table(["elapsed s", "server RSS MB"], [[f"{t:.0f}", f"{m:.0f}"] for t, m in curve]))


if __name__ == "__main__":
    main()
