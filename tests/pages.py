"""Reading what the reports write: report.html's tables and images (`Page`), and a PNG (`decode`)."""

from __future__ import annotations

import io
from html.parser import HTMLParser

from PIL import Image


class Page(HTMLParser):
    """Collects each table's rows (by id) and each image's id and data."""

    def __init__(self):
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.images: dict[str, str] = {}
        self.table = None
        self.cell = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self.table = self.tables.setdefault(attrs.get("id"), [])
        elif tag == "tr":
            self.table.append([])
        elif tag in ("td", "th"):
            self.cell = ""
        elif tag == "img":
            self.images[attrs["id"]] = attrs["src"]

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.table[-1].append(self.cell)
            self.cell = None

    def handle_data(self, data):
        if self.cell is not None:
            self.cell += data


def decode(png: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(png))
    image.load()  # decodes every pixel; a truncated file raises
    return image
