"""Render a :class:`~.document.Document` as one self-contained HTML file.

Hand-written on purpose: the page is a few headings, tables and images, and building it with
:func:`html.escape` on every string keeps untrusted text (subject IDs, source keys from
``metrics.json``) inert without adding a template engine dependency. Images are embedded as
base64 PNG, so the file can be moved or mailed on its own.
"""

from __future__ import annotations

import base64
import html

from .. import __version__
from .document import Document, Figure, Heading, PageBreak, Paragraph, Table

_CSS = """
body{font-family:"DejaVu Sans",Helvetica,Arial,sans-serif;color:#1d2733;max-width:1180px;margin:2em auto;
padding:0 1.5em;line-height:1.45;font-size:15px}
h1{font-size:1.7em;margin-bottom:.1em;color:#12355b}
.subtitle{color:#5b6670;margin-top:0}
h2{font-size:1.3em;color:#12355b;border-bottom:2px solid #c9d6e3;padding-bottom:.2em;margin-top:2em}
h3{font-size:1.08em;color:#12355b;margin-top:1.4em}
nav{background:#f3f6f9;border:1px solid #dde5ee;padding:.6em 1em;border-radius:4px;font-size:.92em}
nav a{margin-right:1.2em;white-space:nowrap}
table{border-collapse:collapse;margin:.6em 0 .3em 0;font-size:.86em}
caption{caption-side:top;text-align:left;font-weight:600;padding-bottom:.35em;color:#12355b}
th{background:#12355b;color:#fff;font-weight:600;padding:.35em .6em;text-align:center;vertical-align:bottom}
td{padding:.28em .6em;border-bottom:1px solid #e2e8ef;font-variant-numeric:tabular-nums}
td.R{text-align:right}td.C{text-align:center}td.L{text-align:left}
tr.published td{font-style:italic;background:#fbf4e6;color:#6b4e16}
tr.truth td{background:#eef6ee}
tr.group td{border-top:2px solid #c9d6e3}
tr.shade td{background:#f3f6f9}
.tnote{font-size:.8em;color:#5b6670;margin:.1em 0 1em 0}
p.note{font-size:.88em;color:#5b6670}
p.warning{background:#fdecea;border-left:5px solid #c0392b;padding:.6em 1em;font-weight:600;color:#7b1f16}
figure{margin:1em 0}figure img{max-width:100%;height:auto;border:1px solid #eef1f4}
figcaption{font-size:.86em;color:#5b6670;margin-top:.3em}
footer{margin-top:3em;font-size:.8em;color:#8a949e;border-top:1px solid #dde5ee;padding-top:.6em}
"""


def _e(s) -> str:
    return html.escape(str(s), quote=True)


def render_html(doc: Document, *, footer: str = "") -> str:
    """The whole document as an HTML5 string (UTF-8, every text escaped).

    The footer reads "CT-SMA <version> · ``footer``", as every page footer of :func:`.pdf_render.render_pdf`.
    """
    out: list[str] = []
    sections = [b for b in doc.blocks if isinstance(b, Heading) and b.level == 1]
    out.append(f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
               f'<meta name="viewport" content="width=device-width, initial-scale=1">'
               f"<title>{_e(doc.title)}</title><style>{_CSS}</style></head><body>")
    out.append(f"<h1>{_e(doc.title)}</h1>")
    if doc.subtitle:
        out.append(f'<p class="subtitle">{_e(doc.subtitle)}</p>')
    if len(sections) > 2:
        out.append("<nav>" + "".join(f'<a href="#s{i}">{_e(h.text)}</a>' for i, h in enumerate(sections, 1))
                   + "</nav>")
    sec = 0
    for b in doc.blocks:
        if isinstance(b, Heading):
            if b.level == 1:
                sec += 1
                out.append(f'<h2 id="s{sec}">{_e(b.text)}</h2>')
            else:
                out.append(f"<h3>{_e(b.text)}</h3>")
        elif isinstance(b, Paragraph):
            cls = f' class="{_e(b.kind)}"' if b.kind else ""
            out.append(f"<p{cls}>{_e(b.text)}</p>")
        elif isinstance(b, Table):
            out.append(_table(b))
        elif isinstance(b, Figure):
            data = base64.b64encode(b.png).decode("ascii")
            width = max(10, min(100, round(b.width * 100)))
            out.append(f'<figure><img style="width:{width}%" alt="{_e(b.alt or b.caption)}" '
                       f'src="data:image/png;base64,{data}">'
                       + (f"<figcaption>{_e(b.caption)}</figcaption>" if b.caption else "") + "</figure>")
        elif isinstance(b, PageBreak):
            continue
        else:  # pragma: no cover - a programming error
            raise TypeError(f"unknown block {type(b).__name__}")
    foot = f"CT-SMA {__version__}" + (f" \u00b7 {footer}" if footer else "")
    out.append(f"<footer>{_e(foot)}</footer>")
    out.append("</body></html>\n")
    return "\n".join(out)


def _table(t: Table) -> str:
    parts = ["<table>"]
    if t.caption:
        parts.append(f"<caption>{_e(t.caption)}</caption>")
    parts.append("<thead><tr>" + "".join(f"<th>{_e(c)}</th>" for c in t.columns) + "</tr></thead><tbody>")
    shaded = False
    for row, kind in zip(t.rows, t.row_kinds):
        shaded ^= kind == "group"  # every "group" row toggles the shading of the rows below it, as in the PDF
        classes = [kind] if kind else []
        if shaded and kind not in ("published", "truth"):
            classes.append("shade")
        cls = f' class="{_e(" ".join(classes))}"' if classes else ""
        parts.append(f"<tr{cls}>" + "".join(f'<td class="{_e(a)}">{_e(c)}</td>'
                                            for c, a in zip(row, t.align)) + "</tr>")
    parts.append("</tbody></table>")
    for n in t.notes:
        parts.append(f'<p class="tnote">{_e(n)}</p>')
    return "\n".join(parts)
