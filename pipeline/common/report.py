"""Self-contained HTML reports (one file: styles inline, pictures as data: URIs), so a report opens the same from a
laptop's disk, an object store or an MLflow run's artifacts.

A report is a title, a few facts and sections; a section holds text, tables and pictures. Rendering is Jinja2 with
autoescaping: names from the data (class names, URIs, error messages) are text, never markup.
"""
from __future__ import annotations

import base64
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import jinja2

_TEMPLATE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{{ title }}</title>
<style>
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.5em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: left; }
td.number { text-align: right; font-variant-numeric: tabular-nums; }
dl.facts { display: grid; grid-template-columns: max-content auto; gap: 0.2em 1em; }
dl.facts dt { font-weight: bold; } dl.facts dd { margin: 0; word-break: break-all; }
figure { margin: 1em 0; } figure img { max-width: 100%; } figcaption { font-size: 0.85em; color: #555; }
p.note { color: #555; font-size: 0.9em; }
</style></head>
<body>
<h1>{{ title }}</h1>
<dl class="facts">{% for key, value in facts %}<dt>{{ key }}</dt><dd>{{ value }}</dd>{% endfor %}</dl>
{% for section in sections %}
<section id="{{ section.id }}"><h2>{{ section.title }}</h2>
{% for note in section.notes %}<p class="note">{{ note }}</p>{% endfor %}
{% for table in section.tables %}
<table id="{{ table.id }}"><thead><tr>{% for h in table.headers %}<th>{{ h }}</th>{% endfor %}</tr></thead>
<tbody>{% for row in table.rows %}<tr>{% for cell in row %}<td{% if cell.number %} class="number"{% endif %}>{{ cell.text }}</td>{% endfor %}</tr>{% endfor %}</tbody></table>
{% endfor %}
{% for picture in section.pictures %}
<figure><img src="data:{{ picture.mime }};base64,{{ picture.data }}" alt="{{ picture.caption }}"><figcaption>{{ picture.caption }}</figcaption></figure>
{% endfor %}
</section>
{% endfor %}
</body></html>
"""


@dataclass(frozen=True)
class Cell:
    text: str
    number: bool = False


@dataclass
class Table:
    id: str
    headers: Sequence[str]
    rows: list[list[Cell]] = field(default_factory=list)


@dataclass(frozen=True)
class Picture:
    data: str  # base64
    caption: str
    mime: str = "image/png"


@dataclass
class Section:
    id: str
    title: str
    notes: list[str] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    pictures: list[Picture] = field(default_factory=list)


def cell(value: Any, digits: int = 4) -> Cell:
    """A table cell: numbers right-aligned with `digits` decimals (integers as they are), None and NaN as '-'."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return Cell("-", number=True)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return Cell(str(value))
    return Cell(f"{value:.{digits}f}" if isinstance(value, float) else str(value), number=True)


def table(id: str, headers: Sequence[str], rows: Sequence[Sequence[Any]], digits: int = 4) -> Table:
    return Table(id, headers, [[c if isinstance(c, Cell) else cell(c, digits) for c in row] for row in rows])


def picture(data: bytes, caption: str, mime: str = "image/png") -> Picture:
    return Picture(base64.b64encode(data).decode("ascii"), caption, mime)


def render(title: str, facts: Sequence[tuple[str, Any]], sections: Sequence[Section]) -> str:
    environment = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    return environment.from_string(_TEMPLATE).render(title=title, facts=[(k, "-" if v is None else v) for k, v in facts],
                                                     sections=sections)
