"""A small report document model rendered to both HTML and PDF.

The study report is built once as a list of blocks (headings, paragraphs, tables, figures) and then
rendered by :mod:`.html_render` and :mod:`.pdf_render`, so the two formats always hold the same content.
All text in blocks is plain text; the HTML renderer escapes it and the PDF renderer writes it verbatim.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence, Union


@dataclass
class Heading:
    text: str
    level: int = 1  # 1: section, 2: subsection


@dataclass
class Paragraph:
    text: str
    kind: str = ""  # "" | "note" (small, grey) | "warning" (highlighted box)


@dataclass
class Table:
    """A table of already formatted strings.

    ``row_kinds`` marks rows: ``"published"`` (published figures, shown in italics on a tinted
    background), ``"truth"`` (phantom truth), ``"group"`` (a row that starts a group), or ``""``.
    ``align`` holds one of ``"L"``, ``"R"``, ``"C"`` per column; ``widths`` optional relative widths.
    """

    columns: Sequence[str]
    rows: Sequence[Sequence[str]]
    caption: str = ""
    row_kinds: Sequence[str] | None = None
    align: Sequence[str] | None = None
    widths: Sequence[float] | None = None
    notes: Sequence[str] = ()

    def __post_init__(self):
        n = len(self.columns)
        for r in self.rows:
            if len(r) != n:
                raise ValueError(f"table row has {len(r)} cells, expected {n}: {r!r}")
        if self.row_kinds is None:
            self.row_kinds = [""] * len(self.rows)
        if self.align is None:
            self.align = ["L"] + ["R"] * (n - 1)


@dataclass
class Figure:
    png: bytes
    caption: str = ""
    width: float = 1.0  # fraction of the text width
    alt: str = ""


@dataclass
class PageBreak:
    """Starts a new page in the PDF; ignored in HTML."""


Block = Union[Heading, Paragraph, Table, Figure, PageBreak]


@dataclass
class Document:
    title: str
    subtitle: str = ""
    blocks: list = field(default_factory=list)
    landscape: bool = False

    def add(self, *blocks: Block) -> "Document":
        self.blocks.extend(blocks)
        return self
