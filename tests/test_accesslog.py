"""Access logs: combined lines parse with Elastic's Nginx integration grok, JSON lines are valid
ECS-style objects, nothing secret is written, logrotate's rename + SIGUSR1 reopen works."""

from __future__ import annotations

import asyncio
import json
import re
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from conftest import KIBANA_TEST_BODY, MakeSettings, Tokens
from proxy.accesslog import AccessLog, combined_formatter, format_json
from proxy.exchange import Exchange
from proxy.observability import Observability, build_observability
from proxy.server import ProxyServer
from proxy.simulator import RunningSimulator

pytestmark = pytest.mark.asyncio

CHAT = "/v1/chat/completions"

# -- Elastic's grok, translated ------------------------------------------------------------------
# elastic/integrations, packages/nginx/data_stream/access/elasticsearch/ingest_pipeline/default.yml
# (the Nginx integration's access pipeline), first grok processor, field event.original:
#
#   (%{NGINX_HOST} )?"?(?:%{NGINX_ADDRESS_LIST:nginx.access.remote_ip_list}|%{NOTSPACE:source.address})  # noqa: E501
#   - (-|%{DATA:user.name}) \[%{HTTPDATE:nginx.access.time}\] "%{DATA:nginx.access.info}"
#   %{NUMBER:http.response.status_code:long} %{NUMBER:http.response.body.bytes:long}( %{NUMBER:nginx.access.response_time})?  # noqa: E501
#   "(-|%{DATA:http.request.referrer})" "(-|%{DATA:user_agent.original})"
#
#   NGINX_HOST: (?:%{IP:destination.ip}|%{NGINX_NOTSEPARATOR:destination.domain})(:%{NUMBER:destination.port})?  # noqa: E501
#   NGINX_NOTSEPARATOR: "[^\t ,:]+"
#   NGINX_ADDRESS_LIST: (?:%{IP}|%{WORD})("?,?\s*(?:%{IP}|%{WORD}))*
#
# (a YAML folded scalar: the four lines join with single spaces), then a second grok on
# nginx.access.info:  %{WORD:http.request.method} %{DATA:_tmp.url_orig} HTTP/%{NUMBER:http.version}
# The pipeline multiplies nginx.access.response_time (seconds) by 1000 into milliseconds.
#
# Grok's base patterns, written here as Python regexes (named groups: '.' becomes '__'):
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
IPV4 = rf"(?:{_OCTET}\.){{3}}{_OCTET}"
IPV6 = rf"(?:(?:[0-9A-Fa-f]{{1,4}}:){{7}}[0-9A-Fa-f]{{1,4}}|(?:[0-9A-Fa-f]{{1,4}}:){{0,7}}:" \
       rf"(?:[0-9A-Fa-f]{{1,4}}(?::[0-9A-Fa-f]{{1,4}}){{0,6}}|{IPV4})?)"
IP = rf"(?:{IPV6}|{IPV4})"
WORD = r"\b\w+\b"
NOTSPACE = r"\S+"
DATA = r".*?"
NUMBER = r"(?<![0-9.+-])(?>[+-]?(?:\d+(?:\.\d+)?|\.\d+))"
MONTH = r"\b(?:Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec)\b"
HTTPDATE = rf"(?:0[1-9]|[12]\d|3[01]|[1-9])/{MONTH}/\d{{4}}:(?:[01]?\d|2[0-3]):[0-5]\d:" \
           r"(?:[0-5]?\d|60) [+-]?\d+"
NGINX_HOST = rf"(?:(?P<destination__ip>{IP})|(?P<destination__domain>[^\t ,:]+))" \
             rf"(?::(?P<destination__port>{NUMBER}))?"
NGINX_ADDRESS_LIST = rf"(?:{IP}|{WORD})(?:\"?,?\s*(?:{IP}|{WORD}))*"

ELASTIC_NGINX_ACCESS = re.compile(
    rf"(?:{NGINX_HOST} )?\"?(?:(?P<nginx__access__remote_ip_list>{NGINX_ADDRESS_LIST})"
    rf"|(?P<source__address>{NOTSPACE}))"
    rf" - (?:-|(?P<user__name>{DATA})) \[(?P<nginx__access__time>{HTTPDATE})\]"
    rf" \"(?P<nginx__access__info>{DATA})\""
    rf" (?P<http__response__status_code>{NUMBER}) (?P<http__response__body__bytes>{NUMBER})"
    rf"(?: (?P<nginx__access__response_time>{NUMBER}))?"
    rf" \"(?:-|(?P<http__request__referrer>{DATA}))\" \"(?:-|(?P<user_agent__original>{DATA}))\"")
ELASTIC_NGINX_INFO = re.compile(
    rf"(?P<http__request__method>{WORD}) (?P<url_orig>{DATA}) HTTP/(?P<http__version>{NUMBER})")


def elastic_parse(line: str) -> dict[str, str]:
    """The fields Elastic's Nginx integration extracts from `line` (grok search semantics)."""
    match = ELASTIC_NGINX_ACCESS.search(line)
    assert match is not None, f"Elastic's Nginx grok does not parse: {line!r}"
    fields = {name.replace("__", "."): value for name, value in match.groupdict().items()
              if value is not None}
    info = ELASTIC_NGINX_INFO.search(fields.pop("nginx.access.info"))
    if info is not None:
        fields.update({name.replace("__", "."): value
                       for name, value in info.groupdict().items()})
    return fields


# -- a proxy with its access log ------------------------------------------------------------------

StartLogged = Callable[..., Awaitable[tuple[str, Observability]]]


@pytest.fixture
async def logged(make_settings: MakeSettings) -> AsyncIterator[StartLogged]:
    started: list[tuple[ProxyServer, Observability]] = []

    async def start(upstream_url: str, **sections: dict[str, Any]) -> tuple[str, Observability]:
        settings = make_settings(upstream_url, **sections)
        obs = build_observability(settings)
        server = ProxyServer(settings, observer=obs.observer, metrics_app=obs.metrics_app,
                             metrics_text=obs.metrics_text)
        await server.start()
        started.append((server, obs))
        return f"https://127.0.0.1:{server.https_port}", obs

    yield start
    for server, obs in started:
        await server.stop()
        await obs.close()


async def settle(obs: Observability) -> None:
    for _ in range(200):
        if obs.metrics.in_flight == 0:
            break
        await asyncio.sleep(0.01)
    assert obs.access_log is not None
    assert obs.access_log.flush()


async def some_traffic(url: str, tokens: Tokens, client: aiohttp.ClientSession) -> int:
    """Three requests: a plain one, a stream, a wrong token; returns the 401's body size."""
    headers = {"Authorization": f"Bearer {tokens.kibana}", "User-Agent": 'node "fetch"',
               "Referer": "https://kibana.example/app/x?secret=abc"}
    async with client.post(url + CHAT + "?debug=1", json=KIBANA_TEST_BODY,
                           headers=headers) as resp:
        assert resp.status == 200
        await resp.read()
    async with client.post(url + CHAT, json={**KIBANA_TEST_BODY, "stream": True},
                           headers={**headers, "x-sim-tokens": "4"}) as resp:
        await resp.read()
    async with client.post(url + CHAT, json=KIBANA_TEST_BODY,
                           headers={"Authorization": "Bearer wrong-token"}) as resp:
        assert resp.status == 401
        return len(await resp.read())


async def test_combined_lines_parse_with_elastics_nginx_grok(
    logged: StartLogged, simulator: RunningSimulator, tokens: Tokens, tmp_path: Path,
    client: aiohttp.ClientSession,
) -> None:
    log_file = tmp_path / "access.log"
    url, obs = await logged(simulator.url, log={"access": "combined",
                                                "access_file": str(log_file)})
    refused_size = await some_traffic(url, tokens, client)
    await settle(obs)
    lines = log_file.read_text().splitlines()
    assert len(lines) == 3
    plain, stream, refused = (elastic_parse(line) for line in lines)
    assert plain["nginx.access.remote_ip_list"] == "127.0.0.1"
    assert plain["user.name"] == "kibana"
    assert plain["http.request.method"] == "POST"
    assert plain["url_orig"] == CHAT  # the query string is never logged
    assert plain["http.version"] == "1.1"
    assert plain["http.response.status_code"] == "200"
    assert int(plain["http.response.body.bytes"]) > 0
    assert 0 < float(plain["nginx.access.response_time"]) < 5
    assert re.fullmatch(r"\d+\.\d{3}", plain["nginx.access.response_time"])
    assert plain["http.request.referrer"] == "https://kibana.example/app/x"
    assert plain["user_agent.original"] == r"node \x22fetch\x22"  # as Nginx escapes it
    assert stream["http.response.status_code"] == "200"
    assert "user.name" not in refused  # "-": no token matched
    assert refused["http.response.status_code"] == "401"
    # the bytes of airgate's own JSON error, as Nginx logs the body it sends
    assert int(refused["http.response.body.bytes"]) == refused_size > 0
    text = log_file.read_text()
    for secret in (tokens.kibana, "wrong-token", "secret=abc", "debug=1", "Hello world"):
        assert secret not in text
    assert (log_file.stat().st_mode & 0o777) == 0o640


async def test_json_lines_are_ecs_objects(
    logged: StartLogged, simulator: RunningSimulator, tokens: Tokens, tmp_path: Path,
    client: aiohttp.ClientSession,
) -> None:
    log_file = tmp_path / "access.json"
    url, obs = await logged(simulator.url, log={"access": "json", "access_file": str(log_file)})
    await some_traffic(url, tokens, client)
    await settle(obs)
    records = [json.loads(line) for line in log_file.read_text().splitlines()]
    assert len(records) == 3
    plain, stream, refused = records
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", plain["@timestamp"])
    assert plain["source"]["ip"] == "127.0.0.1"
    assert plain["http"]["request"]["method"] == "POST"
    assert plain["url"]["path"] == CHAT
    assert plain["http"]["response"]["status_code"] == 200
    assert plain["http"]["response"]["body"]["bytes"] > 0
    assert plain["event"]["duration"] > 0 and isinstance(plain["event"]["duration"], int)
    assert plain["user"]["name"] == "kibana"
    assert re.fullmatch(r"[0-9a-f]{32}", plain["http"]["request"]["id"])
    assert plain["http"]["request"]["referrer"] == "https://kibana.example/app/x"
    for key in ("ttft", "model", "prompt_tokens", "completion_tokens", "finish_reason",
                "client_abort"):
        assert key in plain["airgate"]
    assert plain["airgate"]["client_abort"] is False
    assert stream["airgate"]["streamed"] is True
    assert refused["user"]["name"] is None
    assert refused["http"]["response"]["status_code"] == 401
    text = log_file.read_text()
    for secret in (tokens.kibana, "wrong-token", "secret=abc", "debug=1", "Hello world"):
        assert secret not in text


async def test_access_off_writes_nothing(
    logged: StartLogged, simulator: RunningSimulator, tokens: Tokens, client: aiohttp.ClientSession,
    capsys: pytest.CaptureFixture[str],
) -> None:
    url, obs = await logged(simulator.url, log={"access": "off"})
    assert obs.access_log is None
    await some_traffic(url, tokens, client)
    assert capsys.readouterr().out == ""


async def test_default_destination_is_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    access = AccessLog("combined")
    try:
        access.exchange_finished(sample_exchange())
        assert access.flush()
    finally:
        access.close()
    out = capsys.readouterr().out
    assert elastic_parse(out.strip())["user.name"] == "kibana"


# -- formatting, directly -------------------------------------------------------------------------

def sample_exchange(**fields: Any) -> Exchange:
    ex = Exchange(50.0, 1_741_784_587.25, "10.0.0.5")
    ex.method, ex.path, ex.route, ex.version = "POST", CHAT, CHAT, "1.1"
    ex.token_name, ex.status, ex.body_in, ex.body_out = "kibana", 200, 321, 5120
    ex.end = 52.4134
    ex.request_id = "abc123"
    for name, value in fields.items():
        setattr(ex, name, value)
    return ex


async def test_combined_line_shape_and_escaping() -> None:
    line = combined_formatter()(sample_exchange(
        client_addr="2001:db8::7", user_agent='evil"\n10.0.0.1 - admin [x]', referer="",
        path="/v1/chat/completions\\x"))
    assert line.endswith("\n") and line.count("\n") == 1  # no forged second line
    assert re.fullmatch(
        r'2001:db8::7 - kibana \[\d\d/Mar/2025:\d\d:\d\d:\d\d [+-]\d{4}\] '
        r'"POST /v1/chat/completions\\x5Cx HTTP/1\.1" 200 5120 2\.413 "-" '
        r'"evil\\x22\\x0A10\.0\.0\.1 - admin \[x\]"\n', line), line
    fields = elastic_parse(line)
    assert fields["nginx.access.remote_ip_list"] == "2001:db8::7"
    assert fields["nginx.access.response_time"] == "2.413"
    assert fields["user.name"] == "kibana"


async def test_combined_line_for_a_request_that_never_got_a_request_line() -> None:
    line = combined_formatter()(sample_exchange(method="", path="", token_name="", status=408,
                                                body_out=0))
    fields = elastic_parse(line)
    assert fields["http.response.status_code"] == "408"
    assert "user.name" not in fields


async def test_json_line_fields() -> None:
    record = json.loads(format_json(sample_exchange(
        ttft=0.31, model="mistral", prompt_tokens=12, completion_tokens=30,
        finish_reason="stop", aborted="streaming", user_agent="ua\u00e9")))
    assert record["event"]["duration"] == pytest.approx(2.4134e9, rel=1e-6)
    assert record["airgate"] == {
        "route": CHAT, "streamed": False, "ttfb": None, "ttft": 0.31, "model": "mistral",
        "prompt_tokens": 12, "completion_tokens": 30, "finish_reason": "stop",
        "client_abort": True, "abort_phase": "streaming", "upstream_error": None}
    assert record["http"]["request"]["id"] == "abc123"
    assert record["@timestamp"] == "2025-03-12T13:03:09.663Z"
    nasty = 'a"\n\u2028b\\'
    line = format_json(sample_exchange(user_agent=nasty, path="/v1/x\x00"))
    assert line.isascii() and line.count("\n") == 1 and line.endswith("\n")
    assert json.loads(line)["user_agent"]["original"] == nasty
    assert json.loads(line)["url"]["path"] == "/v1/x\x00"


# -- the writer ------------------------------------------------------------------------------------

async def test_reopen_after_rename_writes_to_the_new_file(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    access = AccessLog("combined", str(path))
    try:
        access.exchange_finished(sample_exchange(status=201))
        await asyncio.sleep(0)
        rotated = tmp_path / "access.log.1"
        path.rename(rotated)                      # logrotate moves the file...
        access.exchange_finished(sample_exchange(status=202))  # ...still written to the old one
        access.reopen()                           # ...then SIGUSR1
        access.exchange_finished(sample_exchange(status=203))
        assert access.flush()
    finally:
        access.close()
    assert [elastic_parse(x)["http.response.status_code"]
            for x in rotated.read_text().splitlines()] == ["201", "202"]
    assert [elastic_parse(x)["http.response.status_code"]
            for x in path.read_text().splitlines()] == ["203"]


async def test_failed_reopen_keeps_the_old_file(tmp_path: Path) -> None:
    directory = tmp_path / "logs"
    directory.mkdir()
    path = directory / "access.log"
    access = AccessLog("combined", str(path))
    try:
        rotated = tmp_path / "old.log"
        path.rename(rotated)
        directory.rmdir()                          # the new file can't be created
        access.reopen()
        access.exchange_finished(sample_exchange())
        assert access.flush()
    finally:
        access.close()
    assert len(rotated.read_text().splitlines()) == 1


async def test_lines_wait_for_the_flush_interval_then_are_written(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    access = AccessLog("combined", str(path), flush_interval=0.05)
    try:
        for _ in range(3):
            access.exchange_finished(sample_exchange())
        assert path.read_text() == ""              # batched: one hand-over for the three
        for _ in range(100):
            await asyncio.sleep(0.01)
            if len(path.read_text().splitlines()) == 3:
                break
        assert len(path.read_text().splitlines()) == 3
    finally:
        access.close()


async def test_a_stuck_disk_drops_lines_instead_of_growing_memory(tmp_path: Path) -> None:
    access = AccessLog("combined", str(tmp_path / "access.log"), max_backlog=5)
    stuck = threading.Event()
    original = access._write

    def slow_write(lines: list[str]) -> None:
        stuck.wait(5)
        original(lines)

    access._write = slow_write  # type: ignore[method-assign]
    try:
        for _ in range(8):
            access.exchange_finished(sample_exchange())
        access._hand_over()
        assert access.dropped == 3
    finally:
        stuck.set()
        access.close()
    assert len((tmp_path / "access.log").read_text().splitlines()) == 5


async def test_unwritable_access_file_fails_at_start(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        AccessLog("combined", str(tmp_path / "missing-dir" / "access.log"))


async def test_workers_appending_to_one_file_never_split_a_line(tmp_path: Path) -> None:
    # `[server] workers` > 1: each worker has its own AccessLog on the same file.
    path = tmp_path / "access.log"
    workers = [AccessLog("combined", str(path)) for _ in range(3)]
    try:
        for round_ in range(20):
            for index, access in enumerate(workers):
                for _ in range(150):  # ~45 KiB a batch: several buffer sizes
                    access.exchange_finished(sample_exchange(
                        status=200 + index, user_agent=f"worker-{index}-{round_}-" + "u" * 250))
                access._hand_over()
        for access in workers:
            assert access.flush()
    finally:
        for access in workers:
            access.close()
    lines = path.read_text().splitlines()
    assert len(lines) == 3 * 20 * 150
    for line in lines:
        fields = elastic_parse(line)
        agent = fields["user_agent.original"]
        assert agent.startswith(f"worker-{int(fields['http.response.status_code']) - 200}-")


async def test_stdout_pieces_are_whole_lines_up_to_pipe_buf() -> None:
    from proxy.accesslog import _whole_lines

    lines = [f"{n:04d}" + "x" * 95 + "\n" for n in range(100)]  # 100 lines of 100 characters
    pieces = _whole_lines(lines, 4096)
    assert "".join(pieces) == "".join(lines)
    assert all(len(piece) <= 4096 and piece.endswith("\n") for piece in pieces)
    assert _whole_lines(["y" * 5000 + "\n"], 4096) == ["y" * 5000 + "\n"]
