"""PNG plots for the benchmark report: lag over time under load, and a failover timeline.

No plotting library: a small RGB canvas with lines, boxes and a 3x5 pixel font,
encoded as PNG with zlib, so the plots come out on any machine the benchmarks run on.

    python -m bench.plots [--mode quick|full] [--dir DIR]

runs a short replication load (bench.replication.lag_over_time) and writes
``lag-over-time.png``; when ``DIR/failover.json`` exists (written by the failover
benchmark: ``{"nodes": [...], "events": [{"t": s, "node": id, "role": "primary" |
"replica" | "down" | "candidate"}], "end": s}``) it writes ``failover-timeline.png`` too.
DIR defaults to bench/, beside REPORT.md. ``python -m bench`` makes both plots itself
(lag_plot, failover_plot) and links them from the report.
"""

from __future__ import annotations

import argparse
import json
import math
import struct
import sys
import tempfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent

Color = tuple[int, int, int]
WHITE: Color = (255, 255, 255)
BLACK: Color = (0, 0, 0)
GREY: Color = (200, 200, 200)
SERIES_COLORS: tuple[Color, ...] = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189))
ROLE_COLORS: dict[str, Color] = {
    "primary": (214, 39, 40),
    "replica": (31, 119, 180),
    "candidate": (255, 160, 40),
    "down": (150, 150, 150),
}

# 3x5 pixel glyphs, rows top to bottom; unknown characters draw as a box.
_GLYPHS = {
    "0": "111101101101111", "1": "010110010010111", "2": "111001111100111",
    "3": "111001111001111", "4": "101101111001001", "5": "111100111001111",
    "6": "111100111101111", "7": "111001010010010", "8": "111101111101111",
    "9": "111101111001111", "a": "010101111101101", "b": "110101110101110",
    "c": "011100100100011", "d": "110101101101110", "e": "111100110100111",
    "f": "111100110100100", "g": "011100101101011", "h": "101101111101101",
    "i": "111010010010111", "j": "001001001101010", "k": "101101110101101",
    "l": "100100100100111", "m": "101111111101101", "n": "110101101101101",
    "o": "010101101101010", "p": "110101110100100", "q": "010101101110011",
    "r": "110101110101101", "s": "011100010001110", "t": "111010010010010",
    "u": "101101101101111", "v": "101101101101010", "w": "101101111111101",
    "x": "101101010101101", "y": "101101010010010", "z": "111001010100111",
    " ": "000000000000000", ".": "000000000000010", ",": "000000000010100",
    ":": "000010000010000", "/": "001001010100100", "-": "000000111000000",
    "%": "101001010100101", "(": "010100100100010", ")": "010001001001010",
    "=": "000111000111000", "+": "000010111010000", "_": "000000000000111",
}  # fmt: skip
SCALE = 2  # font pixels per glyph pixel


def encode_png(width: int, height: int, rgb: bytes) -> bytes:
    """An 8-bit RGB PNG of `rgb` (width * height * 3 bytes, rows top to bottom)."""
    if len(rgb) != width * height * 3:
        raise ValueError(f"{len(rgb)} bytes of pixels for {width}x{height}")
    stride = width * 3
    raw = b"".join(b"\0" + rgb[y * stride : (y + 1) * stride] for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw, 9))
        + chunk(b"IEND", b"")
    )


class Canvas:
    """An RGB image with the few drawing operations a chart needs."""

    def __init__(self, width: int, height: int, background: Color = WHITE) -> None:
        self.width = width
        self.height = height
        self.pixels = bytearray(bytes(background) * (width * height))

    def set(self, x: int, y: int, color: Color) -> None:
        if 0 <= x < self.width and 0 <= y < self.height:
            i = (y * self.width + x) * 3
            self.pixels[i : i + 3] = bytes(color)

    def box(self, x0: int, y0: int, x1: int, y1: int, color: Color) -> None:
        for y in range(max(0, min(y0, y1)), min(self.height, max(y0, y1) + 1)):
            for x in range(max(0, min(x0, x1)), min(self.width, max(x0, x1) + 1)):
                self.set(x, y, color)

    def line(self, x0: int, y0: int, x1: int, y1: int, color: Color) -> None:
        """Bresenham's line, end points included."""
        dx, dy = abs(x1 - x0), -abs(y1 - y0)
        sx, sy = (1 if x0 < x1 else -1), (1 if y0 < y1 else -1)
        err = dx + dy
        while True:
            self.set(x0, y0, color)
            if x0 == x1 and y0 == y1:
                return
            e2 = 2 * err
            if e2 >= dy:
                err += dy
                x0 += sx
            if e2 <= dx:
                err += dx
                y0 += sy

    def text(self, x: int, y: int, text: str, color: Color = BLACK) -> None:
        for i, char in enumerate(text.lower()):
            glyph = _GLYPHS.get(char, "111101101101111")
            for bit, on in enumerate(glyph):
                if on == "1":
                    gx, gy = x + (i * 4 + bit % 3) * SCALE, y + (bit // 3) * SCALE
                    self.box(gx, gy, gx + SCALE - 1, gy + SCALE - 1, color)

    def png(self) -> bytes:
        return encode_png(self.width, self.height, bytes(self.pixels))


def text_width(text: str) -> int:
    return len(text) * 4 * SCALE


def nice_max(value: float) -> float:
    """The smallest 1, 2 or 5 times a power of ten at or above value (an axis end)."""
    if value <= 0 or not math.isfinite(value):
        return 1.0
    power = 10 ** math.floor(math.log10(value))
    return float(next(m * power for m in (1, 2, 5, 10) if m * power >= value))


@dataclass(frozen=True, slots=True)
class Series:
    label: str
    points: Sequence[tuple[float, float]]  # (x, y)


def line_chart(
    series: Sequence[Series],
    title: str,
    x_label: str,
    y_label: str,
    size: tuple[int, int] = (800, 400),
) -> Canvas:
    """Points joined by lines, axes from 0, one color per series with a legend."""
    width, height = size
    canvas = Canvas(width, height)
    left, right, top, bottom = 70, width - 20, 40, height - 50
    finite = [(x, y) for s in series for x, y in s.points if math.isfinite(y)]
    x_max = nice_max(max((x for x, _ in finite), default=1.0))
    y_max = nice_max(max((y for _, y in finite), default=1.0))

    def px(x: float) -> int:
        return left + round((right - left) * x / x_max)

    def py(y: float) -> int:
        return bottom - round((bottom - top) * min(y, y_max) / y_max)

    for i in range(6):  # grid and tick labels
        gy = py(y_max * i / 5)
        canvas.line(left, gy, right, gy, GREY)
        label = f"{y_max * i / 5:g}"
        canvas.text(left - 6 - text_width(label), gy - 5, label)
        gx = px(x_max * i / 5)
        canvas.line(gx, top, gx, bottom, GREY)
        label = f"{x_max * i / 5:g}"
        canvas.text(gx - text_width(label) // 2, bottom + 8, label)
    canvas.line(left, top, left, bottom, BLACK)
    canvas.line(left, bottom, right, bottom, BLACK)
    canvas.text(left, 12, title)
    canvas.text((left + right - text_width(x_label)) // 2, bottom + 28, x_label)
    canvas.text(4, top - 20, y_label)
    for n, s in enumerate(series):
        color = SERIES_COLORS[n % len(SERIES_COLORS)]
        prev: tuple[int, int] | None = None
        for x, y in s.points:
            if not math.isfinite(y):
                prev = None
                continue
            point = (px(x), py(y))
            if prev is not None:
                canvas.line(*prev, *point, color)
            else:
                canvas.set(*point, color)
            prev = point
        lx = right - 200
        canvas.box(lx, top + 6 + n * 16, lx + 12, top + 14 + n * 16, color)
        canvas.text(lx + 18, top + 5 + n * 16, s.label)
    return canvas


@dataclass(frozen=True, slots=True)
class RoleSpan:
    node: str
    role: str  # a key of ROLE_COLORS
    start: float
    end: float


def role_spans(events: Sequence[dict[str, object]], end: float) -> list[RoleSpan]:
    """Each node's role from one event to its next (or to `end`)."""
    spans: list[RoleSpan] = []
    current: dict[str, tuple[str, float]] = {}
    for event in sorted(events, key=lambda e: float(str(e["t"]))):
        node, role, t = str(event["node"]), str(event["role"]), float(str(event["t"]))
        if node in current:
            spans.append(RoleSpan(node, current[node][0], current[node][1], t))
        current[node] = (role, t)
    spans += [RoleSpan(node, role, start, end) for node, (role, start) in current.items()]
    return spans


def timeline_chart(spans: Sequence[RoleSpan], nodes: Sequence[str], title: str) -> Canvas:
    """One row per node, colored by role over time (seconds)."""
    width, height = 800, 80 + 30 * len(nodes)
    canvas = Canvas(width, height)
    left, right, top = 110, width - 20, 40
    end = nice_max(max((s.end for s in spans), default=1.0))

    def px(t: float) -> int:
        return left + round((right - left) * t / end)

    canvas.text(left, 12, title)
    for row, node in enumerate(nodes):
        y = top + row * 30
        canvas.text(4, y + 6, node[:12])
        for span in (s for s in spans if s.node == node):
            canvas.box(
                px(span.start),
                y,
                max(px(span.start), px(span.end) - 1),
                y + 20,
                ROLE_COLORS.get(span.role, BLACK),
            )
    axis = top + len(nodes) * 30
    canvas.line(left, axis, right, axis, BLACK)
    for i in range(6):
        label = f"{end * i / 5:g}s"
        canvas.text(px(end * i / 5) - text_width(label) // 2, axis + 6, label)
    for n, (role, color) in enumerate(ROLE_COLORS.items()):
        canvas.box(left + n * 140, height - 16, left + n * 140 + 12, height - 6, color)
        canvas.text(left + n * 140 + 18, height - 16, role)
    return canvas


def write_lag_plot(samples: Sequence[tuple[str, float, float]], path: Path) -> Path:
    """samples: (replica, seconds since the run started, lag in ms) per commit."""
    by_replica: dict[str, list[tuple[float, float]]] = {}
    for replica, t, lag in samples:
        by_replica.setdefault(replica, []).append((t, lag))
    series = [Series(name, sorted(points)) for name, points in sorted(by_replica.items())]
    chart = line_chart(series, "replication lag under load", "seconds", "lag (ms)")
    path.write_bytes(chart.png())
    return path


def write_failover_plot(data: dict[str, object], path: Path) -> Path:
    events = data.get("events")
    if not isinstance(events, list):
        raise ValueError("failover data: 'events' must be a list")
    end = float(str(data.get("end", max((float(e["t"]) for e in events), default=1.0))))
    nodes = data.get("nodes")
    names = (
        [str(n) for n in nodes]
        if isinstance(nodes, list)
        else sorted({str(e["node"]) for e in events})
    )
    chart = timeline_chart(role_spans(events, end), names, "failover timeline")
    path.write_bytes(chart.png())
    return path


LAG_PLOT_SECONDS = {"quick": 2.0, "full": 20.0}  # the load behind lag-over-time.png
LAG_PLOT_RATE = 1000.0  # commits/s
LAG_PNG = "lag-over-time.png"
FAILOVER_JSON = "failover.json"  # written by bench/failover.py into the output directory
FAILOVER_PNG = "failover-timeline.png"


def lag_plot(mode: str, path: Path) -> Path:
    """Run a short load on a primary and two replicas and plot each commit's lag."""
    from bench.replication import lag_over_time  # starts processes: only when asked

    with tempfile.TemporaryDirectory(prefix="bench-plots-") as tmp:
        samples = lag_over_time(
            Path(tmp), replicas=2, seconds=LAG_PLOT_SECONDS[mode], rate=LAG_PLOT_RATE
        )
    return write_lag_plot(samples, path)


def failover_plot(data_path: Path, path: Path) -> Path:
    """The timeline of roles from the failover benchmark's JSON dump."""
    data = json.loads(data_path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{data_path}: not a JSON object")
    return write_failover_plot(data, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.plots", description=__doc__)
    parser.add_argument("--mode", choices=("quick", "full"), default="quick")
    parser.add_argument("--dir", type=Path, default=HERE, help="where the PNGs go (default bench/)")
    args = parser.parse_args(argv)
    print(f"wrote {lag_plot(args.mode, args.dir / LAG_PNG)}")
    failover = args.dir / FAILOVER_JSON
    if failover.is_file():
        print(f"wrote {failover_plot(failover, args.dir / FAILOVER_PNG)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
