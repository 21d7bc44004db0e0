"""One summary table for ``make bench``.

Each benchmark reports its headline figures through the ``bench_report`` fixture::

    def test_bench_x(bench_report):
        ...
        bench_report("decisions per second, Redis", per_second, unit="/s")
        bench_report("this / PING", this / ping, target="<= 1.5")

``bench_report(name, figure, *, unit="", ratio=None, target="")``: ``figure`` is the measured
number; ``ratio`` an optional comparison (against a floor or a competitor); ``target`` an
optional goal such as ``"<= 1.5"`` or ``">= 0.9"``, checked against ``ratio`` when given,
else against ``figure``. Targets are reported (ok / MISS), never asserted: timings depend on
the machine. The table is printed once, after every benchmark has run.
"""

import operator
import re
from dataclasses import dataclass

import pytest

_COMPARE = {"<=": operator.le, ">=": operator.ge, "<": operator.lt, ">": operator.gt}
_TARGET = re.compile(r"^\s*(<=|>=|<|>)\s*(-?[0-9.]+)")


@dataclass(frozen=True)
class Figure:
    """One reported figure of one benchmark."""

    benchmark: str
    name: str
    figure: float
    unit: str = ""
    ratio: float | None = None
    target: str = ""

    @property
    def verdict(self):
        """'ok', 'MISS', or '' when the target is informational or absent."""
        match = _TARGET.match(self.target or "")
        if match is None:
            return ""
        value = self.ratio if self.ratio is not None else self.figure
        return "ok" if _COMPARE[match.group(1)](value, float(match.group(2))) else "MISS"


FIGURES: list[Figure] = []


@pytest.fixture
def bench_report(request):
    """Add one row to the ``make bench`` summary: ``bench_report(name, figure, ...)``."""

    def report(name, figure, *, unit="", ratio=None, target=""):
        FIGURES.append(
            Figure(
                benchmark=request.node.name,
                name=str(name),
                figure=float(figure),
                unit=unit,
                ratio=None if ratio is None else float(ratio),
                target=str(target or ""),
            )
        )

    return report


def _number(value):
    if value is None:
        return ""
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}" if abs(value) < 1 else f"{value:.2f}"


def summary_lines(figures):
    """The summary table as text lines (one header, one row per figure)."""
    header = (
        f"{'benchmark':<40} {'figure':<52} {'value':>12} {'unit':<6} "
        f"{'ratio':>8} {'target':<10} {'':<4}"
    )
    lines = [header, "-" * len(header)]
    for f in figures:
        lines.append(
            f"{f.benchmark[:40]:<40} {f.name[:52]:<52} {_number(f.figure):>12} {f.unit[:6]:<6} "
            f"{_number(f.ratio):>8} {f.target[:10]:<10} {f.verdict:<4}"
        )
    return lines


def pytest_terminal_summary(terminalreporter):
    if not FIGURES:
        return
    terminalreporter.section("benchmark summary")
    for line in summary_lines(FIGURES):
        terminalreporter.write_line(line)
    misses = sum(f.verdict == "MISS" for f in FIGURES)
    terminalreporter.write_line(f"{len(FIGURES)} figures, {misses} targets missed")
