"""One document, two renderings: every report is built once as blocks and written as markdown and HTML.

Hand-writing both formats let them drift apart (a note or a bold name showed as raw markdown in the
HTML, a row of figures ran off the page), so the reports describe *what* they say with the blocks below
and these renderers own *how*. Text inside blocks is a small, fixed subset of markdown (``**bold**``,
backtick code spans, ``[text](href)`` and backslash escapes of those characters) because that subset
is what the reports and the strings they quote (verdict recipes, claim texts) already use. The markdown
renderer passes it through; the HTML renderer converts it, so no markdown syntax reaches a browser.
Values that come from outside (run names, paths, warnings) go through `esc` or `code` so they stay
literal.

No markdown library: the subset is small, the output must be byte-stable for tests, and the report
layer should run wherever the package does.
"""

from __future__ import annotations

import html
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "Block",
    "Bullets",
    "Document",
    "Figure",
    "Figures",
    "Heading",
    "Note",
    "Paragraph",
    "Table",
    "code",
    "esc",
    "inline_html",
    "to_html",
    "to_markdown",
    "write_document",
]


@dataclass(frozen=True)
class Heading:
    text: str
    level: int = 2


@dataclass(frozen=True)
class Paragraph:
    text: str


@dataclass(frozen=True)
class Bullets:
    items: Sequence[str]


@dataclass(frozen=True)
class Table:
    """`colours` maps an exact cell text to a CSS colour (the lab's status words); `numeric` right-aligns
    every column but the first, for tables of numbers."""

    header: Sequence[str]
    rows: Sequence[Sequence[str]]
    colours: Mapping[str, str] = field(default_factory=dict)
    numeric: bool = False


@dataclass(frozen=True)
class Note:
    """A caveat that must stand out from the verdicts around it (a blockquote in markdown)."""

    text: str
    label: str = "note"


@dataclass(frozen=True)
class Figure:
    """`src` is relative to the report, so the directory can be moved or served as is. A `wide` figure
    (a grid of panels) takes a row of its own: next to another plot it would shrink below legibility."""

    src: str
    alt: str
    wide: bool = False


@dataclass(frozen=True)
class Figures:
    """Figures side by side where the page is wide enough, wrapping (and scaling down) where it is not."""

    items: Sequence[Figure]


Block = Heading | Paragraph | Bullets | Table | Note | Figures
Document = Sequence[Block]

# ----------------------------------------------------------------------------------------------------
# Inline text

_ESCAPABLE = "\\`*[]()"
_LINK = re.compile(r"\[((?:\\.|[^\]\\])*)\]\(([^)\s]*)\)")
_SAFE_HREF = re.compile(r"^(?![a-zA-Z][a-zA-Z0-9+.-]*:)|^(?:https?|mailto|file):", re.IGNORECASE)


def esc(text: str) -> str:
    """Make outside text literal: its backticks, asterisks and link-shaped brackets never become formatting.

    Only what this renderer would read as markup is escaped, so paths and metric names stay readable in
    the markdown source.
    """
    text = str(text)
    out: list[str] = []
    for i, c in enumerate(text):
        if c in "`*" or (c == "\\" and text[i + 1 : i + 2] in _ESCAPABLE and i + 1 < len(text)):
            out.append("\\" + c)
        elif c == "[" and _LINK.match(text, i):
            out.append("\\[")
        else:
            out.append(c)
    return "".join(out)


def code(text: str) -> str:
    """A code span around arbitrary text; the fence is longer than any backtick run inside it."""
    text = str(text)
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    fence = "`" * (longest + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def inline_html(text: str) -> str:
    """The inline subset as escaped HTML; anything that does not parse as markup stays literal text."""
    out: list[str] = []
    buf: list[str] = []
    i, n = 0, len(text)

    def flush() -> None:
        if buf:
            out.append(html.escape("".join(buf), quote=False))
            buf.clear()

    while i < n:
        c = text[i]
        if c == "\\" and i + 1 < n and text[i + 1] in _ESCAPABLE:
            buf.append(text[i + 1])
            i += 2
            continue
        if c == "`":
            run = len(text[i:]) - len(text[i:].lstrip("`"))
            close = re.compile(f"(?<!`){'`' * run}(?!`)").search(text, i + run)
            if close is not None:
                flush()
                body = text[i + run : close.start()].replace("\n", " ")
                if body.startswith(" ") and body.endswith(" ") and body.strip():
                    body = body[1:-1]
                out.append(f"<code>{html.escape(body, quote=False)}</code>")
                i = close.end()
                continue
            buf.append("`" * run)
            i += run
            continue
        if text.startswith("**", i):
            end = _find_unescaped(text, "**", i + 2)
            if end > i + 2:
                flush()
                out.append(f"<strong>{inline_html(text[i + 2 : end])}</strong>")
                i = end + 2
                continue
            buf.append("**")
            i += 2
            continue
        if c == "[" and (m := _LINK.match(text, i)) is not None:
            flush()
            label, href = inline_html(m.group(1)), m.group(2)
            if _SAFE_HREF.match(href):
                out.append(f'<a href="{html.escape(href)}">{label}</a>')
            else:
                out.append(label)
            i = m.end()
            continue
        buf.append(c)
        i += 1
    flush()
    return "".join(out)


def _find_unescaped(text: str, token: str, start: int) -> int:
    """Index of the next `token` outside code spans and backslash escapes, or -1."""
    i = start
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text):
            i += 2
        elif text[i] == "`":
            run = len(text[i:]) - len(text[i:].lstrip("`"))
            close = re.compile(f"(?<!`){'`' * run}(?!`)").search(text, i + run)
            i = close.end() if close is not None else i + run
        elif text.startswith(token, i):
            return i
        else:
            i += 1
    return -1


# ----------------------------------------------------------------------------------------------------
# Markdown


def _present(doc: Document) -> list[Block]:
    """The blocks that show something: a figure row whose plots were all skipped leaves no gap."""
    return [b for b in doc if not (isinstance(b, Figures) and not b.items)]


def _one_line(text: str) -> str:
    return " ".join(str(text).split("\n"))


def _md_cell(text: str) -> str:
    return re.sub(r"(?<!\\)\|", r"\\|", _one_line(text))


def to_markdown(doc: Document) -> str:
    """GitHub-flavoured markdown, one blank line between blocks."""
    out: list[str] = []
    for b in _present(doc):
        if isinstance(b, Heading):
            out.append("#" * b.level + " " + _one_line(b.text))
        elif isinstance(b, Paragraph):
            out.append(b.text)
        elif isinstance(b, Bullets):
            out += ["- " + _one_line(item) for item in b.items]
        elif isinstance(b, Table):
            out.append("| " + " | ".join(_md_cell(h) for h in b.header) + " |")
            out.append("| " + " | ".join("---" for _ in b.header) + " |")
            out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in b.rows]
        elif isinstance(b, Note):
            lines = f"{b.label}: {b.text}".split("\n")
            out += ["> " + line for line in lines]
        elif isinstance(b, Figures):
            out.append("\n\n".join(f"![{f.alt}]({f.src})" for f in b.items))
        else:  # pragma: no cover - the Block union is closed
            raise TypeError(f"not a report block: {b!r}")
        out.append("")
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------------
# HTML

CSS = (
    "*{box-sizing:border-box}"
    "body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;line-height:1.4;"
    "overflow-wrap:break-word}"
    ".table{max-width:100%;overflow-x:auto;margin:1em 0}"
    "table{border-collapse:collapse;font-size:0.9em}"
    "td,th{border:1px solid #d0d7de;padding:4px 8px;vertical-align:top;overflow-wrap:break-word}"
    "th{background:#f6f8fa;text-align:left}"
    "table.numeric td{text-align:right}table.numeric td:first-child{text-align:left}"
    "code{background:#f6f8fa;padding:0 .25em;border-radius:3px;font-size:0.9em}"
    ".note{border-left:4px solid #d4a72c;background:#fff8c5;padding:.5em 1em;margin:1em 0}"
    ".figures{display:flex;flex-wrap:wrap;gap:1em;margin:1em 0;max-width:100%}"
    ".figures figure{margin:0;flex:1 1 380px;min-width:0;max-width:100%}.figures figure.wide{flex-basis:100%}"
    ".figures img{display:block;max-width:100%;height:auto}"
    "figcaption{font-size:0.85em;color:#57606a}"
)


def _html_table(b: Table) -> str:
    head = "".join(f"<th>{inline_html(h)}</th>" for h in b.header)
    rows = []
    for row in b.rows:
        cells = []
        for c in row:
            colour = b.colours.get(str(c))
            style = f' style="color:{html.escape(colour)};font-weight:bold"' if colour else ""
            cells.append(f"<td{style}>{inline_html(str(c))}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    table = "<table class='numeric'>" if b.numeric else "<table>"
    return f"<div class='table'>{table}<thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table></div>"


def _html_figure(f: Figure) -> str:
    src, alt = html.escape(f.src), html.escape(f.alt)
    tag = "<figure class='wide'>" if f.wide else "<figure>"
    return f'{tag}<a href="{src}"><img src="{src}" alt="{alt}"></a><figcaption>{alt}</figcaption></figure>'


def to_html(doc: Document, title: str) -> str:
    """A self-contained page (inline CSS, figures linked relative to it) that fits the browser's width."""
    body: list[str] = []
    for b in _present(doc):
        if isinstance(b, Heading):
            body.append(f"<h{b.level}>{inline_html(b.text)}</h{b.level}>")
        elif isinstance(b, Paragraph):
            body.append(f"<p>{inline_html(b.text)}</p>")
        elif isinstance(b, Bullets):
            body.append("<ul>" + "".join(f"<li>{inline_html(item)}</li>" for item in b.items) + "</ul>")
        elif isinstance(b, Table):
            body.append(_html_table(b))
        elif isinstance(b, Note):
            body.append(
                f"<div class='note'><strong>{html.escape(b.label)}:</strong> {inline_html(b.text)}</div>"
            )
        elif isinstance(b, Figures):
            body.append("<div class='figures'>" + "".join(_html_figure(f) for f in b.items) + "</div>")
        else:  # pragma: no cover - the Block union is closed
            raise TypeError(f"not a report block: {b!r}")
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width,initial-scale=1'>"
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head>"
        f"<body>{''.join(body)}</body></html>\n"
    )


def write_document(doc: Document, markdown: Path, html_path: Path | None, title: str) -> None:
    """Both renderings, each replaced atomically so a reader never sees half a report."""
    from opd.files import atomic_write_text

    atomic_write_text(markdown, to_markdown(doc))
    if html_path is not None:
        atomic_write_text(html_path, to_html(doc, title))
