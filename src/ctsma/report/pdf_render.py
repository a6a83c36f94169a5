"""Render a :class:`~.document.Document` as PDF with fpdf2 and the DejaVu fonts shipped with matplotlib.

DejaVu covers µ, ², ±, – and ⁻¹, which the PDF core fonts (Latin-1 only) cannot show.
"""

from __future__ import annotations

import io
import struct
from pathlib import Path

import matplotlib
from fpdf import FPDF
from fpdf.fonts import FontFace

from .. import __version__
from .document import Document, Figure, Heading, PageBreak, Paragraph, Table

NAVY = (18, 53, 91)
GREY = (91, 102, 112)
FONT = "DejaVu"
_FONT_FILES = {"": "DejaVuSans.ttf", "B": "DejaVuSans-Bold.ttf", "I": "DejaVuSans-Oblique.ttf",
               "BI": "DejaVuSans-BoldOblique.ttf"}
_ROW_STYLES = {
    "published": FontFace(family=FONT, emphasis="I", color=(107, 78, 22), fill_color=(251, 244, 230)),
    "truth": FontFace(family=FONT, fill_color=(232, 244, 232)),
}
_GROUP_SHADE = FontFace(family=FONT, fill_color=(243, 246, 249))
_PLAIN = FontFace(family=FONT, fill_color=(255, 255, 255))


def font_dir() -> Path:
    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


class ReportPDF(FPDF):
    """A4 page with a running title, a rule, and "page n of N" in the footer."""

    def __init__(self, title: str, *, landscape: bool = False, footer_text: str = ""):
        super().__init__(orientation="L" if landscape else "P", unit="mm", format="A4")
        self.report_title = title
        self.footer_text = footer_text
        for style, name in _FONT_FILES.items():
            self.add_font(FONT, style, str(font_dir() / name))
        self.set_margins(15, 16, 15)
        self.set_auto_page_break(True, margin=16)
        self.set_title(title)
        self.set_creator(f"CT-SMA {__version__} (fpdf2)")
        self.set_font(FONT, size=9.5)

    def header(self):
        if self.page_no() == 1:
            return
        self.set_y(7)
        self.set_font(FONT, "", 7.5)
        self.set_text_color(*GREY)
        self.cell(0, 4, self.report_title, align="L")
        self.set_draw_color(201, 214, 227)
        self.line(self.l_margin, 12, self.w - self.r_margin, 12)
        self.set_y(16)
        self.set_text_color(0)

    def footer(self):
        self.set_y(-11)
        self.set_font(FONT, "", 7.5)
        self.set_text_color(*GREY)
        left = f"CT-SMA {__version__}" + (f"  \u00b7  {self.footer_text}" if self.footer_text else "")
        self.cell(self.epw * 0.75, 4, left, align="L")
        self.cell(self.epw * 0.25, 4, f"page {self.page_no()} of {{nb}}", align="R")
        self.set_text_color(0)

    # -- building blocks -------------------------------------------------------------------------
    @property
    def space_left(self) -> float:
        return self.page_break_trigger - self.get_y()

    def need(self, mm: float) -> None:
        """Start a new page unless ``mm`` of vertical space is left."""
        if self.space_left < mm:
            self.add_page()

    def title_block(self, title: str, subtitle: str = "") -> None:
        self.set_font(FONT, "B", 17)
        self.set_text_color(*NAVY)
        self.multi_cell(0, 8, title, new_x="LMARGIN", new_y="NEXT")
        if subtitle:
            self.set_font(FONT, "", 9.5)
            self.set_text_color(*GREY)
            self.multi_cell(0, 5, subtitle, new_x="LMARGIN", new_y="NEXT")
        self.set_draw_color(*NAVY)
        self.set_line_width(0.6)
        self.line(self.l_margin, self.get_y() + 1.5, self.w - self.r_margin, self.get_y() + 1.5)
        self.set_line_width(0.2)
        self.set_text_color(0)
        self.ln(5)

    def heading(self, text: str, level: int = 1, keep_with: float = 0.0) -> None:
        """A section (1) or subsection (2) title; ``keep_with``: mm of the next block to keep on its page."""
        self.need(max(38 if level == 1 else 28, min(keep_with + 14, self.page_break_trigger - self.t_margin)))
        self.ln(3 if level == 1 else 1.5)
        self.set_font(FONT, "B", 12.5 if level == 1 else 10.5)
        self.set_text_color(*NAVY)
        self.multi_cell(0, 6.5 if level == 1 else 5.5, text, new_x="LMARGIN", new_y="NEXT")
        if level == 1:
            self.set_draw_color(201, 214, 227)
            self.line(self.l_margin, self.get_y(), self.w - self.r_margin, self.get_y())
            self.ln(1.5)
        self.set_text_color(0)

    def paragraph(self, text: str, kind: str = "") -> None:
        if kind == "warning":
            self.set_font(FONT, "B", 9.5)
            self.set_fill_color(253, 236, 234)
            self.set_text_color(123, 31, 22)
            self.set_draw_color(192, 57, 43)
            self.multi_cell(0, 5.2, text, border=1, fill=True, padding=2.2, align="L", new_x="LMARGIN",
                            new_y="NEXT")
            self.set_fill_color(255)
            self.ln(2)
        elif kind == "note":
            self.set_font(FONT, "I", 8)
            self.set_text_color(*GREY)
            self.multi_cell(0, 4, text, align="L", new_x="LMARGIN", new_y="NEXT")
            self.ln(1.2)
        else:
            self.set_font(FONT, "", 9.5)
            self.multi_cell(0, 4.9, text, align="L", new_x="LMARGIN", new_y="NEXT")
            self.ln(1.5)
        self.set_text_color(0)

    @staticmethod
    def table_need(t: Table) -> float:
        """mm a table must find on its page: short tables whole (about 6 mm per one-line row), longer ones their
        header and 3 rows."""
        rows_kept = len(t.rows) if len(t.rows) <= 10 else 3
        return 12 + (5 if t.caption else 0) + 6 * rows_kept + 4 * len(t.notes)

    def keep_need(self, block) -> float:
        """mm of ``block`` that a heading before it keeps on its page: a figure whole, a table as
        :meth:`table_need` says, nothing of other blocks."""
        if isinstance(block, Figure):
            return sum(self.figure_size(block.png, block.width, block.caption)[1:])
        return self.table_need(block) if isinstance(block, Table) else 0.0

    def table_block(self, t: Table, *, font_size: float = 7.8) -> None:
        self.need(self.table_need(t))
        if t.caption:
            self.set_font(FONT, "B", 9)
            self.set_text_color(*NAVY)
            self.multi_cell(0, 4.8, t.caption, new_x="LMARGIN", new_y="NEXT")
            self.set_text_color(0)
            self.ln(0.8)
        widths = self._column_widths(t, font_size)
        self.set_font(FONT, "", font_size)
        self.set_draw_color(201, 214, 227)
        heading_style = FontFace(family=FONT, emphasis="B", color=255, fill_color=NAVY, size_pt=font_size)
        with self.table(col_widths=widths, width=min(sum(widths), self.epw), align="LEFT", text_align=tuple(t.align),
                        headings_style=heading_style, borders_layout="HORIZONTAL_LINES",
                        line_height=font_size * 0.5, padding=(0.9, 1.4), v_align="MIDDLE") as table:
            hrow = table.row()
            for c in t.columns:
                hrow.cell(str(c), align="C")
            shaded = False
            for row, kind in zip(t.rows, t.row_kinds):
                r = table.row()
                shaded ^= kind == "group"
                style = _ROW_STYLES.get(kind) or (_GROUP_SHADE if shaded else _PLAIN)
                for c in row:
                    r.cell(str(c), style=style)
        if t.notes:
            self.ln(0.8)
            self.set_font(FONT, "I", 7.2)
            self.set_text_color(*GREY)
            for n in t.notes:
                self.multi_cell(0, 3.6, n, new_x="LMARGIN", new_y="NEXT")
            self.set_text_color(0)
        self.ln(3)

    def _column_widths(self, t: Table, font_size: float) -> list[float]:
        """Natural column widths (mm) from the text, shrunk proportionally to fit the page."""
        pad = 2 * 1.4 + 0.6
        widths = []
        for j, col in enumerate(t.columns):
            self.set_font(FONT, "B", font_size)
            head = max((self.get_string_width(w) for w in str(col).split()), default=0)
            head_full = self.get_string_width(str(col))
            self.set_font(FONT, "", font_size)
            body = max((self.get_string_width(str(r[j])) for r in t.rows), default=0)
            body = min(body, 82)
            widths.append(max(head, body, min(head_full, max(body, 14))) + pad)
        if t.widths:
            widths = [max(w, h * self.epw) for w, h in zip(widths, t.widths)]
        total = sum(widths)
        if total > self.epw:
            widths = [w * self.epw / total for w in widths]
        return widths

    def figure_size(self, png: bytes, width: float, caption: str) -> tuple[float, float, float]:
        """(width, height, caption height) in mm of a figure scaled to ``width`` × text width, shrunk to fit a page."""
        pw, ph = _png_size(png)
        w = self.epw * max(0.1, min(1.0, width))
        h = w * ph / pw
        cap_h = 9 if caption else 0
        max_h = self.page_break_trigger - self.t_margin - cap_h - 14
        if h > max_h:
            h = max_h
            w = h * pw / ph
        return w, h, cap_h

    def figure(self, png: bytes, caption: str = "", width: float = 1.0) -> None:
        w, h, cap_h = self.figure_size(png, width, caption)
        self.need(h + cap_h + 2)
        x = self.l_margin + (self.epw - w) / 2
        self.image(io.BytesIO(png), x=x, y=self.get_y(), w=w, h=h)
        self.set_y(self.get_y() + h + 1)
        if caption:
            self.set_font(FONT, "I", 7.8)
            self.set_text_color(*GREY)
            self.multi_cell(0, 3.8, caption, new_x="LMARGIN", new_y="NEXT")
            self.set_text_color(0)
        self.ln(3)


def _png_size(png: bytes) -> tuple[int, int]:
    if png[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("figure is not a PNG image")
    return struct.unpack(">II", png[16:24])


def render_pdf(doc: Document, *, footer: str = "") -> bytes:
    """The whole document as PDF bytes."""
    pdf = ReportPDF(doc.title, landscape=doc.landscape, footer_text=footer)
    pdf.add_page()
    pdf.title_block(doc.title, doc.subtitle)
    for i, b in enumerate(doc.blocks):
        if isinstance(b, Heading):
            nxt = doc.blocks[i + 1] if i + 1 < len(doc.blocks) else None
            pdf.heading(b.text, b.level, keep_with=pdf.keep_need(nxt))
        elif isinstance(b, Paragraph):
            pdf.paragraph(b.text, b.kind)
        elif isinstance(b, Table):
            pdf.table_block(b)
        elif isinstance(b, Figure):
            pdf.figure(b.png, b.caption, b.width)
        elif isinstance(b, PageBreak):
            if pdf.get_y() > pdf.t_margin + 5:
                pdf.add_page()
        else:  # pragma: no cover - a programming error
            raise TypeError(f"unknown block {type(b).__name__}")
    return bytes(pdf.output())
