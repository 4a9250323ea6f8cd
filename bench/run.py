"""`python -m bench.run [--quick]`: the side-by-side benchmark of issue 6, end to end.

Installs what is missing, starts the stand-in vLLM and every contender, runs the scenarios with
the contenders taking turns, profiles airgate at saturation, and writes bench/results/LATEST.md
and its charts. `make bench` runs the full set (about 12 minutes on 2 cores), `make bench-quick`
a shorter one (under 3 minutes once installed). A contender that cannot be installed or started
is reported as such; the run goes on without it.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench import clients, contenders, report, scenarios, tools
from bench.contenders import Contender, Knobs
from bench.util import RESULTS, ROOT, WORK, say

# Every (ttft, interval) pair the scenarios ask for: LiteLLM gets one model entry per pair.
ALL_KNOBS = [Knobs(), Knobs(0.2, 0.2), Knobs(0.05, 0.05), Knobs(0.0, 0.02), Knobs(0.0, 0.05)]


def _git(*args: str) -> str:
    done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False)
    return done.stdout.strip()


def airgate_source(ref: str) -> tuple[dict[str, str], str]:
    """The environment that runs airgate (and the stand-in) from the working tree, or from
    commit `ref` exported under bench/.work so that concurrent edits cannot change a run."""
    env = {**os.environ}
    if ref == "tree":
        dirty = " with uncommitted changes" if _git("status", "--porcelain", "proxy") else ""
        env["PYTHONPATH"] = str(ROOT)
        return env, f"working tree at {_git('rev-parse', '--short', 'HEAD')}{dirty}"
    commit = _git("rev-parse", "--short", ref)
    target = WORK / f"src-{commit}"
    if not target.exists():
        target.mkdir(parents=True)
        archive = subprocess.run(["git", "archive", commit, "proxy"], cwd=ROOT,
                                 capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    env["PYTHONPATH"] = f"{target}{os.pathsep}{ROOT}"
    return env, f"commit {commit} (exported, the working tree's edits excluded)"


# ---- profile ----------------------------------------------------------------------------------

def profile(bench: scenarios.Bench, profiler: Path | str) -> list[str]:
    airgate = next((c for c in bench.live() if c.name == "airgate"), None)
    if airgate is None:
        return ["airgate did not start: no profile."]
    seconds = 4 if bench.quick else 8
    return [*_perf_split(airgate, seconds), "", *_py_spy(airgate, seconds, profiler)]


def _record_under_load(airgate: Contender, seconds: int, recorder: list[str]) -> tuple[int, bytes]:
    """Run a profiler for `seconds` while wrk saturates airgate; (exit status, its stderr)."""
    record = subprocess.Popen(recorder, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    load = threading.Thread(target=clients.wrk, args=(airgate, Knobs(), 1, 16, seconds + 1))
    load.start()
    _, err = record.communicate(timeout=seconds + 60)
    load.join()
    return record.returncode, err


# perf's shared objects, grouped into what they are for a reader of the profile.
DSO_KINDS = (("kernel", "kernel: system calls, TCP over loopback, wake-ups"),
             ("libpython", "Python interpreter running airgate's code"),
             ("libcrypto", "TLS: OpenSSL"), ("libssl", "TLS: OpenSSL"), ("_ssl", "TLS: OpenSSL"),
             ("parser.cpython", "httptools (llhttp)"), ("loop.cpython", "uvloop"),
             ("libc", "libc (malloc, memcpy)"))


def _perf_split(airgate: Contender, seconds: int) -> list[str]:
    """Where the CPU goes, by shared object, from `perf record` (kernel included): the split
    that says whether the interpreter or the system calls are the cost."""
    tools.ensure_perf()
    if shutil.which("perf") is None:
        return ["perf is not available (apt-get install linux-perf): no split by kind."]
    data = WORK / "perf.data"
    data.unlink(missing_ok=True)
    _, err = _record_under_load(airgate, seconds, [
        "perf", "record", "-e", "cpu-clock", "-F", "499", "-o", str(data), "-p",
        str(airgate.services[0].proc.pid), "--", "sleep", str(seconds)])
    report_out = subprocess.run(
        ["perf", "report", "-i", str(data), "--no-children", "--sort", "dso", "--stdio"],
        capture_output=True, text=True, check=False).stdout
    shares: collections.Counter[str] = collections.Counter()
    for line in report_out.splitlines():
        fields = line.split()
        if len(fields) != 2 or not fields[0].endswith("%"):
            continue
        kind = next((label for marker, label in DSO_KINDS if marker in fields[1]), "other")
        shares[kind] += float(fields[0].rstrip("%"))
    if not shares:
        return [f"perf recorded nothing: {err.decode(errors='replace').strip()[-300:]}"]
    lines = [f"perf record -e cpu-clock, {seconds} s while wrk saturates airgate (kernel "
             "included). Where airgate's CPU goes:", "",
             "| kind | % of CPU |", "|---|---|"]
    lines += [f"| {kind} | {share:.1f} |" for kind, share in shares.most_common()]
    return lines


def _py_spy(airgate: Contender, seconds: int, profiler: Path | str) -> list[str]:
    """Which of airgate's Python functions the time is under (C calls, the writes included,
    are charged to the Python line that made them)."""
    if isinstance(profiler, str):
        return [f"no profiler: {profiler}"]
    out = WORK / "profile.txt"
    out.unlink(missing_ok=True)
    code, err = _record_under_load(airgate, seconds, [
        str(profiler / "py-spy"), "record", "--pid", str(airgate.services[0].proc.pid),
        "--duration", str(seconds), "--rate", "200", "--nonblocking", "--format", "raw",
        "--output", str(out)])
    if code != 0 or not out.exists():
        return [f"py-spy could not sample airgate: {err.decode(errors='replace').strip()[-300:]}"]
    leaf: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in out.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [_frame(f) for f in stack.split(";")[1:] if f]  # [0] is the thread
        if frames:
            leaf[frames[-1]] += n
        for frame in dict.fromkeys(frames):
            if "proxy/" in frame:
                inclusive[frame] += n
    if not total:
        return ["py-spy recorded no samples."]
    lines = [f"py-spy, {seconds} s at 200 Hz, same load ({total} samples, idle included). Self "
             "time by function; a C call is charged to the Python line that made it, so the "
             "two `transport.write` callers carry the TLS and socket writes beneath them, and "
             "`Runner.run` stands for uvloop's own C loop (epoll, reads, TLS reads):", "",
             "| function | self % |", "|---|---|"]
    lines += [f"| `{name}` | {100 * n / total:.1f} |" for name, n in leaf.most_common(12)]
    lines += ["", "Inclusive time of airgate's own functions:", "",
              "| function | inclusive % |", "|---|---|"]
    lines += [f"| `{name}` | {100 * n / total:.1f} |" for name, n in inclusive.most_common(10)]
    return lines


def _frame(raw: str) -> str:
    """'name (path/to/file.py:123)' -> 'name (file-ish path)', line numbers dropped."""
    name, _, where = raw.partition(" (")
    where = where.rstrip(")").rsplit(":", 1)[0]
    for marker in ("site-packages/", "lib/python3", "/work/main/", str(WORK) + "/"):
        if marker in where:
            where = where.split(marker, 1)[1]
    return f"{name} ({where})" if where else name


# ---- main -------------------------------------------------------------------------------------

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short runs, no soak (< 3 min)")
    parser.add_argument("--airgate-ref", default="tree",
                        help="'tree' (default): the working tree; or a git ref to export and run")
    parser.add_argument("--soak-seconds", type=float, default=120.0,
                        help="steady load after the soak's bursts (full mode)")
    args = parser.parse_args()
    started = time.monotonic()
    WORK.mkdir(parents=True, exist_ok=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # 1,000-connection bursts

    say("checking tools")
    missing = tools.ensure_debian()
    if missing:
        say(f"cannot run without: {', '.join(missing)} (see {WORK / 'apt.log'})")
        return 1
    if not tools.ensure_matplotlib():
        say("matplotlib did not install: LATEST.md will have no charts")
    litellm_bin = tools.ensure_litellm()
    profiler = tools.ensure_profiler()
    env, source = airgate_source(args.airgate_ref)

    say("certificates and the stand-in vLLM (2 processes)")
    tls = contenders.make_certificates(WORK / "tls")
    aborts = WORK / "aborts.log"
    upstream, port = contenders.start_upstream(2, aborts, env)
    field: list[Contender] = []
    bench = scenarios.Bench(args.quick, tls, upstream, port, aborts, field, env)
    tables: list[scenarios.Table] = []
    profile_lines: list[str] = []
    try:
        say("starting contenders")
        field += [contenders.direct(port), contenders.airgate("airgate", port, tls, env=env),
                  contenders.nginx("nginx-seed", False, port, tls),
                  contenders.nginx("nginx-tuned", True, port, tls),
                  contenders.litellm(litellm_bin, port, tls, ALL_KNOBS)]
        for contender in field:
            if contender.failed:
                continue
            problem = contenders.check(contender, tls)
            if problem:
                contender.failed = f"could not start: first request failed: {problem}"
                say(f"{contender.name}: {contender.failed}")
                contender.stop()
        say("started: " + ", ".join(c.name for c in field if not c.failed))

        def add_airgate(name: str, usage: bool) -> Contender:
            made = contenders.airgate(name, port, tls, usage=usage, env=env)
            if not made.failed and (problem := contenders.check(made, tls)):
                made.stop()
                made.failed = f"could not start: first request failed: {problem}"
            return made

        def add_workers(name: str, workers: int, processes: int) -> Contender:
            made = contenders.airgate(name, port, tls, workers=workers, processes=processes,
                                      env=env)
            if not made.failed and (problem := contenders.check(made, tls)):
                made.stop()
                made.failed = f"could not start: first request failed: {problem}"
            return made

        steps = [("short requests, saturated (wrk)", lambda: scenarios.saturated(bench)),
                 ("open loop at 200 req/s", lambda: scenarios.rate200(bench)),
                 ("streams, 10 chunks 200 ms apart", lambda: scenarios.streams(bench)),
                 ("1,000 streams at once (h2load)", lambda: scenarios.burst(bench)),
                 ("8 MiB prompt", lambda: scenarios.big_prompt(bench)),
                 ("CPU per streamed chunk, usage on/off",
                  lambda: scenarios.stream_cpu(bench, add_airgate)),
                 ("client gives up mid-stream", lambda: scenarios.hang_up(bench)),
                 ("workers = 2 vs 1", lambda: scenarios.workers(bench, add_workers))]
        if not args.quick:
            steps.append(("soak", lambda: scenarios.soak(bench, args.soak_seconds)))
        for title, step in steps:
            say(f"scenario: {title}")
            try:
                tables.append(step())
            except Exception as error:
                say(f"scenario failed: {type(error).__name__}: {error}")
        say("profiling airgate at saturation (perf, py-spy)")
        try:
            profile_lines = profile(bench, profiler)
        except Exception as error:
            profile_lines = [f"profile failed: {type(error).__name__}: {error}"]
    finally:
        for contender in field:
            contender.stop()
        upstream.stop()

    info = tools.versions(litellm_bin)
    info["airgate"] = source
    info["stand-in"] = "proxy.simulator app, 2 processes (bench/upstream.py)"
    elapsed = time.monotonic() - started
    extra = [f"- contenders that did not run: {c.name}: {c.failed}" for c in field if c.failed]
    if extra:
        extra.append("")
    for path in RESULTS.glob("*.png"):
        path.unlink()
    report.write(RESULTS / "LATEST.md", tables, info, "quick" if args.quick else "full",
                 elapsed, profile_lines, extra)
    (RESULTS / "latest.json").write_text(json.dumps(report.table_json(tables), indent=1,
                                                    default=str))
    say(f"wrote {RESULTS / 'LATEST.md'} in {elapsed / 60:.1f} minutes")
    if not args.quick and args.airgate_ref == "tree":  # the README shows full runs only
        report.update_readme(RESULTS.parent.parent / "README.md", RESULTS / "LATEST.md")
    print((RESULTS / "LATEST.md").read_text().split("## Targets (issue 6)")[1].split("![")[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
