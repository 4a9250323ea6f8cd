#!/usr/bin/env python3
"""A stand-in `docker` / `podman` CLI for the launcher's tests (there is no container engine here).

Installed as `tests/fake_runtime/docker` and `.../podman` (links to this file); it answers the
verbs the launcher uses: version, image inspect, pull, run -d, wait, logs [-f] [--tail N],
inspect, ps, stop [-t N], rm [-f]. A "container" is the stand-in vLLM
(`python -m proxy.simulator serve MODEL --port HOSTPORT ...`) run by a small shim process that
records its exit status, as containerd's shim does.

Environment:
  FAKE_RUNTIME_LOG    file to which every invocation's argv is appended as a JSON line
  FAKE_RUNTIME_STATE  directory holding the containers' state (required)
  FAKE_RUNTIME_PYTHON interpreter for the simulator (default: the one running this script)
  FAKE_RUNTIME_BROKEN=1            `version` fails as with a stopped daemon
  FAKE_RUNTIME_MISSING_IMAGES=a,b  images that are "not on this host"
  FAKE_RUNTIME_EXIT_CODE=N         every container dies with status N ...
  FAKE_RUNTIME_EXIT_AFTER=S        ... S seconds after it starts (default 0.2) ...
  FAKE_RUNTIME_EXIT_LOG=TEXT       ... after printing TEXT
  FAKE_RUNTIME_LOAD_SECONDS=S      the simulator "loads" for S seconds before it listens
  FAKE_RUNTIME_IMAGE_STORE=1       images live in $FAKE_RUNTIME_STATE/images: `pull` and
                                   `load -i` add one, `save -o` writes a tar of one, `image
                                   inspect [--format]` and `run --pull never` know only those
                                   (unset: every image but the missing ones is "here")
A per-run plan in $FAKE_RUNTIME_STATE/plan.json overrides these for the n-th `run`:
  [{"exit_code": 137, "after": 0.2, "log": ["..."], "oom_killed": false, "load_seconds": 0}, {}]
(an empty object, or running past the list's end, means a healthy container).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
import time
import uuid
from pathlib import Path
from typing import Any

PROG = Path(sys.argv[0]).name
STATE = Path(os.environ.get("FAKE_RUNTIME_STATE", "/tmp/fake-runtime"))
# Options that take no value, per verb (every other option takes one).
RUN_FLAGS = {"-d", "--detach", "--rm", "-i", "-t", "--init"}


def record(argv: list[str], **extra: Any) -> None:
    path = os.environ.get("FAKE_RUNTIME_LOG")
    if path:
        with open(path, "a", encoding="utf-8") as file:
            file.write(json.dumps({"prog": PROG, "argv": argv, **extra}) + "\n")


def fail(message: str, code: int = 1) -> int:
    print(message, file=sys.stderr)
    return code


def paths(name: str) -> tuple[Path, Path, Path]:
    base = STATE / "containers"
    base.mkdir(parents=True, exist_ok=True)
    return base / f"{name}.json", base / f"{name}.log", base / f"{name}.exit"


def load(name: str) -> dict[str, Any] | None:
    state_path, _, exit_path = paths(name)
    try:
        data: dict[str, Any] = json.loads(state_path.read_text())
    except (OSError, ValueError):
        return None
    if exit_path.exists():
        data["status"], data["exit_code"] = "exited", int(exit_path.read_text() or "0")
    return data


def save(data: dict[str, Any]) -> None:
    state_path = paths(data["name"])[0]
    temp = state_path.with_suffix(".tmp")
    temp.write_text(json.dumps(data))
    os.replace(temp, state_path)


def parse(args: list[str], flags: set[str]) -> tuple[dict[str, list[str]], list[str]]:
    """Options before the first positional argument; the rest is returned as-is."""
    options: dict[str, list[str]] = {}
    index = 0
    while index < len(args) and args[index].startswith("-"):
        name, eq, value = args[index].partition("=")
        if eq:
            options.setdefault(name, []).append(value)
        elif name in flags:
            options.setdefault(name, []).append("")
        else:
            index += 1
            options.setdefault(name, []).append(args[index])
        index += 1
    return options, args[index:]


def plan_for_run() -> dict[str, Any]:
    counter = STATE / "runs"
    count = int(counter.read_text()) if counter.exists() else 0
    counter.write_text(str(count + 1))
    plan_file = STATE / "plan.json"
    if plan_file.exists():
        plan = json.loads(plan_file.read_text())
        return dict(plan[count]) if count < len(plan) else {}
    plan = {}
    if os.environ.get("FAKE_RUNTIME_EXIT_CODE"):
        plan["exit_code"] = int(os.environ["FAKE_RUNTIME_EXIT_CODE"])
        plan["after"] = float(os.environ.get("FAKE_RUNTIME_EXIT_AFTER", "0.2"))
        if os.environ.get("FAKE_RUNTIME_EXIT_LOG"):
            plan["log"] = [os.environ["FAKE_RUNTIME_EXIT_LOG"]]
    if os.environ.get("FAKE_RUNTIME_LOAD_SECONDS"):
        plan["load_seconds"] = float(os.environ["FAKE_RUNTIME_LOAD_SECONDS"])
    return plan


def port_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def cmd_run(args: list[str]) -> int:
    options, rest = parse(args, RUN_FLAGS)
    if not rest:
        return fail(f'"{PROG} run" requires at least 1 argument.', 125)
    image, vllm_args = rest[0], rest[1:]
    name = options.get("--name", [uuid.uuid4().hex[:12]])[-1]
    if "-d" not in options and "--detach" not in options:
        return fail("fake runtime: only `run -d` is supported", 125)
    existing = load(name)
    if existing is not None:
        return fail(f'{PROG}: Error response from daemon: Conflict. The container name "/{name}" '
                    f'is already in use by container "{existing["id"]}".', 125)
    if image in os.environ.get("FAKE_RUNTIME_MISSING_IMAGES", "").split(","):
        return fail(f"Error: {image}: image not known (Unable to find image '{image}' locally)",
                    125)
    env: dict[str, str] = {}
    env_file_info = {}
    for env_file in options.get("--env-file", []):
        mode = oct(os.stat(env_file).st_mode & 0o777)
        lines = Path(env_file).read_text().splitlines()
        for line in lines:
            key, _, value = line.partition("=")
            env[key] = value
        env_file_info = {"mode": mode, "names": [line.split("=", 1)[0] for line in lines],
                         "dir_mode": oct(os.stat(Path(env_file).parent).st_mode & 0o777)}
    for item in options.get("-e", []) + options.get("--env", []):
        key, _, value = item.partition("=")
        env[key] = value
    record(["run", *args], env_file=env_file_info)
    host_port = 0
    for publish in options.get("-p", []) + options.get("--publish", []):
        host, _, rest_port = publish.partition(":")
        host_port = int(rest_port.partition(":")[0])
        if not port_free(host_port):
            return fail(f"{PROG}: Error response from daemon: driver failed programming external "
                        f"connectivity: listen tcp4 {host}:{host_port}: bind: address already "
                        f"in use.", 125)
    labels = dict(item.partition("=")[::2] for item in options.get("--label", []))
    # The image's entrypoint is vLLM's API server taking --model; the simulator wants `serve M`.
    model = "model"
    passed: list[str] = []
    index = 0
    while index < len(vllm_args):
        if vllm_args[index] == "--model":
            model = vllm_args[index + 1]
            index += 2
            continue
        passed.append(vllm_args[index])
        index += 1
    plan = plan_for_run()
    if plan.get("load_seconds"):
        passed += ["--load-seconds", str(plan["load_seconds"])]
    data = {"id": uuid.uuid4().hex, "name": name, "image": image, "labels": labels,
            "args": vllm_args, "status": "running", "exit_code": None, "pid": None,
            "port": host_port, "env_names": sorted(env), "plan": plan,
            "started": time.time(),
            "command": [os.environ.get("FAKE_RUNTIME_PYTHON", sys.executable), "-m",
                        "proxy.simulator", "serve", model, "--host", "127.0.0.1", "--port",
                        str(host_port), *passed]}
    save(data)
    (STATE / f"containers/{name}.env").write_text(json.dumps(env))
    subprocess.Popen([sys.executable, os.path.abspath(__file__), "__shim", name],
                     start_new_session=True, stdin=subprocess.DEVNULL,
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        current = load(name)
        if current is None or current["pid"] or current["status"] == "exited":
            break
        time.sleep(0.01)
    print(data["id"])
    return 0


def shim(name: str) -> int:
    """The container's parent: runs the simulator, writes its exit status when it ends."""
    data = load(name)
    assert data is not None
    _, log_path, exit_path = paths(name)
    plan = data["plan"]
    env = {**os.environ, **json.loads((STATE / f"containers/{name}.env").read_text())}
    dies = "exit_code" in plan
    after = plan.get("after", 0.2) if dies else None
    with open(log_path, "ab", buffering=0) as log:
        proc = None
        if after != 0:
            proc = subprocess.Popen(data["command"], stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=env)
        data["pid"] = proc.pid if proc else -1
        save(data)
        try:
            if proc is None:
                raise subprocess.TimeoutExpired(data["command"], 0)
            code = proc.wait(timeout=after)
            if code < 0:  # killed by a signal: docker reports 128 + the signal's number
                code = 128 - code
        except subprocess.TimeoutExpired:  # the planned death, last words first
            for line in plan.get("log", []):
                log.write(line.encode() + b"\n")
            if proc is not None:
                proc.kill()
                proc.wait()
            code = plan["exit_code"]
    if plan.get("oom_killed"):
        data["oom_killed"] = True
        save(data)
    temp = exit_path.with_suffix(".tmp")
    temp.write_text(str(code))
    os.replace(temp, exit_path)
    return 0


def wait_exit(name: str, limit: float) -> bool:
    exit_path = paths(name)[2]
    deadline = time.monotonic() + limit
    while not exit_path.exists():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def signal_container(data: dict[str, Any], sig: signal.Signals) -> None:
    if data.get("pid") and data["pid"] > 0 and data["status"] == "running":
        with contextlib.suppress(ProcessLookupError):
            os.kill(data["pid"], sig)


def no_such(name: str) -> int:
    return fail(f"Error response from daemon: No such container: {name}")


def cmd_stop(args: list[str]) -> int:
    options, names = parse(args, set())
    grace = float((options.get("-t") or options.get("--time") or ["10"])[-1])
    for name in names:
        data = load(name)
        if data is None:
            return no_such(name)
        signal_container(data, signal.SIGTERM)
        if not wait_exit(name, grace):
            signal_container(data, signal.SIGKILL)
            wait_exit(name, 10)
        print(name)
    return 0


def cmd_rm(args: list[str]) -> int:
    options, names = parse(args, {"-f", "--force", "-v"})
    force = "-f" in options or "--force" in options
    for name in names:
        data = load(name)
        if data is None:
            if force:
                continue  # docker rm -f ignores a missing container
            return no_such(name)
        if data["status"] == "running":
            if not force:
                return fail(f"Error response from daemon: cannot remove container \"/{name}\": "
                            f"container is running: stop the container before removing or "
                            f"force remove")
            signal_container(data, signal.SIGKILL)
            wait_exit(name, 10)
        for path in (*paths(name), STATE / f"containers/{name}.env"):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        print(name)
    return 0


def cmd_wait(args: list[str]) -> int:
    for name in args:
        if load(name) is None:
            return no_such(name)
        wait_exit(name, 3600)
        print(paths(name)[2].read_text().strip())
    return 0


def cmd_logs(args: list[str]) -> int:
    options, names = parse(args, {"-f", "--follow", "-t", "--timestamps"})
    follow = "-f" in options or "--follow" in options
    name = names[0]
    if load(name) is None:
        return no_such(name)
    _, log_path, exit_path = paths(name)
    position = 0
    if "--tail" in options and log_path.exists():
        lines = log_path.read_bytes().splitlines(keepends=True)
        keep = int(options["--tail"][-1])
        position = sum(len(line) for line in lines[:max(0, len(lines) - keep)])
    out = sys.stdout.buffer
    while True:
        done = exit_path.exists() or not follow
        try:
            with open(log_path, "rb") as file:
                file.seek(position)
                chunk = file.read()
        except FileNotFoundError:
            chunk = b""
            done = done or load(name) is None  # removed
        if chunk:
            out.write(chunk)
            out.flush()
            position += len(chunk)
        elif done:
            return 0
        else:
            time.sleep(0.02)


def cmd_inspect(args: list[str]) -> int:
    _, names = parse(args, set())
    found = []
    for name in names:
        data = load(name)
        if data is None:
            print("[]")
            return fail(f"Error: No such object: {name}")
        found.append({
            "Id": data["id"], "Name": f"/{name}", "Image": data["image"],
            "State": {"Status": data["status"], "Running": data["status"] == "running",
                      "ExitCode": data["exit_code"] or 0, "Pid": data["pid"] or 0,
                      "OOMKilled": bool(data.get("oom_killed"))},
            "Config": {"Labels": data["labels"], "Image": data["image"],
                       "Cmd": data["args"]},
        })
    print(json.dumps(found, indent=4))
    return 0


def cmd_ps(args: list[str]) -> int:
    options, _ = parse(args, {"-a", "--all", "-q", "--quiet"})
    show_all = "-a" in options or "--all" in options
    wanted = [item.partition("=")[2].strip("^$") for item in options.get("--filter", [])
              if item.startswith("name=")]
    base = STATE / "containers"
    for state_path in sorted(base.glob("*.json")) if base.exists() else []:
        data = load(state_path.stem)
        if data is None or (wanted and data["name"] not in wanted):
            continue
        if data["status"] == "running" or show_all:
            if "-q" in options:
                print(data["id"][:12])
            else:
                print(f"{data['id'][:12]}  {data['image']}  {data['status']}  {data['name']}")
    return 0


# --- image store (FAKE_RUNTIME_IMAGE_STORE=1; `save`/`load` always use it) -------------------

IMAGE_MEMBER = "fake-image.json"


def image_path(reference: str) -> Path:
    base = STATE / "images"
    base.mkdir(parents=True, exist_ok=True)
    return base / (hashlib.sha256(reference.encode()).hexdigest()[:16] + ".json")


def image_record(reference: str) -> dict[str, Any] | None:
    try:
        data: dict[str, Any] = json.loads(image_path(reference).read_text())
    except (OSError, ValueError):
        return None
    return data


def store_image(record_: dict[str, Any]) -> None:
    image_path(record_["reference"]).write_text(json.dumps(record_))


def cmd_pull(args: list[str]) -> int:
    reference = args[-1]
    digest = hashlib.sha256(f"fake image {reference}".encode()).hexdigest()
    store_image({"reference": reference, "id": f"sha256:{digest}",
                 "repo_digests": [f"{reference.rsplit(':', 1)[0]}@sha256:{digest[::-1]}"]})
    print(f"{reference}: Pulled (fake)")
    return 0


def cmd_save(args: list[str]) -> int:
    options, names = parse(args, set())
    target = (options.get("-o") or options.get("--output") or [""])[-1]
    data = image_record(names[-1]) if names else None
    if data is None or not target:
        return fail(f"Error response from daemon: reference does not exist: {names}")
    payload = json.dumps(data).encode()
    layer = hashlib.sha256(payload).digest() * 4096  # 128 KiB standing in for the layers
    with tarfile.open(target, "w") as archive:
        for name, blob in ((IMAGE_MEMBER, payload), ("layer.bin", layer)):
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            archive.addfile(info, io.BytesIO(blob))
    return 0


def cmd_load(args: list[str]) -> int:
    options, _ = parse(args, {"-q", "--quiet"})
    source = (options.get("-i") or options.get("--input") or [""])[-1]
    try:
        with tarfile.open(source) as archive:
            member = archive.extractfile(IMAGE_MEMBER)
            data = json.loads(member.read()) if member else None
    except (OSError, KeyError, ValueError, tarfile.TarError) as error:
        return fail(f"Error: payload does not match the expected format ({error})")
    if not isinstance(data, dict):
        return fail("Error: no image in the archive")
    store_image(data)
    print(f"Loaded image: {data['reference']}")
    return 0


def cmd_image_inspect(args: list[str]) -> int:
    options, names = parse(args, set())
    data = image_record(names[-1]) if names else None
    if data is None:
        print("[]")
        return fail(f"Error: No such image: {names[-1] if names else ''}")
    fmt = (options.get("--format") or options.get("-f") or [""])[-1]
    if fmt == "{{.Id}}":
        print(data["id"])
    elif fmt == "{{json .RepoDigests}}":
        print(json.dumps(data["repo_digests"]))
    else:
        print(json.dumps([{"Id": data["id"], "RepoTags": [data["reference"]],
                           "RepoDigests": data["repo_digests"]}]))
    return 0


def image_store_verb(verb: str, args: list[str]) -> int | None:
    """The image store's answer to this call; None: not its business (carry on as before)."""
    if verb == "save":
        return cmd_save(args)
    if verb == "load":
        return cmd_load(args)
    if not os.environ.get("FAKE_RUNTIME_IMAGE_STORE"):
        return None
    if verb == "pull":
        return cmd_pull(args)
    if verb == "image" and args[:1] == ["inspect"]:
        return cmd_image_inspect(args[1:])
    if verb == "run":
        options, rest = parse(args, RUN_FLAGS)
        if rest and image_record(rest[0]) is None:
            if "never" in options.get("--pull", []):
                return fail(f"Error: {rest[0]}: image not known (Unable to find image "
                            f"'{rest[0]}' locally, and --pull never)", 125)
            cmd_pull([rest[0]])
    return None


def main(argv: list[str]) -> int:
    if argv[:1] == ["__shim"]:
        return shim(argv[1])
    if argv[:1] != ["run"]:
        record(argv)
    verb, args = (argv[0], argv[1:]) if argv else ("", [])
    answer = image_store_verb(verb, args)
    if answer is not None:
        return answer
    if verb == "version":
        if os.environ.get("FAKE_RUNTIME_BROKEN"):
            print(f"Client:\n Version: 0.0-fake ({PROG})")
            return fail("Cannot connect to the Docker daemon at unix:///var/run/docker.sock. "
                        "Is the docker daemon running?")
        print(f"Client:\n Version: 0.0-fake ({PROG})\nServer:\n Version: 0.0-fake")
        return 0
    if verb == "image" and args[:1] == ["inspect"]:
        missing = os.environ.get("FAKE_RUNTIME_MISSING_IMAGES", "").split(",")
        if args[-1] in missing:
            print("[]")
            return fail(f"Error: No such image: {args[-1]}")
        print(json.dumps([{"RepoTags": [args[-1]]}]))
        return 0
    handlers = {"run": cmd_run, "stop": cmd_stop, "rm": cmd_rm, "wait": cmd_wait,
                "logs": cmd_logs, "inspect": cmd_inspect, "ps": cmd_ps,
                "pull": lambda args: 0}
    if verb not in handlers:
        return fail(f"{PROG}: '{verb}' is not a {PROG} command (fake runtime)", 1)
    return handlers[verb](args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
