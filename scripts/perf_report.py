"""Turn a pytest-benchmark JSON results file into docs/performance.md and one PNG per comparison.

    python scripts/perf_report.py [RESULTS.json] [--out docs/performance.md] [--charts docs/perf]

A comparison is a pytest-benchmark *group*. In each group one benchmark is
the peer (``benchmark.extra_info["peer"] = True``); every other benchmark of
the group is shown as a ratio against it, measured in the same run:
``peer median / benchmark median``, so 2.0x means twice as fast as the peer.
``extra_info["label"]`` names a bar (default: the test's parameter or name);
``extra_info["ops"]`` (operations per round) adds a per-operation time.
See docs/benchmarks.md for the convention. Groups without a peer are listed
with their times and a note instead of ratios.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "ungrouped"


def label_of(bench: dict[str, Any]) -> str:
    extra = bench.get("extra_info") or {}
    if extra.get("label"):
        return str(extra["label"])
    param = bench.get("param")
    return str(param) if param not in (None, "") else bench["name"]


def fmt_time(seconds: float) -> str:
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6), ("ns", 1e-9)):
        if seconds >= scale or unit == "ns":
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds:.3g} s"  # pragma: no cover


def machine_line(doc: dict[str, Any]) -> str:
    m = doc.get("machine_info") or {}
    cpu = m.get("cpu") or {}
    brand = cpu.get("brand_raw") or m.get("processor") or "unknown CPU"
    count = cpu.get("count")
    parts = [brand, f"{count} CPUs" if count else None, m.get("machine"),
             f"{m.get('system', '')} {m.get('release', '')}".strip() or None,
             f"Python {m.get('python_version')}" if m.get("python_version") else None]
    return ", ".join(p for p in parts if p)


def run_date(doc: dict[str, Any]) -> str:
    raw = doc.get("datetime")
    try:
        return datetime.fromisoformat(str(raw).replace("Z", "+00:00")).date().isoformat()
    except ValueError:
        return str(raw or "unknown date")


def comparisons(doc: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for bench in doc.get("benchmarks", []):
        groups[bench.get("group") or "ungrouped"].append(bench)
    return dict(sorted(groups.items()))


def analyse(benches: list[dict[str, Any]]) -> tuple[dict[str, Any] | None, list[dict[str, Any]], str]:
    """(peer, rows, note). Each row: label, median, iqr, rounds, per_op, ratio, peer."""
    peers = [b for b in benches if (b.get("extra_info") or {}).get("peer")]
    note = ""
    if len(peers) > 1:
        note = f"{len(peers)} benchmarks claim to be the peer; the first, {label_of(peers[0])!r}, is used"
    elif not peers:
        note = "no benchmark in this group is marked as the peer (extra_info['peer'] = True): no ratios"
    peer = peers[0] if peers else None
    rows = []
    for b in benches:
        s = b["stats"]
        ops = (b.get("extra_info") or {}).get("ops")
        rows.append({
            "label": label_of(b), "name": b["name"], "median": s["median"], "iqr": s.get("iqr", 0.0),
            "rounds": s.get("rounds", 0), "per_op": s["median"] / ops if ops else None,
            "ratio": peer["stats"]["median"] / s["median"] if peer and s["median"] > 0 else None,
            "peer": b is peer,
        })
    rows.sort(key=lambda r: (not r["peer"], -(r["ratio"] or 0), r["label"]))
    return peer, rows, note


def chart(group: str, rows: list[dict[str, Any]], peer_label: str, subtitle: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r["ratio"] is not None]
    labels = [r["label"] + (" (peer)" if r["peer"] else "") for r in rows][::-1]
    ratios = [r["ratio"] for r in rows][::-1]
    colors = ["#9e9e9e" if r["peer"] else ("#2e7d32" if r["ratio"] >= 1 else "#c62828") for r in rows][::-1]
    fig, ax = plt.subplots(figsize=(7.5, 0.55 * len(rows) + 1.6))
    bars = ax.barh(labels, ratios, color=colors)
    ax.axvline(1.0, color="black", linewidth=0.8)
    for bar, ratio in zip(bars, ratios):
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {ratio:.2f}x", va="center", fontsize=9)
    ax.set_xlim(0, max(ratios) * 1.25)
    ax.set_xlabel(f"speed relative to {peer_label} (median time of {peer_label} / median time; higher is faster)")
    ax.set_title(group, fontsize=11, loc="left")
    fig.text(0.01, 0.01, subtitle, fontsize=7, color="#555555")
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render(doc: dict[str, Any], results: Path, out: Path, charts: Path) -> str:
    machine, date = machine_line(doc), run_date(doc)
    charts.mkdir(parents=True, exist_ok=True)
    lines = [
        "# Performance",
        "",
        "Generated by `scripts/perf_report.py` from the pytest-benchmark results of `bash scripts/dev.sh bench`",
        f"(`{results.relative_to(ROOT) if results.is_relative_to(ROOT) else results}`). Do not edit by hand.",
        "",
        f"- Machine: {machine}",
        f"- Date: {date}",
        "- Each comparison ran in one process, one after the other; a ratio is the peer's median time",
        "  divided by the benchmark's (2.00x: twice as fast as the peer). Medians, not means: the machine",
        "  is shared, and its neighbours show up as outliers, which the median ignores.",
        "",
    ]
    # The goals table of the Python-facing cost, made by its own interleaved
    # run (benches/bench_python_cost.py --out ...), goes first when present.
    cost = ROOT / "benches" / "results" / "python_cost.md"
    if cost.exists():
        lines += [cost.read_text().rstrip(), ""]
        # What the figures mean and what was measured around them, written by hand.
        notes = cost.with_name("python_cost_notes.md")
        if notes.exists():
            lines += [notes.read_text().rstrip(), ""]
    for group, benches in comparisons(doc).items():
        peer, rows, note = analyse(benches)
        lines += [f"## {group}", ""]
        if note:
            lines += [f"> {note}", ""]
        lines += ["| benchmark | median | IQR | rounds | per operation | vs peer |",
                  "|---|---:|---:|---:|---:|---:|"]
        for r in rows:
            ratio = "peer" if r["peer"] else (f"{r['ratio']:.2f}x" if r["ratio"] is not None else "-")
            per_op = fmt_time(r["per_op"]) if r["per_op"] is not None else "-"
            lines.append(f"| {r['label']} | {fmt_time(r['median'])} | {fmt_time(r['iqr'])} | {r['rounds']} "
                         f"| {per_op} | {ratio} |")
        lines.append("")
        if peer is not None and len(rows) > 1:
            png = charts / f"{slug(group)}.png"
            chart(group, rows, label_of(peer), f"{machine} - {date}", png)
            lines += [f"![{group}]({png.relative_to(out.parent).as_posix()})", ""]
    text = "\n".join(lines)
    out.write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="?", default=str(ROOT / "benches" / "results" / "latest.json"),
                        help="pytest-benchmark JSON (default: benches/results/latest.json)")
    parser.add_argument("--out", default=str(ROOT / "docs" / "performance.md"))
    parser.add_argument("--charts", default=str(ROOT / "docs" / "perf"))
    args = parser.parse_args(argv)
    results = Path(args.results).resolve()
    try:
        doc = json.loads(results.read_text())
    except FileNotFoundError:
        print(f"perf_report: {results} not found; run `bash scripts/dev.sh bench` first", file=sys.stderr)
        return 2
    except json.JSONDecodeError as exc:
        print(f"perf_report: {results} is not JSON ({exc})", file=sys.stderr)
        return 2
    if not doc.get("benchmarks"):
        print(f"perf_report: {results} holds no benchmarks", file=sys.stderr)
        return 2
    out = Path(args.out).resolve()
    render(doc, results, out, Path(args.charts).resolve())
    print(f"wrote {out} ({len(comparisons(doc))} comparisons)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
