"""Turns the scenarios' samples into bench/results/LATEST.md (medians with min-max, ratios
against nginx-tuned, the targets of issue 6 with a verdict) and PNG charts next to it."""

from __future__ import annotations

import math
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.scenarios import Table
from bench.util import median

REFERENCE = "nginx-tuned"
ORDER = ("direct", "airgate", "nginx-seed", "nginx-tuned", "litellm")

# table key -> [(metric, label, digits, ratio against nginx-tuned?)]
COLUMNS: dict[str, list[tuple[str, str, int, bool]]] = {
    "saturated": [("cpu_us", "proxy CPU µs/request", 1, True), ("rps", "requests/s", 0, True),
                  ("upstream_us", "stand-in CPU µs/request", 1, False),
                  ("errors", "errors", 0, False)],
    "rate200": [("added_p50_ms", "added p50 ms", 2, False),
                ("added_p99_ms", "added p99 ms", 2, False), ("p50_ms", "p50 ms", 2, False),
                ("p99_ms", "p99 ms", 2, False), ("cpu_us", "proxy CPU µs/request", 1, True),
                ("errors", "errors", 0, False)],
    "streams": [("first_ms", "first chunk ms", 1, False),
                ("first_vs_direct_ms", "first chunk vs direct ms", 2, False),
                ("worst_chunk_vs_direct_ms", "worst chunk vs direct ms", 2, False),
                ("spread_ms", "first→last chunk ms", 0, False), ("chunks", "chunks", 0, False)],
    "burst": [("errors", "errors", 0, False), ("cpu_s", "proxy CPU s", 2, True),
              ("rss_growth_mib", "RSS growth MiB", 1, False),
              ("rss_after_mib", "RSS after MiB", 1, False), ("seconds", "wall s", 2, False)],
    "bigbody": [("status", "status", 0, False), ("time_ms", "time ms", 1, True),
                ("rss_peak_growth_mib", "RSS peak growth MiB", 1, False)],
    "stream_cpu": [("cpu_us_per_chunk", "proxy CPU µs/chunk", 2, True),
                   ("chunks", "chunks", 0, False), ("errors", "errors", 0, False)],
    "hangup": [("close_ms", "close → upstream abort ms", 1, False),
               ("seen", "share seen", 2, False)],
    "workers": [("rps", "requests/s", 0, False), ("cpu_us", "CPU µs/request", 1, False),
                ("processes", "processes", 0, False), ("errors", "errors", 0, False)],
}


def _fmt(value: float, digits: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:,.{digits}f}"


def cell(samples: Sequence[float] | None, digits: int, mean: bool = False) -> str:
    if not samples:
        return "—"
    mid = sum(samples) / len(samples) if mean else median(samples)
    if len(samples) == 1 or min(samples) == max(samples):
        return _fmt(mid, digits)
    return f"{_fmt(mid, digits)} ({_fmt(min(samples), digits)}-{_fmt(max(samples), digits)})"


def med(table: Table | None, contender: str, metric: str) -> float:
    if table is None:
        return float("nan")
    return median(table.rows.get(contender, {}).get(metric, []))


def _ordered(names: Sequence[str]) -> list[str]:
    return sorted(names, key=lambda n: (ORDER.index(n) if n in ORDER else len(ORDER), n))


def render_table(table: Table) -> list[str]:
    columns = COLUMNS.get(table.key, [])
    header = ["contender"]
    for _, label, _, ratio in columns:
        header.append(label)
        if ratio:
            header.append("x nginx-tuned")
    lines = [f"### {table.title}", "", "| " + " | ".join(header) + " |",
             "|" + "---|" * len(header)]
    for name in _ordered(list(table.rows)):
        row = [name]
        for metric, _, digits, ratio in columns:
            samples = table.rows[name].get(metric)
            row.append(cell(samples, digits, mean=metric == "seen"))
            if ratio:
                ref = med(table, REFERENCE, metric)
                mine = median(samples) if samples else float("nan")
                row.append(_fmt(mine / ref, 2) if ref and not math.isnan(ref) else "—")
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    for name, note in table.notes.items():
        lines.append(f"- **{name}**: {note}")
    lines += [f"- {text}" for text in table.text]
    lines.append("")
    return lines


def _verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("**met**" if ok else "**missed**")


def _nan(value: float) -> bool:
    return isinstance(value, float) and math.isnan(value)


def targets(tables: dict[str, Table]) -> list[str]:
    t = tables.get
    rows: list[tuple[str, str, str, str, str, str, bool | None]] = []

    def ratio(a: float, b: float) -> float:
        return a / b if b and not _nan(a) and not _nan(b) else float("nan")

    def check(value: float, limit: float, below: bool = True) -> bool | None:
        if _nan(value):
            return None
        return value <= limit if below else value >= limit

    sat = t("saturated")
    a_cpu, n_cpu = med(sat, "airgate", "cpu_us"), med(sat, REFERENCE, "cpu_us")
    l_cpu = med(sat, "litellm", "cpu_us")
    rows.append(("short requests, saturated", "proxy CPU µs/request", "≤ 1.0x nginx-tuned",
                 _fmt(a_cpu, 1), _fmt(n_cpu, 1), f"{_fmt(ratio(a_cpu, n_cpu), 2)}x",
                 check(ratio(a_cpu, n_cpu), 1.0)))
    a_rps, n_rps = med(sat, "airgate", "rps"), med(sat, REFERENCE, "rps")
    rows.append(("", "requests/s", "≥ nginx-tuned", _fmt(a_rps, 0), _fmt(n_rps, 0),
                 f"{_fmt(ratio(a_rps, n_rps), 2)}x", check(ratio(a_rps, n_rps), 1.0, False)))
    rows.append(("", "requests per CPU-second vs LiteLLM", "≥ 50x LiteLLM", _fmt(a_cpu, 1),
                 f"LiteLLM {_fmt(l_cpu, 0)}", f"{_fmt(ratio(l_cpu, a_cpu), 0)}x",
                 check(ratio(l_cpu, a_cpu), 50, False)))
    r200 = t("rate200")
    for metric, label, limit in (("added_p50_ms", "added p50 ms", 0.5),
                                 ("added_p99_ms", "added p99 ms", 1.0)):
        value = med(r200, "airgate", metric)
        rows.append(("open loop 200 req/s" if metric == "added_p50_ms" else "", label,
                     f"≤ {limit}", _fmt(value, 2), _fmt(med(r200, REFERENCE, metric), 2), "",
                     check(value, limit)))
    a, s, n = (med(r200, c, "cpu_us") for c in ("airgate", "nginx-seed", REFERENCE))
    rows.append(("", "proxy CPU µs/request", "≤ 1.0x seed, ≤ 1.5x tuned", _fmt(a, 1), _fmt(n, 1),
                 f"{_fmt(ratio(a, s), 2)}x seed, {_fmt(ratio(a, n), 2)}x tuned",
                 None if _nan(ratio(a, n)) else (ratio(a, s) <= 1.0 and ratio(a, n) <= 1.5)))
    st = t("streams")
    for metric, label, limit in (("first_vs_direct_ms", "first chunk vs direct ms", 1.0),
                                 ("worst_chunk_vs_direct_ms", "worst chunk vs direct ms", 2.0)):
        value = med(st, "airgate", metric)
        rows.append(("stream, 10 chunks 200 ms apart" if limit == 1.0 else "", label,
                     f"≤ {limit:g}", _fmt(value, 2), _fmt(med(st, REFERENCE, metric), 2), "",
                     check(abs(value), limit)))
    bu = t("burst")
    errors = max(bu.rows.get("airgate", {}).get("errors", [float("nan")])) if bu else math.nan
    rows.append(("1,000 streams at once", "errors (worst round)", "0", _fmt(errors, 0),
                 _fmt(med(bu, REFERENCE, "errors"), 0), "", check(errors, 0)))
    a, n = med(bu, "airgate", "cpu_s"), med(bu, REFERENCE, "cpu_s")
    rows.append(("", "proxy CPU s", "≤ 1.5x nginx-tuned", _fmt(a, 2), _fmt(n, 2),
                 f"{_fmt(ratio(a, n), 2)}x", check(ratio(a, n), 1.5)))
    growth = max(bu.rows.get("airgate", {}).get("rss_growth_mib", [math.nan])) if bu else math.nan
    rows.append(("", "RSS growth MiB (worst burst)", "≤ 40", _fmt(growth, 1),
                 _fmt(med(bu, REFERENCE, "rss_growth_mib"), 1), "", check(growth, 40)))
    so = t("soak")
    if so is not None and so.series.get("bursts"):
        late = float(so.series["late_growth_per_burst"])
        rows.append(("soak: 10 bursts + steady load", "RSS growth per burst, bursts 6-10, MiB",
                     "plateau (≤ 1)", _fmt(late, 2), "", "", check(late, 1.0)))
    else:
        rows.append(("soak", "RSS after each burst", "plateau", "full mode only", "", "", None))
    bb = t("bigbody")
    a, n = med(bb, "airgate", "time_ms"), med(bb, REFERENCE, "time_ms")
    rows.append(("8 MiB prompt", "time ms", "≤ 1.2x nginx-tuned", _fmt(a, 1), _fmt(n, 1),
                 f"{_fmt(ratio(a, n), 2)}x", check(ratio(a, n), 1.2)))
    g = med(bb, "airgate", "rss_peak_growth_mib")
    rows.append(("", "RSS peak growth MiB", "≤ 16 (2x body)", _fmt(g, 1),
                 _fmt(med(bb, REFERENCE, "rss_peak_growth_mib"), 1), "", check(g, 16)))
    sc = t("stream_cpu")
    on, off = med(sc, "airgate-usage-on", "cpu_us_per_chunk"), med(sc, "airgate-usage-off",
                                                                    "cpu_us_per_chunk")
    implemented = sc.series.get("usage_implemented") if sc else None
    rows.append(("usage counting on streams", "CPU/chunk on ÷ off", "≤ 1.10",
                 f"{_fmt(ratio(on, off), 2)}x" + ("" if implemented else " (not implemented yet)"),
                 "", f"{_fmt(on, 2)} vs {_fmt(off, 2)} µs",
                 None if not implemented else check(ratio(on, off), 1.10)))
    hu = t("hangup")
    a = med(hu, "airgate", "close_ms")
    seen = hu.rows.get("airgate", {}).get("seen", []) if hu else []
    rows.append(("client gives up mid-stream", "close → upstream abort ms (median)", "≤ 100",
                 _fmt(a, 1) + ("" if all(seen) else f" ({seen.count(0)} not seen)"),
                 _fmt(med(hu, REFERENCE, "close_ms"), 1), "",
                 check(a, 100) if seen and all(seen) else (False if seen else None)))
    wk = t("workers")
    w1, w2 = med(wk, "airgate", "rps"), med(wk, "airgate-workers2", "rps")
    p2 = med(wk, "airgate-2proc", "rps")
    procs2 = wk.series.get("workers2_processes", 0) if wk else 0
    rows.append(("`workers = 2` vs 1", "requests/s ratio", "≥ 1.7x",
                 f"{_fmt(ratio(w2, w1), 2)}x ({procs2} process{'es' if procs2 != 1 else ''})",
                 "", f"2 processes by hand: {_fmt(ratio(p2, w1), 2)}x",
                 check(ratio(w2, w1), 1.7, False)))
    out = ["| scenario | measure | target | airgate | nginx-tuned | ratio / detail | verdict |",
           "|---|---|---|---|---|---|---|"]
    out += [f"| {a} | {b} | {c} | {d} | {e} | {f} | {_verdict(ok)} |"
            for a, b, c, d, e, f, ok in rows]
    return out


def machine(info: dict[str, str]) -> list[str]:
    model = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
        memory = int(Path("/proc/meminfo").read_text().split()[1]) / 1024 / 1024
    except OSError:
        memory = float("nan")
    import os

    lines = [f"- CPU: {model}, {os.cpu_count()} cores; memory {memory:.0f} GiB; "
             f"kernel {platform.release()} ({platform.system()} {platform.machine()})"]
    lines += [f"- {key}: {value}" for key, value in info.items()]
    return lines


def charts(tables: dict[str, Table], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made: list[str] = []
    colors = {"direct": "#888888", "airgate": "#1f77b4", "nginx-seed": "#d62728",
              "nginx-tuned": "#2ca02c", "litellm": "#9467bd"}

    def bars(key: str, metric: str, title: str, ylabel: str, name: str, log: bool) -> None:
        table = tables.get(key)
        if table is None:
            return
        names = [n for n in _ordered(list(table.rows)) if table.rows[n].get(metric)]
        if not names:
            return
        values = [median(table.rows[n][metric]) for n in names]
        low = [v - min(table.rows[n][metric]) for n, v in zip(names, values, strict=True)]
        high = [max(table.rows[n][metric]) - v for n, v in zip(names, values, strict=True)]
        fig, ax = plt.subplots(figsize=(7, 3.6))
        ax.bar(names, values, yerr=[low, high], capsize=4,
               color=[colors.get(n, "#17becf") for n in names])
        if log:
            ax.set_yscale("log")
        for i, v in enumerate(values):
            ax.annotate(f"{v:,.1f}", (i, v), ha="center", va="bottom", fontsize=8)
        ax.set_title(title)
        ax.set_ylabel(ylabel)
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        made.append(name)

    bars("saturated", "cpu_us", "Proxy CPU per short request at saturation (log scale)",
         "µs per request", "cpu_per_request.png", True)
    bars("stream_cpu", "cpu_us_per_chunk", "Proxy CPU per streamed chunk (log scale)",
         "µs per chunk", "cpu_per_chunk.png", True)
    bars("burst", "cpu_s", "Proxy CPU for 1,000 streams opened at once", "CPU seconds",
         "burst_cpu.png", False)
    streams = tables.get("streams")
    if streams is not None and streams.series.get("arrivals"):
        fig, ax = plt.subplots(figsize=(7, 3.8))
        for name in _ordered(list(streams.series["arrivals"])):
            runs: list[list[float]] = streams.series["arrivals"][name]
            length = max((len(r) for r in runs), default=0)
            points = [median([r[i] for r in runs if len(r) > i]) * 1000 for i in range(length)]
            ax.plot(range(1, length + 1), points, marker="o", label=name,
                    color=colors.get(name), linestyle="--" if name == "direct" else "-")
        ax.set_xlabel("chunk")
        ax.set_ylabel("arrival, ms after the request")
        ax.set_title("Stream of 10 chunks 200 ms apart: when each chunk reaches the client")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "stream_arrivals.png", dpi=110)
        plt.close(fig)
        made.append("stream_arrivals.png")
    soak = tables.get("soak")
    if soak is not None and soak.series.get("bursts"):
        fig, ax = plt.subplots(figsize=(7, 3.4))
        bursts: list[float] = soak.series["bursts"]
        steady: list[float] = soak.series.get("steady", [])
        ax.plot(range(len(bursts)), bursts, marker="o", label="after burst N")
        ax.plot([len(bursts) - 1 + (i + 1) * 0.5 for i in range(len(steady))], steady,
                marker="x", label="steady load (every 10 s)")
        ax.set_xlabel("burst (0 = before)")
        ax.set_ylabel("airgate RSS, MiB")
        ax.set_title("Soak: airgate RSS after each burst of 1,000 streams")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "soak_rss.png", dpi=110)
        plt.close(fig)
        made.append("soak_rss.png")
    return made


def write(path: Path, tables: list[Table], info: dict[str, str], mode: str, seconds: float,
          profile: list[str], extra: list[str]) -> None:
    by_key = {t.key: t for t in tables}
    try:
        pictures = charts(by_key, path.parent)
    except ImportError:
        pictures = []
    lines = ["# airgate benchmark: side by side", "",
             f"Generated by `bench/run.py` ({mode} mode, {seconds / 60:.1f} minutes); "
             "do not edit by hand — run `make bench` (or `make bench-quick`).", "",
             "Every contender runs on loopback in front of the same stand-in vLLM "
             "(proxy.simulator's app via bench/upstream.py: 2 processes on one SO_REUSEPORT "
             "port, listen backlog 2048, so the stand-in is not the bottleneck), every one over "
             "TLS with the same certificate, except **direct**, which is plain HTTP straight to "
             "the stand-in: the floor. Figures are medians with (min-max) over rounds in which "
             "the contenders take turns in rotating order. CPU is the proxy's own, from "
             "/proc/PID/stat (utime+stime of all its processes).", "",
             "## Machine", "", *machine(info), "", *extra,
             "## Targets (issue 6)", "", *targets(by_key), ""]
    for name in pictures:
        lines.append(f"![{name}]({name})")
    lines += ["", "## Scenarios", ""]
    for table in tables:
        lines += render_table(table)
    if by_key.get("soak") is not None:
        soak = by_key["soak"]
        lines += ["### Soak series (airgate RSS, MiB)", "",
                  "- before and after each burst: " + ", ".join(
                      f"{v:.1f}" for v in soak.series.get("bursts", [])),
                  "- steady load, every 10 s: " + ", ".join(
                      f"{v:.1f}" for v in soak.series.get("steady", [])), ""]
    lines += ["## Profile of airgate at saturation", "", *profile, ""]
    path.write_text("\n".join(lines))


def table_json(tables: list[Table]) -> list[dict[str, Any]]:
    return [t.__dict__ for t in tables]


README_START = "<!-- bench:start (written by `make bench` from bench/results/LATEST.md) -->"
README_END = "<!-- bench:end -->"
README_CHART = "stream_arrivals.png"


def readme_section(latest_md: str) -> str:
    """The README's benchmark block: the run's header line, its targets table and one chart,
    taken from LATEST.md so the two never disagree."""
    header = latest_md.split("\n\n")[1] if "\n\n" in latest_md else ""
    run = header.split("(", 1)[-1].split(")", 1)[0]  # "full mode, 10.3 minutes"
    machine_lines = latest_md.split("## Machine\n\n", 1)[-1].split("\n\n", 1)[0].splitlines()
    cpu = next((line.removeprefix("- CPU: ") for line in machine_lines
                if line.startswith("- CPU:")), "")
    source = next((line.removeprefix("- airgate: ") for line in machine_lines
                   if line.startswith("- airgate:")), "")
    table = latest_md.split("## Targets (issue 6)\n\n", 1)[-1].split("\n\n", 1)[0]
    return "\n".join([
        README_START,
        f"Last run ({run}; {cpu}; airgate {source}), from `bench/results/LATEST.md`:",
        "", table, "",
        f"![When each chunk of a stream reaches the client](bench/results/{README_CHART})",
        README_END])


def update_readme(readme: Path, latest: Path) -> bool:
    """Rewrite the block between the markers; False when the README has no markers."""
    text = readme.read_text()
    start, end = text.find(README_START), text.find(README_END)
    if start < 0 or end < start:
        return False
    new = text[:start] + readme_section(latest.read_text()) + text[end + len(README_END):]
    readme.write_text(new)
    return True
