"""One evaluation result (a RUN/eval/*.json) as report blocks and as a one-line headline.

Each `kind` the evaluations write has its renderer: "perplexity" (`babyllama eval ppl`), "mc"
(multiple choice), "gen" (generation), "pref" (preference accuracy) and "longctx" (bench/longctx.py's
perplexity-by-length table). Any other kind, or a file of a known kind missing the
fields its renderer reads, is shown generically (its scalar fields as a table): an evaluation added
later, or written by an older version, never breaks a report.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from babyllama.report.document import Block, Heading, Image, Para, Table
from babyllama.report.format import number, percent

SCALARS = (str, int, float, bool, type(None))


def eval_blocks(entry: dict, latest_checkpoint: str | None) -> list[Block]:
    """A heading and the result's tables (`entry` as collect.read_evals gives it)."""
    blocks: list[Block] = [Heading(f"{entry['name']} ({entry['kind']})", 3)]
    if "error" in entry:
        return blocks + [Para(entry["error"], muted=True)]
    result = entry["result"]
    if isinstance(result.get("image"), str) and entry.get("file"):  # a figure named beside its JSON
        result = dict(result, image=str(Path(entry["file"]).parent / result["image"]))
    blocks += _checkpoint_note(result, latest_checkpoint)
    renderer = RENDERERS.get(entry["kind"])
    if renderer is not None:
        try:
            return blocks + renderer(result)
        except (KeyError, TypeError, ValueError, AttributeError):
            blocks.append(Para(f"{Path(entry['file']).name} lacks fields a {entry['kind']} result has; "
                               f"its values as they are:", muted=True))
    return blocks + generic_blocks(result)


def headline(entry: dict) -> str:
    """The figure a comparison table shows for this evaluation."""
    if "error" in entry:
        return "unreadable"
    try:
        return HEADLINES.get(entry["kind"], _generic_headline)(entry["result"])
    except (KeyError, TypeError, ValueError, AttributeError, IndexError):
        return _generic_headline(entry["result"])


def _checkpoint_note(result: dict, latest: str | None) -> list[Block]:
    """Which checkpoint was measured; flagged when the run has trained on since."""
    ckpt = result.get("checkpoint")
    if not isinstance(ckpt, str) or not ckpt:
        return []
    name = Path(ckpt).name
    stale = f" (not the latest checkpoint, {latest}: the run has trained on since)" if latest and name != latest else ""
    return [Para(f"checkpoint `{name}`{stale}", muted=not stale)]


# --- perplexity -------------------------------------------------------------------------------------

def _perplexity_blocks(result: dict) -> list[Block]:
    data = ", ".join(result.get("data") or []) or "?"
    intro = (f"{number(result.get('stream_tokens'))} tokens ({number(result.get('characters'))} characters) of "
             f"`{data}`, split {result.get('split', '?')}; trained context {result.get('trained_length', '?')}")
    rows = [[f"{r['length']}{' *' if r.get('beyond_trained') else ''}", r.get("stride", ""), number(r["tokens"]),
             number(r["loss"]), number(r["perplexity"]), number(r["bits_per_char"]), number(r["bits_per_byte"])]
            for r in result["results"]]
    blocks: list[Block] = [Para(intro), Table(["length", "stride", "scored tokens", "loss", "perplexity",
                                               "bits/char", "bits/byte"], rows)]
    if any(r.get("beyond_trained") for r in result["results"]):
        rope = result.get("rope_scaling") or {"kind": "none"}
        how = "rotary angles extrapolated, no scaling" if rope["kind"] == "none" else \
            f"RoPE scaling {rope['kind']} x{number(rope.get('factor'))}"
        blocks.append(Para(f"* past the trained context ({how})", muted=True))
    return blocks


def _perplexity_headline(result: dict) -> str:
    rows = result["results"]
    row = next((r for r in rows if r["length"] == result.get("trained_length")), rows[0])
    return f"ppl {number(row['perplexity'])}, {number(row['bits_per_char'])} bits/char @ {row['length']}"


# --- long context (bench/longctx.py) ------------------------------------------------------------------

def _longctx_blocks(result: dict) -> list[Block]:
    lengths = result["lengths"]
    blocks: list[Block] = [Para(
        f"Perplexity of `{', '.join(result.get('data') or [])}` ({number(result.get('stream_tokens'))} tokens, "
        f"the same at every length) by context length, for a model trained at {result['trained_length']} "
        f"positions; * past it. Fine-tunes: {result.get('finetune_note', '')}")]
    headers = ["method", "fine-tuned"] + [f"{n}{' *' if n > result['trained_length'] else ''}" for n in lengths]
    rows = [[r["method"], r["stage"]] + [number(r["perplexity"].get(str(n))) for n in lengths] for r in result["rows"]]
    blocks.append(Table(headers, rows))
    if result.get("s2"):
        blocks.append(Para("Training step of the fine-tune with LongLoRA's shifted sparse attention against full "
                           "attention (same model and adapters; time per step and peak memory of the process):"))
        blocks.append(Table(["model", "length", "attention", "group", "step (s)", "tokens/s", "peak memory (MB)"],
                            [[r.get("shape", ""), r["length"], r["attention"], r.get("group") or "", number(r["step_s"]),
                              number(r["tokens_per_s"]), number(r["peak_mb"])] for r in result["s2"]]))
    image = Path(result.get("image") or "")
    if image.suffix == ".png" and image.is_file():
        blocks.append(Image(image, "perplexity by context length"))
    return blocks


def _longctx_headline(result: dict) -> str:
    far = max(result["lengths"])
    best = min(result["rows"], key=lambda r: r["perplexity"].get(str(far), float("inf")))
    return f"best @ {far}: {best['method']} ({best['stage']}) ppl {number(best['perplexity'].get(str(far)))}"


# --- multiple choice --------------------------------------------------------------------------------

def _ci(stats: dict) -> str:
    low, high = stats.get("ci95") or (None, None)
    return f"{percent(low)} – {percent(high)}" if low is not None else ""


def _mc_row(name: str, stats: dict, *extra: object) -> list[object]:
    return [name, *extra, percent(stats["accuracy"]), f"{number(stats['correct'])} / {number(stats['total'])}",
            percent(stats.get("chance")), _ci(stats)]


def _mc_blocks(result: dict) -> list[Block]:
    # the per-question "predictions" stay in the JSON: thousands of rows are no report
    setting = ", ".join(f"{key} {result[key]}" for key in ("benchmark", "split", "shots", "score", "truncated")
                        if key in result)
    headers = ["accuracy", "correct / total", "chance", "95% CI"]
    blocks: list[Block] = [Para(setting)] if setting else []
    blocks.append(Table(["", *headers], [_mc_row("overall", result["overall"])]))
    categories = result.get("categories") or {}
    if categories:
        blocks.append(Table(["category", *headers], [_mc_row(n, s) for n, s in sorted(categories.items())]))
    subjects = result.get("subjects") or {}
    if subjects:
        rows = [_mc_row(n, s, s.get("category", "")) for n, s in sorted(subjects.items())]
        blocks.append(Table(["subject", "category", *headers], rows))
    return blocks


def _mc_headline(result: dict) -> str:
    overall = result["overall"]
    return f"accuracy {percent(overall['accuracy'])} (chance {percent(overall.get('chance'))})"


# --- generation -------------------------------------------------------------------------------------

GEN_HEADLINE = ("bleu", "rouge_l", "exact_match")


def _gen_blocks(result: dict) -> list[Block]:
    metrics = result["metrics"]
    rows = [[key, number(value)] for key, value in metrics.items() if isinstance(value, SCALARS)]
    facts = [f"{number(result['samples'])} samples" if "samples" in result else "",
             f"of `{', '.join(map(str, result['data']))}`" if isinstance(result.get("data"), list) else "",
             f"at most {result['max_new_tokens']} new tokens" if "max_new_tokens" in result else "",
             f"{number(result['prompts_cut'])} prompts cut to fit" if result.get("prompts_cut") else "",
             f"outputs in `{result['outputs']}`" if result.get("outputs") else ""]
    blocks: list[Block] = [Para(", ".join(f for f in facts if f))] if any(facts) else []
    return blocks + [Table(["metric", "value"], rows)]


def _gen_headline(result: dict) -> str:
    metrics = result["metrics"]
    shown = [f"{key} {number(metrics[key])}" for key in GEN_HEADLINE if isinstance(metrics.get(key), (int, float))]
    return ", ".join(shown) or _generic_headline(metrics)


def sample_rows(entry: dict) -> list[list[str]]:
    """(prompt, answer, reference) of the generations shown for a generation evaluation."""
    return [[_prompt_text(s.get("prompt")), _text(s.get("answer")), _text(s.get("reference"))]
            for s in entry.get("samples") or [] if isinstance(s, dict)]


def _prompt_text(prompt: object) -> str:
    """A prompt as text: plain, or a conversation ([{"role", "content"}, ...]) one turn a line."""
    if isinstance(prompt, list):
        return "\n".join(f"{m.get('role', '?')}: {m.get('content', '')}" if isinstance(m, dict) else str(m)
                         for m in prompt)
    return _text(prompt)


def _text(value: object) -> str:
    return "" if value is None else str(value)


# --- preference accuracy (`babyllama eval pref`) ----------------------------------------------------

def _pref_blocks(result: dict) -> list[Block]:
    m = result["metrics"]
    data = f" of `{', '.join(map(str, result['data']))}`" if isinstance(result.get("data"), list) else ""
    return [Para(f"{number(result['pairs'])} pairs{data}: the chosen reply the likelier one (summed log-probs, "
                 f"and per token)"),
            Table(["metric", "value"], [["accuracy", percent(m["accuracy"])],
                                        ["accuracy per token", percent(m["accuracy_per_token"])],
                                        ["mean margin (nats)", number(m["mean_margin"])]])]


def _pref_headline(result: dict) -> str:
    m = result["metrics"]
    return f"accuracy {percent(m['accuracy'])} ({percent(m['accuracy_per_token'])} per token), {number(result['pairs'])} pairs"


# --- anything else ----------------------------------------------------------------------------------

def flatten_scalars(value: dict, prefix: str = "") -> list[tuple[str, object]]:
    """(dotted key, value) for the scalars of a result, nested objects included; lists are counted."""
    out = []
    for key, item in value.items():
        name = f"{prefix}{key}"
        if key == "kind" and not prefix:
            continue
        if isinstance(item, dict):
            out += flatten_scalars(item, f"{name}.")
        elif isinstance(item, list):
            scalars = all(isinstance(x, SCALARS) for x in item)
            shown = (", ".join(map(str, item)) or "none") if scalars and len(item) <= 8 else f"a list of {len(item)}"
            out.append((name, shown))
        else:
            out.append((name, item))
    return out


def generic_blocks(result: dict) -> list[Block]:
    rows = [[key, number(value)] for key, value in flatten_scalars(result)]
    return [Table(["field", "value"], rows)] if rows else [Para("(no fields)", muted=True)]


def _generic_headline(result: dict) -> str:
    numeric = [(k, v) for k, v in flatten_scalars(result) if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return ", ".join(f"{k} {number(v)}" for k, v in numeric[:3]) or "see the report"


RENDERERS: dict[str, Callable[[dict], list[Block]]] = {
    "perplexity": _perplexity_blocks, "mc": _mc_blocks, "gen": _gen_blocks, "pref": _pref_blocks,
    "longctx": _longctx_blocks}
HEADLINES: dict[str, Callable[[dict], str]] = {
    "perplexity": _perplexity_headline, "mc": _mc_headline, "gen": _gen_headline, "pref": _pref_headline,
    "longctx": _longctx_headline}
