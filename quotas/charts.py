"""Server-side SVG charts of report results with pygal: inline, no JavaScript, no external URL.

The SVG works under a strict Content-Security-Policy: its one ``<style>`` element carries the
request's CSP nonce (``request.csp_nonce``, the attribute django-csp and DUCK-E's middleware
set), and pygal's ``style="..."`` attributes become SVG presentation attributes, which no
policy restricts.
"""

import re

import pygal
from django.utils.html import escape
from pygal.style import DefaultStyle

from .reports import format_cell

# Stripped from pygal's output: comments (they carry pygal's URLs) and its inline config
# script (tooltips only; the page needs no JavaScript).
_COMMENTS = re.compile(r"<!--.*?-->", re.S)
_SCRIPTS = re.compile(r"<script\b.*?</script>", re.S | re.I)
_STYLE_ELEMENT = re.compile(r"<style\b", re.I)
_STYLE_ATTRIBUTE = re.compile(r'\sstyle="([^"]*)"')
_DECLARATION = re.compile(r"^\s*([a-z-]+)\s*:\s*([^;\"]+?)\s*$")
MAX_LABELS = 24


def _config():
    # js=[]: pygal would otherwise add <script> tags loading its tooltips from a CDN.
    return {
        "js": [],
        "disable_xml_declaration": True,
        "style": DefaultStyle,
        "width": 900,
        "height": 380,
        "show_legend": False,
        "x_label_rotation": 30,
        "truncate_label": 24,
        "print_values": False,
        "include_x_axis": True,  # money axes start at 0
        "no_data_text": "No data in this range",
    }


_KINDS = {
    "line": pygal.Line,
    "bar": pygal.Bar,
    "hbar": pygal.HorizontalBar,
    "pie": pygal.Pie,
    "stacked": pygal.StackedBar,
}


def _presentation_attributes(match):
    """``style="opacity: 0"`` -> ``opacity="0"`` (a declaration that is not one is dropped)."""
    attributes = []
    for declaration in match.group(1).split(";"):
        parsed = _DECLARATION.match(declaration)
        if parsed:
            attributes.append(f' {parsed.group(1)}="{parsed.group(2)}"')
    return "".join(attributes)


def render_chart(result, nonce=""):
    """The result's chart as an inline ``<svg>`` string, or "" when it has none.

    ``nonce`` is the request's CSP nonce; the chart's ``<style>`` element carries it."""
    chart_spec = result.chart
    if chart_spec is None:
        return ""
    rows = result.chart_rows if result.chart_rows is not None else result.rows
    columns = {c.key: c for c in result.columns}
    label_column = columns.get(chart_spec.label)

    def label(row):
        value = row.get(chart_spec.label)
        return format_cell(label_column, value) if label_column else str(value)

    config = _config()
    config["title"] = chart_spec.title
    chart = _KINDS[chart_spec.kind](**config)
    if chart_spec.kind == "pie":
        chart.show_legend = True
        for row in rows:
            chart.add(label(row), float(row.get(chart_spec.values[0]) or 0))
    else:
        labels = [label(row) for row in rows]
        chart.x_labels = labels
        if len(labels) > MAX_LABELS:
            chart.x_labels_major_every = max(1, len(labels) // MAX_LABELS)
            chart.show_minor_x_labels = False
        if len(chart_spec.values) > 1:
            chart.show_legend = True
        for key in chart_spec.values:
            name = columns[key].label if key in columns else key
            chart.add(name, [float(row.get(key) or 0) for row in rows])
    svg = _SCRIPTS.sub("", _COMMENTS.sub("", chart.render(is_unicode=True)))
    svg = _STYLE_ATTRIBUTE.sub(_presentation_attributes, svg)
    if nonce:
        svg = _STYLE_ELEMENT.sub(f'<style nonce="{escape(nonce)}"', svg)
    return svg
