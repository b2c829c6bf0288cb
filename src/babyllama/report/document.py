"""A report as a list of blocks, and the two ways it is written out: Markdown and self-contained HTML.

The sections are built once as blocks (headings, paragraphs, tables, images, code) and rendered
twice, so the Markdown and the HTML copy can never disagree about what a report holds. Markdown
points at the PNG files beside it; HTML embeds them as base64 data URIs and inlines its CSS, so the
one file can be mailed or opened anywhere without the run directory.
"""

from __future__ import annotations

import base64
import html
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence, Union

MARKER = "babyllama report"  # in every file the report writes: what it may later replace


@dataclass
class Heading:
    text: str
    level: int = 2
    anchor: str = ""  # the HTML id; sections get one so the table of contents can link them


@dataclass
class Para:
    text: str  # plain text with `code` spans and **bold**
    muted: bool = False  # a note rather than a finding


@dataclass
class Table:
    headers: Sequence[str]
    rows: Sequence[Sequence[object]]


@dataclass
class Image:
    path: Path  # a PNG file
    alt: str


@dataclass
class Code:
    text: str
    language: str = ""


@dataclass
class Markdown:
    """Markdown written by a caller (an extra section): passed through to the .md, converted for HTML."""

    text: str


Block = Union[Heading, Para, Table, Image, Code, Markdown]


@dataclass
class Section:
    """An extra section a Python caller adds to a report (the demo's learning curve and its table).

    `markdown`: paragraphs, `- ` lists, pipe tables, `code`, **bold**, fenced code; `images`: PNG
    files (the Markdown refers to them where they are, the HTML embeds them); `table`: optional
    (headers, rows), rendered like the report's own tables."""

    title: str
    markdown: str = ""
    images: Sequence[str | Path] = ()
    table: tuple[Sequence[str], Sequence[Sequence[object]]] | None = None

    def blocks(self) -> list[Block]:
        out: list[Block] = [Heading(self.title, 2, anchor=slug(self.title))]
        if self.markdown.strip():
            out.append(Markdown(self.markdown))
        if self.table is not None:
            out.append(Table(*self.table))
        out += [Image(Path(p), Path(p).stem) for p in self.images]
        return out


def slug(text: str) -> str:
    """An HTML id from a heading (Chinese characters kept: ids may hold any non-space character)."""
    return re.sub(r"[^\w-]+", "-", text.strip().lower()).strip("-") or "section"


# --- Markdown ---------------------------------------------------------------------------------------

def _md_cell(value: object) -> str:
    # a pipe or a line break would end the cell or the row; <br> is what GitHub's tables accept
    return str(value).replace("|", "\\|").replace("\r", "").replace("\n", "<br>")


def _md_block(block: Block, base: Path) -> str:
    if isinstance(block, Heading):
        return f"{'#' * block.level} {block.text}"
    if isinstance(block, Para):
        return f"*{block.text}*" if block.muted else block.text
    if isinstance(block, Table):
        lines = ["| " + " | ".join(_md_cell(h) for h in block.headers) + " |",
                 "|" + "|".join("---" for _ in block.headers) + "|"]
        lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in block.rows]
        return "\n".join(lines)
    if isinstance(block, Image):
        return f"![{block.alt}]({Path(os.path.relpath(block.path, base)).as_posix()})"
    if isinstance(block, Code):
        fence = "````" if "```" in block.text else "```"
        return f"{fence}{block.language}\n{block.text.rstrip()}\n{fence}"
    return block.text.strip()


def to_markdown(title: str, blocks: Sequence[Block], base: Path) -> str:
    """The report as Markdown; image links are relative to `base`, the directory of the .md file."""
    parts = [f"<!-- written by {MARKER}: rewritten each time; edits here are lost -->", f"# {title}"]
    parts += [_md_block(b, base) for b in blocks]
    return "\n\n".join(parts) + "\n"


# --- HTML -------------------------------------------------------------------------------------------

CSS = """
body { margin: 0; background: #f6f7f9; color: #1f2328;
       font: 15px/1.55 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, "Noto Sans CJK SC",
             "Noto Sans SC", "Source Han Sans SC", "PingFang SC", "Hiragino Sans GB", "Microsoft YaHei",
             "WenQuanYi Micro Hei", sans-serif; }
main { max-width: 1080px; margin: 0 auto; padding: 24px 32px 48px; background: #fff; }
h1 { font-size: 1.7em; margin: 0.2em 0 0.4em; }
h2 { font-size: 1.3em; margin-top: 1.8em; padding-bottom: 0.25em; border-bottom: 1px solid #d8dee4; }
h3 { font-size: 1.08em; margin-top: 1.4em; }
nav { font-size: 0.92em; margin-bottom: 1em; }
nav a { margin-right: 0.9em; white-space: nowrap; }
a { color: #0969da; text-decoration: none; }
.muted { color: #59636e; }
.table-wrap { overflow-x: auto; margin: 0.6em 0 1em; }
table { border-collapse: collapse; font-size: 0.92em; }
th, td { border: 1px solid #d8dee4; padding: 4px 10px; text-align: left; vertical-align: top;
         max-width: 420px; overflow-wrap: anywhere; }
th, table.kv td:first-child { background: #f0f2f4; font-weight: 600; white-space: nowrap; }
tr:nth-child(even) td { background: #fafbfc; }
code { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, "Noto Sans Mono CJK SC", monospace;
       font-size: 0.9em; background: #eff1f3; padding: 1px 4px; border-radius: 4px; }
pre { background: #f6f8fa; border: 1px solid #d8dee4; border-radius: 6px; padding: 10px 14px;
      overflow-x: auto; font-size: 0.88em; line-height: 1.45; }
pre code { background: none; padding: 0; }
pre.columns { column-count: 2; column-gap: 3em; }
@media (max-width: 720px) { pre.columns { column-count: 1; } main { padding: 12px; } }
figure { margin: 0.8em 0 1.2em; }
figure img { max-width: 100%; height: auto; border: 1px solid #e4e8ec; }
figcaption { font-size: 0.85em; color: #59636e; }
"""


def _inline(text: str) -> str:
    """Escaped text with `code` spans and **bold** (the only inline Markdown the report writes)."""
    out = []
    for i, part in enumerate(re.split(r"(`[^`]*`)", text)):
        if i % 2:
            out.append(f"<code>{html.escape(part[1:-1])}</code>")
        else:
            out.append(re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", html.escape(part)))
    return "".join(out)


def _data_uri(png: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(png).read_bytes()).decode("ascii")


def _html_table(headers: Sequence[object], rows: Sequence[Sequence[object]]) -> str:
    # a key-value table has no header worth a row (Markdown needs one, so it is empty there)
    head = "".join(f"<th>{_inline(str(h))}</th>" for h in headers) if any(str(h) for h in headers) else ""
    thead = f"<thead><tr>{head}</tr></thead>" if head else ""
    body = "".join("<tr>" + "".join(f"<td>{_cell_html(c)}</td>" for c in row) + "</tr>" for row in rows)
    kind = "" if head else ' class="kv"'
    return f'<div class="table-wrap"><table{kind}>{thead}<tbody>{body}</tbody></table></div>'


def _cell_html(value: object) -> str:
    return "<br>".join(_inline(line) for line in str(value).split("\n"))


def _html_block(block: Block) -> str:
    if isinstance(block, Heading):
        anchor = f' id="{html.escape(block.anchor)}"' if block.anchor else ""
        return f"<h{block.level}{anchor}>{html.escape(block.text)}</h{block.level}>"
    if isinstance(block, Para):
        return f'<p class="muted">{_inline(block.text)}</p>' if block.muted else f"<p>{_inline(block.text)}</p>"
    if isinstance(block, Table):
        return _html_table(block.headers, block.rows)
    if isinstance(block, Image):
        alt = html.escape(block.alt)
        return f'<figure><img src="{_data_uri(block.path)}" alt="{alt}"><figcaption>{alt}</figcaption></figure>'
    if isinstance(block, Code):
        # a long config reads better in two columns than as one tall strip
        wide = ' class="columns"' if block.text.count("\n") > 30 else ""
        return f"<pre{wide}><code>{html.escape(block.text.rstrip())}</code></pre>"
    return markdown_to_html(block.text)


def to_html(title: str, blocks: Sequence[Block], subtitle: str = "") -> str:
    """One self-contained page: inline CSS, images as data URIs, a table of contents of the sections."""
    toc = " ".join(f'<a href="#{html.escape(b.anchor)}">{html.escape(b.text)}</a>'
                   for b in blocks if isinstance(b, Heading) and b.level == 2 and b.anchor)
    body = "\n".join(_html_block(b) for b in blocks)
    sub = f'<p class="muted">{_inline(subtitle)}</p>' if subtitle else ""
    return (f'<!DOCTYPE html>\n<html lang="zh-CN">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f'<meta name="generator" content="{MARKER}">\n<title>{html.escape(title)}</title>\n'
            f"<style>{CSS}</style>\n</head>\n<body>\n<main>\n<h1>{html.escape(title)}</h1>\n{sub}\n"
            f"<nav>{toc}</nav>\n{body}\n</main>\n</body>\n</html>\n")


# --- the Markdown a caller writes, as HTML ----------------------------------------------------------

def markdown_to_html(text: str) -> str:
    """The small Markdown subset an extra section may use: paragraphs, `- ` lists, pipe tables,
    fenced code, `code` and **bold**. Anything else shows as its text, escaped (never as markup)."""
    out, lines, i = [], text.strip("\n").splitlines(), 0
    while i < len(lines):
        line = lines[i]
        if not line.strip():
            i += 1
        elif line.lstrip().startswith("```"):
            end = next((j for j in range(i + 1, len(lines)) if lines[j].lstrip().startswith("```")), len(lines))
            out.append(f"<pre><code>{html.escape(chr(10).join(lines[i + 1:end]))}</code></pre>")
            i = end + 1
        elif line.lstrip().startswith("|"):
            i = _pipe_table(lines, i, out)
        elif re.match(r"\s*[-*] ", line):
            items = []
            while i < len(lines) and re.match(r"\s*[-*] ", lines[i]):
                items.append(f"<li>{_inline(lines[i].lstrip()[2:])}</li>")
                i += 1
            out.append(f"<ul>{''.join(items)}</ul>")
        else:
            para = []
            while i < len(lines) and lines[i].strip() and not re.match(r"\s*([-*] |\||```)", lines[i]):
                para.append(lines[i].strip())
                i += 1
            out.append(f"<p>{_inline(' '.join(para))}</p>")
    return "\n".join(out)


def _pipe_table(lines: list[str], i: int, out: list[str]) -> int:
    rows = []
    while i < len(lines) and lines[i].lstrip().startswith("|"):
        cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", lines[i].strip().strip("|"))]
        if not all(re.fullmatch(r":?-+:?", c) for c in cells):  # the header's underline
            rows.append(cells)
        i += 1
    if rows:
        out.append(_html_table(rows[0], rows[1:]))
    return i


__all__ = ["Block", "Code", "Heading", "Image", "MARKER", "Markdown", "Para", "Section", "Table", "markdown_to_html",
           "slug", "to_html", "to_markdown"]
