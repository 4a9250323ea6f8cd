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
    if isinstance(profiler, str):
        return [f"no profiler: {profiler}"]
    out = WORK / "profile.txt"
    out.unlink(missing_ok=True)
    seconds = 4 if bench.quick else 8
    # --native shows the C underneath (system calls, OpenSSL, uvloop) instead of charging it
    # to the Python line that called it; it pauses airgate for each sample, which slows this
    # run a little but does not change where the time goes.
    spy = subprocess.Popen([str(profiler / "py-spy"), "record", "--pid",
                            str(airgate.services[0].proc.pid), "--duration", str(seconds),
                            "--rate", "200", "--native", "--format", "raw", "--output",
                            str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    load = threading.Thread(target=clients.wrk, args=(airgate, Knobs(), 1, 16, seconds + 1))
    load.start()
    _, err = spy.communicate(timeout=seconds + 60)
    load.join()
    if spy.returncode != 0 or not out.exists():
        return [f"py-spy could not sample airgate: {err.decode(errors='replace').strip()[-300:]}"]
    leaf: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    kinds: collections.Counter[str] = collections.Counter()
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
            kinds[_kind(frames)] += n
        for frame in dict.fromkeys(frames):
            if "proxy/" in frame:
                inclusive[frame] += n
    if not total:
        return ["py-spy recorded no samples."]
    lines = [f"py-spy --native, {seconds} s at 200 Hz while wrk saturates airgate ({total} "
             "samples, idle samples included). Where the samples are, by kind:", "",
             "| kind | % |", "|---|---|"]
    lines += [f"| {name} | {100 * n / total:.1f} |" for name, n in kinds.most_common()]
    lines += ["", "Self time by function:", "", "| function | self % |", "|---|---|"]
    lines += [f"| `{name}` | {100 * n / total:.1f} |" for name, n in leaf.most_common(12)]
    lines += ["", "Inclusive time of airgate's own functions:", "",
              "| function | inclusive % |", "|---|---|"]
    lines += [f"| `{name}` | {100 * n / total:.1f} |" for name, n in inclusive.most_common(10)]
    return lines


SYSCALL_KINDS = {"write": "`write` system call", "writev": "`write` system call",
                 "sendmsg": "`write` system call", "read": "`read` system call",
                 "recvmsg": "`read` system call", "epoll_pwait": "`epoll_pwait` (idle included)",
                 "epoll_wait": "`epoll_pwait` (idle included)"}


def _kind(frames: list[str]) -> str:
    """Which kind of work a native stack sample is: a system call, TLS, or Python."""
    leaf = frames[-1].split(" (")[0]
    if leaf in SYSCALL_KINDS:
        return SYSCALL_KINDS[leaf]
    if any(marker in frame for frame in frames[-6:]
           for marker in ("SSL", "ssl.py", "CRYPTO", "EVP_", "gcm", "aesni")):
        return "TLS (OpenSSL and the ssl module)"
    if any("proxy/" in frame for frame in frames):
        return "airgate's Python and the interpreter under it"
    return "event loop and other"


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
        say("profiling airgate at saturation (py-spy)")
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
