#!/usr/bin/env python3
"""SVG charts of a benches/run-suite.sh run (no dependency beyond python3, no network).

    benches/plot-suite.py RESULTS.jsonl [--hgrm-dir DIR] [--out DIR] [--note TEXT]

Writes into --out (default: next to RESULTS):
  cpu.svg      server CPU µs per operation, plexus next to each reference, per scenario
               (the "server_cpu_us_per_op" field run-suite.sh adds: utime+stime of the server
               process and its children over the measured window / operations in it);
  latency.svg  latency by percentile, plexus and reference per scenario, from the HDR
               histograms `plexus bench --hdr-out` wrote (DIR/<scenario>--<server>.hgrm, the
               HdrHistogram percentile-distribution format, values in µs).
Lower is better in both. Rows without the figure are left out (and listed on stderr).
"""

import argparse
import html
import json
import math
import os
import sys

PLEXUS = "#2f6fde"
REFERENCE = "#9aa4b2"
INK = "#1c2430"
MUTED = "#667085"
GRID = "#e4e8ee"
FONT = "font-family=\"system-ui,-apple-system,'Segoe UI',Roboto,Arial,sans-serif\""
PALETTE = ["#2f6fde", "#d64545", "#1f9d55", "#c27c0e", "#7b4fd6", "#0f9bb0", "#b0478a", "#5b6b7f"]


def esc(text):
    return html.escape(str(text), quote=True)


def load(path):
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                rows.append(json.loads(line))
    return rows


def cpu_chart(rows, note):
    """Grouped horizontal bars: one group per scenario, one bar per server."""
    groups = {}
    order = []
    for row in rows:
        value = row.get("server_cpu_us_per_op")
        if value is None:
            print(f"cpu.svg: no server CPU figure for {row.get('scenario')} / {row.get('server')}",
                  file=sys.stderr)
            continue
        scenario = row["scenario"]
        if scenario not in groups:
            groups[scenario] = []
            order.append(scenario)
        groups[scenario].append((row["server"], float(value)))
    if not order:
        return None
    for scenario in order:
        # plexus first, then the references in the order they ran.
        groups[scenario].sort(key=lambda sv: sv[0] != "plexus")
    bar, gap, label_w, width = 18, 16, 170, 860
    plot_w = width - label_w - 90
    top = 64
    height = top + sum(len(groups[s]) * (bar + 4) + gap for s in order) + 8
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" {FONT} font-size="12">',
           f'<rect width="{width}" height="{height}" fill="#fff"/>',
           f'<text x="16" y="24" font-size="16" font-weight="600" fill="{INK}">'
           f'Server CPU per operation (µs, lower is better; bars scaled per scenario)</text>',
           f'<text x="16" y="44" fill="{MUTED}">{esc(note)}</text>']
    y = top
    for scenario in order:
        # Each scenario on its own scale (handshakes cost 30x an echo): compare within a group.
        vmax = max(v for _, v in groups[scenario]) or 1.0
        out.append(f'<line x1="{label_w}" y1="{y - 4}" x2="{label_w}" '
                   f'y2="{y + len(groups[scenario]) * (bar + 4)}" stroke="{GRID}"/>')
        out.append(f'<text x="{label_w - 10}" y="{y + bar - 4}" text-anchor="end" '
                   f'fill="{INK}" font-weight="600">{esc(scenario)}</text>')
        for server, value in groups[scenario]:
            w = max(1.0, plot_w * 0.85 * value / vmax)
            color = PLEXUS if server == "plexus" else REFERENCE
            out.append(f'<rect x="{label_w}" y="{y}" width="{w:.1f}" height="{bar}" rx="3" '
                       f'fill="{color}"><title>{esc(server)}: {value:.2f} µs</title></rect>')
            out.append(f'<text x="{label_w + w + 6:.1f}" y="{y + bar - 5}" fill="{INK}">'
                       f'{value:.2f} <tspan fill="{MUTED}">{esc(server)}</tspan></text>')
            y += bar + 4
        y += gap
    out.append("</svg>")
    return "\n".join(out) + "\n"


def read_hgrm(path):
    """(percentile, value µs) points of a percentile-distribution file; [] if unreadable."""
    points = []
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 3 or line.startswith("#"):
                    continue
                try:
                    value, quantile = float(parts[0]), float(parts[1])
                except ValueError:
                    continue
                points.append((quantile, value))
    except OSError:
        return []
    return points


def latency_chart(rows, hgrm_dir, note):
    """Small multiples: per scenario, latency (µs, log) against percentile (log of 1/(1-p))."""
    series = {}
    order = []
    for row in rows:
        scenario, server = row.get("scenario"), row.get("server")
        path = os.path.join(hgrm_dir, f"{scenario}--{server}.hgrm")
        points = [(q, v) for q, v in read_hgrm(path) if v > 0]
        if len(points) < 2:
            continue
        if scenario not in series:
            series[scenario] = []
            order.append(scenario)
        series[scenario].append((server, points))
    if not order:
        return None
    cols = 2 if len(order) > 1 else 1
    cell_w, cell_h = 420, 250
    width = cols * cell_w + 20
    rows_n = math.ceil(len(order) / cols)
    height = 60 + rows_n * cell_h + 10
    max_x = math.log10(1 / (1 - 0.9999))
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" {FONT} font-size="11">',
           f'<rect width="{width}" height="{height}" fill="#fff"/>',
           f'<text x="16" y="24" font-size="16" font-weight="600" fill="{INK}">'
           f'Latency by percentile (µs, log scale; from HDR histograms)</text>',
           f'<text x="16" y="44" fill="{MUTED}" font-size="12">{esc(note)}</text>']
    for index, scenario in enumerate(order):
        ox = 10 + (index % cols) * cell_w
        oy = 60 + (index // cols) * cell_h
        px, py, pw, ph = ox + 52, oy + 28, cell_w - 80, cell_h - 78
        values = [v for _, pts in series[scenario] for _, v in pts]
        lo = 10 ** math.floor(math.log10(min(values)))
        hi = 10 ** math.ceil(math.log10(max(values)))
        if hi <= lo:
            hi = lo * 10
        def sx(q):
            x = math.log10(1 / max(1e-12, 1 - min(q, 0.9999)))
            return px + pw * min(x, max_x) / max_x
        def sy(v):
            return py + ph - ph * (math.log10(v) - math.log10(lo)) / (math.log10(hi) - math.log10(lo))
        out.append(f'<text x="{ox + 8}" y="{oy + 16}" font-size="13" font-weight="600" '
                   f'fill="{INK}">{esc(scenario)}</text>')
        decade = lo
        while decade <= hi * 1.001:
            y = sy(decade)
            out.append(f'<line x1="{px}" y1="{y:.1f}" x2="{px + pw}" y2="{y:.1f}" stroke="{GRID}"/>')
            out.append(f'<text x="{px - 6}" y="{y + 4:.1f}" text-anchor="end" fill="{MUTED}">'
                       f'{decade:g}</text>')
            decade *= 10
        for q, label in ((0, "0"), (0.9, "90"), (0.99, "99"), (0.999, "99.9"), (0.9999, "99.99")):
            x = sx(q)
            out.append(f'<line x1="{x:.1f}" y1="{py}" x2="{x:.1f}" y2="{py + ph}" stroke="{GRID}"/>')
            out.append(f'<text x="{x:.1f}" y="{py + ph + 14}" text-anchor="middle" '
                       f'fill="{MUTED}">{label}%</text>')
        legend_x = px + 4
        for n, (server, points) in enumerate(sorted(series[scenario], key=lambda s: s[0] != "plexus")):
            color = PLEXUS if server == "plexus" else PALETTE[(n % (len(PALETTE) - 1)) + 1]
            path = " ".join(f"{'M' if i == 0 else 'L'}{sx(q):.1f},{sy(v):.1f}"
                            for i, (q, v) in enumerate(points) if q <= 0.9999)
            out.append(f'<path d="{path}" fill="none" stroke="{color}" stroke-width="2">'
                       f'<title>{esc(server)}</title></path>')
            out.append(f'<rect x="{legend_x}" y="{py + ph + 24}" width="10" height="10" fill="{color}"/>')
            out.append(f'<text x="{legend_x + 14}" y="{py + ph + 33}" fill="{INK}">{esc(server)}</text>')
            legend_x += 24 + 7 * len(server)
    out.append("</svg>")
    return "\n".join(out) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", help="the suite's JSON lines (benches/results/suite-*.jsonl)")
    parser.add_argument("--hgrm-dir", help="directory of <scenario>--<server>.hgrm files")
    parser.add_argument("--out", help="output directory (default: next to RESULTS)")
    parser.add_argument("--note", default="", help="subtitle (machine, date, run length)")
    args = parser.parse_args()
    rows = load(args.results)
    out_dir = args.out or os.path.splitext(args.results)[0] + "-charts"
    os.makedirs(out_dir, exist_ok=True)
    written = []
    cpu = cpu_chart(rows, args.note)
    if cpu:
        with open(os.path.join(out_dir, "cpu.svg"), "w", encoding="utf-8") as f:
            f.write(cpu)
        written.append("cpu.svg")
    if args.hgrm_dir:
        latency = latency_chart(rows, args.hgrm_dir, args.note)
        if latency:
            with open(os.path.join(out_dir, "latency.svg"), "w", encoding="utf-8") as f:
                f.write(latency)
            written.append("latency.svg")
    for name in written:
        print(os.path.join(out_dir, name))
    if not written:
        print("no chart written: no server CPU figures and no HDR files", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
