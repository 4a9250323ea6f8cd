"""The scenarios of issue 6. Each returns a `Table` of raw samples (one per round and
contender); bench/report.py turns them into medians, ranges and ratios. Within a round the
contenders take turns, and the turn order rotates from round to round, so drift on this shared
machine hits all of them alike."""

from __future__ import annotations

import itertools
import json
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import clients, contenders, procs
from bench.contenders import Contender, Knobs, Tls
from bench.util import percentile, say

MIB = 1024 * 1024


@dataclass
class Table:
    key: str
    title: str
    # contender -> metric -> one sample per round
    rows: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)
    text: list[str] = field(default_factory=list)
    series: dict[str, Any] = field(default_factory=dict)  # for charts

    def add(self, contender: str, **samples: float) -> None:
        row = self.rows.setdefault(contender, {})
        for metric, value in samples.items():
            row.setdefault(metric, []).append(value)


@dataclass
class Bench:
    quick: bool
    tls: Tls
    upstream: procs.Service
    upstream_port: int
    aborts: Path
    field: list[Contender]
    airgate_env: dict[str, str]

    @property
    def rounds(self) -> int:
        return 2 if self.quick else 3

    def live(self, *, direct: bool = True, litellm: bool = True) -> list[Contender]:
        return [c for c in self.field if not c.failed and (direct or c.name != "direct")
                and (litellm or not c.litellm)]

    def ssl(self, contender: Contender) -> Any:
        return self.tls.client_context() if contender.tls else None

    def turns(self, rounds: int, players: list[Contender],
              each: Callable[[int, Contender], None]) -> None:
        for r in range(rounds):
            shift = r % len(players) if players else 0
            for contender in players[shift:] + players[:shift]:
                try:
                    each(r, contender)
                except Exception as error:  # one contender's failure must not end the run
                    say(f"  {contender.name}: round {r + 1} failed: {error}")
                if contender.litellm:
                    settle(contender)

    def failed_notes(self, table: Table) -> None:
        for contender in self.field:
            if contender.failed:
                table.notes[contender.name] = contender.failed


def settle(contender: Contender, limit: float = 60.0) -> None:
    """Wait until a contender is idle (under 5% of a core over 0.5 s): LiteLLM goes on working
    for seconds after its load ends, which would land on the next contender's turn."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        before = contender.cpu()
        time.sleep(0.5)
        if contender.cpu() - before < 0.025:
            return


# ---- 1. short requests, saturated ---------------------------------------------------------------

def saturated(bench: Bench) -> Table:
    table = Table("saturated", "Short non-streamed requests, 16 keep-alive TLS connections, "
                  "saturated (wrk)")
    duration = 2.0 if bench.quick else 5.0

    def each(r: int, c: Contender) -> None:
        if c.litellm and r > 0 and bench.quick:
            return
        cpu, up = c.cpu(), bench.upstream.cpu()
        # LiteLLM answers a few dozen per second: give it long enough to count
        result = clients.wrk(c, Knobs(), 1, 16, max(duration, 5.0) if c.litellm else duration)
        cpu, up = c.cpu() - cpu, bench.upstream.cpu() - up
        n = max(result.requests, 1)
        samples = {"rps": result.rps, "upstream_us": up / n * 1e6, "errors": result.errors}
        if c.name != "direct" and result.requests:
            samples["cpu_us"] = cpu / n * 1e6
        table.add(c.name, **samples)
        say(f"  saturated {c.name}: {result.rps:,.0f} req/s, proxy {cpu / n * 1e6:,.0f} µs/req")

    bench.turns(bench.rounds, bench.live(), each)
    bench.failed_notes(table)
    table.text.append(f"wrk -t1 -c16 -d{duration:g}s, POST /v1/chat/completions max_tokens 1, "
                      "x-sim-ttft 0; the stand-in runs 2 processes. CPU is the proxy's own "
                      "(all its processes); the machine's 2 cores are shared by wrk, the proxy "
                      "and the stand-in, so requests/s is the machine's, not the proxy's alone.")
    return table


# ---- 2. open loop, 200 req/s --------------------------------------------------------------------

def rate200(bench: Bench) -> Table:
    table = Table("rate200", "Open loop at a fixed 200 req/s (asyncio + aiohttp client)")
    duration = 2.0 if bench.quick else 6.0
    direct_p: dict[int, tuple[float, float]] = {}
    players = bench.live()
    # direct first in every round, so "added" compares with the same round's floor
    direct_first = [c for c in players if c.name == "direct"]
    others = [c for c in players if c.name != "direct" and not c.litellm]
    # LiteLLM saturates below 200 req/s and its backlog would spill into the others' turns: it
    # runs once, after all the rounds.
    last = [c for c in players if c.litellm]

    def each(r: int, c: Contender) -> None:
        cpu = c.cpu()
        result = clients.run_async(lambda: clients.open_loop(c, bench.ssl(c), 200, duration,
                                                             Knobs()))
        cpu = c.cpu() - cpu
        lat = result.latencies
        p50 = percentile(lat, 50) * 1000
        p99 = percentile(lat, 99) * 1000
        samples = {"p50_ms": p50, "p99_ms": p99, "errors": result.errors}
        if c.name == "direct":
            direct_p[r] = (p50, p99)
        else:
            samples["cpu_us"] = cpu / max(len(lat) + result.errors + 3, 1) * 1e6
            if r in direct_p:
                samples["added_p50_ms"] = p50 - direct_p[r][0]
                samples["added_p99_ms"] = p99 - direct_p[r][1]
        table.add(c.name, **samples)
        say(f"  200 req/s {c.name}: p50 {p50:.2f} ms, p99 {p99:.2f} ms")

    for r in range(bench.rounds):
        for c in direct_first:
            each(r, c)
        shift = r % max(len(others), 1)
        for c in others[shift:] + others[:shift]:
            try:
                each(r, c)
            except Exception as error:
                say(f"  {c.name}: round {r + 1} failed: {error}")
    for c in last if not bench.quick else []:
        for d in direct_first:
            each(0, d)
        try:
            each(0, c)
        except Exception as error:
            say(f"  {c.name}: failed: {error}")
        settle(c)
    bench.failed_notes(table)
    table.text.append(f"{duration:g} s per run; latency from each request's scheduled send time "
                      "(no coordinated omission); 'added' is against direct (plain HTTP) in the "
                      "same round. LiteLLM is run once: it saturates below 200 req/s.")
    return table


# ---- 3. streams: 10 chunks 200 ms apart ----------------------------------------------------------

def streams(bench: Bench) -> Table:
    table = Table("streams", "One stream, 10 chunks 200 ms apart, warm connection")
    rounds = 2 if bench.quick else 5
    knobs = Knobs(0.2, 0.2)
    arrivals: dict[str, list[list[float]]] = {}
    players = bench.live()
    direct = [c for c in players if c.name == "direct"]
    others = [c for c in players if c.name != "direct"]
    for r in range(rounds):
        shift = r % max(len(others), 1)
        for c in direct + others[shift:] + others[:shift]:
            try:
                times = clients.run_async(lambda c=c: clients.stream_arrivals(
                    c, bench.ssl(c), knobs, 10))  # type: ignore[misc]
            except Exception as error:
                say(f"  {c.name}: round {r + 1} failed: {error}")
                continue
            arrivals.setdefault(c.name, []).append(times)
            samples = {"first_ms": times[0] * 1000 if times else float("nan"),
                       "spread_ms": (times[-1] - times[0]) * 1000 if times else float("nan"),
                       "chunks": len(times)}
            table.add(c.name, **samples)
            say(f"  stream {c.name}: first chunk {samples['first_ms']:.1f} ms, "
                f"{len(times)} chunks over {samples['spread_ms']:.0f} ms")
    # Against direct, chunk by chunk, on the medians over rounds: the stand-in's own timer
    # jitter differs from run to run, and medians keep it from passing for the proxy's.
    floor_median = _per_chunk_median(arrivals.get("direct", []))
    for name, runs in arrivals.items():
        mine = _per_chunk_median(runs)
        if name == "direct" or not floor_median or len(mine) != len(floor_median):
            continue
        row = table.rows[name]
        row["first_vs_direct_ms"] = [(mine[0] - floor_median[0]) * 1000]
        row["worst_chunk_vs_direct_ms"] = [max(abs(a - b) for a, b in
                                               zip(mine, floor_median, strict=True)) * 1000]
    bench.failed_notes(table)
    table.series["arrivals"] = arrivals
    table.text.append("x-sim-ttft 0.2, x-sim-interval 0.2, max_tokens 10; times from sending the "
                      "request to each token-carrying `data:` event. 'vs direct' compares the "
                      "median arrival of each chunk over the rounds with direct's; 'worst chunk' "
                      "is the largest such difference over the 10 chunks.")
    return table


def _per_chunk_median(runs: list[list[float]]) -> list[float]:
    length = min((len(r) for r in runs), default=0)
    return [sorted(r[i] for r in runs)[len(runs) // 2] for i in range(length)]


# ---- 4. 1,000 streams at once -------------------------------------------------------------------

def burst_once(bench: Bench, c: Contender, clients_n: int = 1000) -> dict[str, float]:
    before_rss, cpu = c.rss(), c.cpu()
    result = clients.h2load_burst(c, Knobs(0.05, 0.05), 20, clients_n)
    cpu = c.cpu() - cpu
    time.sleep(1.0)  # let closed connections be torn down
    return {"errors": result.errors, "cpu_s": cpu,
            "rss_growth_mib": (c.rss() - before_rss) / MIB, "rss_after_mib": c.rss() / MIB,
            "seconds": result.seconds}


def burst(bench: Bench) -> Table:
    table = Table("burst", "1,000 streams opened at once (h2load --h1 -c 1000), 20 chunks "
                  "50 ms apart")

    def each(r: int, c: Contender) -> None:
        if c.litellm and (bench.quick or r > 0):
            return
        samples = burst_once(bench, c)
        if c.name == "direct":
            samples.pop("cpu_s")
            samples.pop("rss_growth_mib")
            samples.pop("rss_after_mib")
        table.add(c.name, **samples)
        say(f"  burst {c.name}: {samples['errors']:.0f} errors, "
            f"CPU {samples.get('cpu_s', 0):.2f} s, RSS +{samples.get('rss_growth_mib', 0):.1f} "
            f"MiB, {samples['seconds']:.1f} s")

    bench.turns(1 if bench.quick else bench.rounds, bench.live(), each)
    bench.failed_notes(table)
    if bench.quick:
        table.notes.setdefault("litellm", "skipped in --quick (one burst costs it ~30 CPU s)")
    table.text.append("Each of the 1,000 connections does a TLS handshake and one streamed "
                      "request; errors are requests without a 2xx. RSS growth is measured 1 s "
                      "after the burst against just before it, on the same long-running process "
                      "(so later rounds show retention, not first-touch). LiteLLM: one round.")
    return table


# ---- 5. soak ------------------------------------------------------------------------------------

def soak(bench: Bench, steady_seconds: float) -> Table:
    table = Table("soak", "Soak: 10 bursts of 1,000 streams in a row, then steady load")
    airgate = next((c for c in bench.live() if c.name == "airgate"), None)
    if airgate is None:
        table.notes["airgate"] = "did not start"
        return table
    rss: list[float] = [airgate.rss() / MIB]
    for i in range(10):
        samples = burst_once(bench, airgate)
        rss.append(samples["rss_after_mib"])
        table.add("airgate", **{f"burst_{i + 1}_mib": samples["rss_after_mib"]})
        say(f"  soak burst {i + 1}: RSS {samples['rss_after_mib']:.1f} MiB, "
            f"{samples['errors']:.0f} errors")
    steady: list[float] = []
    started = time.monotonic()
    while time.monotonic() - started < steady_seconds:
        clients.run_async(lambda: clients.open_loop(airgate, bench.ssl(airgate), 200, 10.0,
                                                    Knobs()))
        steady.append(airgate.rss() / MIB)
        say(f"  soak steady {time.monotonic() - started:.0f} s: RSS {steady[-1]:.1f} MiB")
    table.series["bursts"] = rss
    table.series["steady"] = steady
    later = [b - a for a, b in itertools.pairwise(rss[5:])]
    table.series["late_growth_per_burst"] = sum(later) / len(later) if later else 0.0
    table.text.append(f"airgate only. Steady load: 200 req/s short requests for "
                      f"{steady_seconds:.0f} s (shortened from the issue's 10 minutes to keep the "
                      "full run within 15 minutes), RSS sampled every 10 s. Plateau means the "
                      "mean growth per burst over bursts 6-10 is at most 1 MiB.")
    return table


# ---- 6. 8 MiB prompt ----------------------------------------------------------------------------

def big_prompt(bench: Bench) -> Table:
    table = Table("bigbody", "8 MiB prompt, non-streamed, warm connection")
    size = 8 * MIB

    def each(r: int, c: Contender) -> None:
        result = clients.run_async(lambda: clients.big_prompt(c, bench.ssl(c), size))
        samples = {"status": result.status, "time_ms": result.seconds * 1000}
        if c.name != "direct":
            samples["rss_peak_growth_mib"] = result.rss_peak_growth / MIB
        table.add(c.name, **samples)
        say(f"  8 MiB {c.name}: {result.status} in {result.seconds * 1000:.0f} ms, RSS peak "
            f"+{result.rss_peak_growth / MIB:.1f} MiB")

    bench.turns(bench.rounds, bench.live(), each)
    bench.failed_notes(table)
    table.text.append("One word of 8 MiB as the user message (the stand-in's context check "
                      "passes); time from sending to the whole answer; RSS sampled every 2 ms.")
    return table


# ---- 7. CPU per streamed chunk, and usage counting on/off ---------------------------------------

def _usage_seen(contender: Contender) -> str:
    """Whether airgate's metrics listener shows token counts after streams ('' if so)."""
    port = contender.url.rsplit(":", 1)[1]
    config = (contenders.WORK / contender.name / "airgate.toml").read_text()
    metrics_port = config.split('listen = "127.0.0.1:', 1)[1].split('"', 1)[0]
    del port
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
            text = r.read().decode(errors="replace")
    except Exception as error:
        return f"no metrics listener answered ({type(error).__name__})"
    counted = [line for line in text.splitlines()
               if not line.startswith("#") and "token" in line and not line.endswith(" 0.0")]
    return "" if counted else "no token counters with a value on /metrics"


def stream_cpu(bench: Bench, airgate_factory: Callable[[str, bool], Contender]) -> Table:
    table = Table("stream_cpu", "CPU per streamed chunk: 50 streams at once, 40 chunks "
                  "20 ms apart (and airgate with usage counting on/off)")
    knobs, tokens, concurrency = Knobs(0.0, 0.02), 40, 50
    on, off = airgate_factory("airgate-usage-on", True), airgate_factory("airgate-usage-off",
                                                                         False)
    extra = [c for c in (on, off) if not c.failed]
    for c in (on, off):
        if c.failed:
            table.notes[c.name] = c.failed

    def each(r: int, c: Contender) -> None:
        cpu = c.cpu()
        events, errors = clients.run_async(lambda: clients.many_streams(
            c, bench.ssl(c), knobs, tokens, concurrency))
        cpu = c.cpu() - cpu
        table.add(c.name, cpu_us_per_chunk=cpu / max(events, 1) * 1e6, chunks=events,
                  errors=errors)
        say(f"  stream CPU {c.name}: {cpu / max(events, 1) * 1e6:.1f} µs/chunk ({events} chunks)")

    try:
        bench.turns(bench.rounds, bench.live(direct=False) + extra, each)
        if not on.failed:
            why = _usage_seen(on)
            table.series["usage_implemented"] = not why
            if why:
                table.notes["airgate-usage-on"] = f"usage counting not implemented yet ({why})"
    finally:
        on.stop()
        off.stop()
    bench.failed_notes(table)
    table.text.append("A chunk is one `data:` event. The usage variants run `[metrics] listen` on "
                      "a port with `usage = true` / `false`; everything else as airgate.")
    return table


# ---- 8. client gives up mid-stream -------------------------------------------------------------

def hang_up(bench: Bench) -> Table:
    table = Table("hangup", "Client gives up mid-stream: time until the upstream sees the close")
    rounds = 2 if bench.quick else 5
    wait = 2.0 if bench.quick else 5.0

    def each(r: int, c: Contender) -> None:
        seconds = clients.run_async(lambda: clients.hang_up(c, bench.ssl(c), bench.aborts,
                                                            Knobs(0.0, 0.05), wait))
        time.sleep(0.2)
        if seconds is None:
            table.add(c.name, seen=0)
            say(f"  hang-up {c.name}: upstream saw no abort within {wait:g} s")
        else:
            table.add(c.name, seen=1, close_ms=seconds * 1000)
            say(f"  hang-up {c.name}: upstream aborted {seconds * 1000:.1f} ms after the close")

    bench.turns(rounds, bench.live(), each)
    bench.failed_notes(table)
    table.text.append("The client reads 3 chunks of a long stream (50 ms apart) and closes the "
                      "connection; the stand-in (bench/upstream.py) writes the monotonic time at "
                      f"which it aborted the generation. Not seen within {wait:g} s counts as a "
                      "miss; 'seen' is the share of rounds where the abort arrived.")
    return table


# ---- 9. workers --------------------------------------------------------------------------------

def workers(bench: Bench, factory: Callable[[str, int, int], Contender]) -> Table:
    table = Table("workers", "`[server] workers = 2` vs 1, saturated, 2-process upstream")
    duration = 3.0 if bench.quick else 5.0
    one = next((c for c in bench.live() if c.name == "airgate"), None)
    if one is None:
        table.notes["airgate"] = "did not start"
        return table
    two = factory("airgate-workers2", 2, 1)
    count = 0 if two.failed else len(two.pids())
    table.series["workers2_processes"] = count
    variants = [two]
    if two.failed:
        table.notes[two.name] = two.failed
    elif count < 2:
        table.notes[two.name] = f"`workers = 2` runs {count} process: not implemented yet"
        # what the setting should amount to: two single-process servers on one port
        pair = factory("airgate-2proc", 2, 2)
        variants.append(pair)
        if pair.failed:
            table.notes[pair.name] = pair.failed
    players = [one] + [c for c in variants if not c.failed]

    def each(r: int, c: Contender) -> None:
        cpu = c.cpu()
        result = clients.wrk(c, Knobs(), 1, 16, duration)
        cpu = c.cpu() - cpu
        table.add(c.name, rps=result.rps, cpu_us=cpu / max(result.requests, 1) * 1e6,
                  errors=result.errors, processes=len(c.pids()))
        say(f"  workers {c.name}: {result.rps:,.0f} req/s ({len(c.pids())} processes)")

    try:
        bench.turns(bench.rounds, players, each)
    finally:
        for c in variants:
            c.stop()
    table.text.append("The processes column counts every process of the contender (a "
                      "supervisor included). Only where `workers = 2` does not fork, "
                      "airgate-2proc runs two `airgate serve` on one port (SO_REUSEPORT) to show "
                      "what the setting should amount to. On a 2-core machine wrk and the "
                      "2-process stand-in share the same cores, which caps any speed-up well "
                      "below 2x.")
    return table


def dump(tables: list[Table], path: Path) -> None:
    path.write_text(json.dumps([t.__dict__ for t in tables], indent=1, default=str))
