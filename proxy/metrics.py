"""The proxy's own Prometheus metrics: an ExchangeObserver that counts, and a Collector that
exposes what it counted.

Why not prometheus-client's Counter/Histogram objects: every `inc()`/`observe()` on them takes a
lock (measured here: 0.7 µs per counter increment, 1.3 µs per histogram observation), which adds up
to ~10 µs per request for the families below, a third of the forwarding core's whole CPU budget.
The observer and the scrape both run on the event loop's thread, so plain ints and floats in
slotted objects need no lock: counting costs ~1 µs per request (see tests/test_metrics_bench.py).
The Collector turns them into ordinary metric families at scrape time, in our own
CollectorRegistry (never the global one).

Labels are bounded by construction: token NAMES come from the tokens file, routes from the
allowlist, models from what vLLM answers (the first MAX_MODELS; later ones are "other"), and each
table is capped anyway so that a bug elsewhere can't turn a label into an unbounded one.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Iterator

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from proxy.exchange import PHASE_REQUEST, PHASE_STREAMING, PHASE_WAITING, Exchange

NO_TOKEN = "-"           # no token matched (401s, local answers)
OTHER = "other"          # route outside the allowlist, model past the cap
NO_MODEL = "-"
MAX_MODELS = 20
MAX_TOKENS = 1000        # token NAMES; far above any real tokens file
MAX_ROUTES = 64

AUTH_REASONS = ("missing", "malformed", "unknown")
ABORT_PHASES = (PHASE_REQUEST, PHASE_WAITING, PHASE_STREAMING)
UPSTREAM_ERRORS = ("refused", "timeout", "reset", "bad_response")

# Index by status // 100; anything outside 1xx-5xx (0: never answered) is "other".
_STATUS_CLASS = ("other", "1xx", "2xx", "3xx", "4xx", "5xx")

# LLM requests last from milliseconds (/v1/models) to many minutes (long generations).
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                    120.0, 300.0, 600.0, 1800.0)
# First byte/token: what users feel; vLLM's own TTFT buckets reach far for queued requests.
FIRST_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 40.0, 80.0,
                 160.0, 640.0)
GAP_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5, 5.0)
SIZE_BUCKETS = (256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262144.0, 1048576.0, 4194304.0,
                16777216.0, 67108864.0)


class Histogram:
    """A lock-free histogram: one bisect and two additions per observation."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)   # the last cell is the +Inf overflow
        self.sum = 0.0

    def observe(self, value: float) -> None:
        # bisect_left puts a value equal to a bound in that bound's bucket: Prometheus' `le`.
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def observe_many(self, values: list[float]) -> None:
        """Many observations at once (a stream's token gaps): locals instead of a method call
        and two attribute lookups per value."""
        counts, bounds = self.counts, self.bounds
        for value in values:
            counts[bisect_left(bounds, value)] += 1
        self.sum += sum(values)

    def buckets(self) -> list[tuple[str, float]]:
        """Cumulative (le, count) pairs, +Inf last, as HistogramMetricFamily wants them."""
        counts = list(self.counts)  # one copy: a consistent view even if read off-loop
        out: list[tuple[str, float]] = []
        total = 0
        for bound, count in zip(self.bounds, counts, strict=False):
            total += count
            out.append((_float_str(bound), total))
        out.append(("+Inf", total + counts[-1]))
        return out


class RouteStats:
    """Everything counted for one route, so a request does one dict lookup for all of it."""

    __slots__ = ("body_in", "body_out", "duration", "gaps", "requests", "ttfb", "ttft")

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str], int] = {}   # (token, status class) -> count
        self.duration = Histogram(DURATION_BUCKETS)
        self.ttfb = Histogram(FIRST_BUCKETS)
        self.ttft = Histogram(FIRST_BUCKETS)
        self.gaps = Histogram(GAP_BUCKETS)
        self.body_in = Histogram(SIZE_BUCKETS)
        self.body_out = Histogram(SIZE_BUCKETS)


class ProxyMetrics:
    """The ExchangeObserver that counts. Call only from the event loop's thread."""

    def __init__(self, routes: Iterable[str] = ()) -> None:
        self.in_flight = 0
        self.routes: dict[str, RouteStats] = {route: RouteStats() for route in routes}
        self.auth_failures = dict.fromkeys(AUTH_REASONS, 0)
        self.aborts = dict.fromkeys(ABORT_PHASES, 0)
        self.upstream_errors = dict.fromkeys(UPSTREAM_ERRORS, 0)
        self.model_not_ready = 0
        # (token, model) -> [prompt tokens, completion tokens]
        self.usage: dict[tuple[str, str], list[int]] = {}
        self._models: dict[str, str] = {}
        self._tokens: dict[str, str] = {"": NO_TOKEN}

    # -- ExchangeObserver -------------------------------------------------------------------
    def exchange_started(self, exchange: Exchange) -> None:
        self.in_flight += 1

    def exchange_finished(self, exchange: Exchange) -> None:
        self.in_flight -= 1
        token = self._tokens.get(exchange.token_name)
        if token is None:
            token = self._token_label(exchange.token_name)
        stats = self.routes.get(exchange.route)
        if stats is None:
            stats = self._route_stats(exchange.route)
        status = exchange.status
        key = (token, _STATUS_CLASS[status // 100] if 100 <= status < 600 else OTHER)
        requests = stats.requests
        requests[key] = requests.get(key, 0) + 1
        stats.duration.observe(exchange.end - exchange.start)
        stats.body_in.observe(exchange.body_in)
        stats.body_out.observe(exchange.body_out)
        if exchange.ttfb is not None:
            stats.ttfb.observe(exchange.ttfb)
        if exchange.ttft is not None:
            stats.ttft.observe(exchange.ttft)
        if exchange.token_gaps:
            stats.gaps.observe_many(exchange.token_gaps)
        if exchange.aborted:
            self._count(self.aborts, exchange.aborted)
        error = exchange.upstream_error
        if error:
            self._count(self.upstream_errors, error)
            if status == 503 and error == "refused":
                self.model_not_ready += 1
        if exchange.prompt_tokens or exchange.completion_tokens:
            self._count_usage(token, exchange)

    def auth_failed(self, reason: str) -> None:
        self._count(self.auth_failures, reason)

    # -- the less travelled paths, kept out of exchange_finished ------------------------------
    @staticmethod
    def _count(table: dict[str, int], key: str) -> None:
        # The core only sends the documented values; anything else lands in "other" rather
        # than growing the table.
        if key not in table:
            key = OTHER
        table[key] = table.get(key, 0) + 1

    def _token_label(self, name: str) -> str:
        if len(self._tokens) >= MAX_TOKENS:
            return OTHER  # not remembered: the table stays bounded
        self._tokens[name] = name
        return name

    def _route_stats(self, route: str) -> RouteStats:
        if route not in self.routes and len(self.routes) < MAX_ROUTES and route:
            self.routes[route] = RouteStats()
            return self.routes[route]
        stats = self.routes.get(OTHER)
        if stats is None:
            stats = self.routes[OTHER] = RouteStats()
        return stats

    def model_label(self, model: str) -> str:
        label = self._models.get(model)
        if label is not None:
            return label
        if not model:
            return NO_MODEL
        if len(self._models) >= MAX_MODELS:
            return OTHER  # not remembered: the table stays bounded
        self._models[model] = model
        return model

    def _count_usage(self, token: str, exchange: Exchange) -> None:
        key = (token, self.model_label(exchange.model))
        cell = self.usage.get(key)
        if cell is None:
            cell = self.usage[key] = [0, 0]
        cell[0] += exchange.prompt_tokens
        cell[1] += exchange.completion_tokens


class ProxyCollector(Collector):
    """Exposes a ProxyMetrics' numbers as metric families, at scrape time."""

    def __init__(self, metrics: ProxyMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        m = self.metrics
        requests = CounterMetricFamily(
            "airgate_requests", "Requests answered, by token NAME, allowlist route and status "
            "class.", labels=("token", "route", "status"))
        histograms = {
            "duration": HistogramMetricFamily(
                "airgate_request_duration_seconds", "Time from the first byte of the request to "
                "the end of the answer.", labels=("route",)),
            "ttfb": HistogramMetricFamily(
                "airgate_upstream_first_byte_seconds", "Time from the request's first byte to "
                "the first byte of vLLM's answer.", labels=("route",)),
            "ttft": HistogramMetricFamily(
                "airgate_time_to_first_token_seconds", "Streams: time from the request's first "
                "byte to the first token sent to the client.", labels=("route",)),
            "gaps": HistogramMetricFamily(
                "airgate_inter_token_gap_seconds", "Streams: time between consecutive tokens "
                "sent to the client.", labels=("route",)),
            "body_in": HistogramMetricFamily(
                "airgate_request_body_bytes", "Size of request bodies.", labels=("route",)),
            "body_out": HistogramMetricFamily(
                "airgate_response_body_bytes", "Size of response bodies sent to clients.",
                labels=("route",)),
        }
        for route, stats in list(m.routes.items()):
            for (token, status), count in list(stats.requests.items()):
                requests.add_metric((token, route, status), count)
            for attr, family in histograms.items():
                histogram: Histogram = getattr(stats, attr)
                family.add_metric((route,), histogram.buckets(), histogram.sum)
        yield requests
        yield from histograms.values()

        in_flight = GaugeMetricFamily("airgate_requests_in_flight",
                                      "Requests being received, forwarded or answered now.")
        in_flight.add_metric((), m.in_flight)
        yield in_flight
        yield _labelled_counter("airgate_client_aborts", "Client hang-ups before the end of "
                                "the answer, by phase (request, waiting, streaming).",
                                "phase", m.aborts)
        yield _labelled_counter("airgate_upstream_errors", "Failures talking to vLLM, by kind "
                                "(refused, timeout, reset, bad_response).", "kind",
                                m.upstream_errors)
        yield _labelled_counter("airgate_auth_failures", "Requests refused for their bearer "
                                "token, by reason (missing, malformed, unknown).", "reason",
                                m.auth_failures)
        not_ready = CounterMetricFamily("airgate_model_not_ready", "Requests answered 503 "
                                        "because vLLM was not accepting connections (loading).")
        not_ready.add_metric((), m.model_not_ready)
        yield not_ready

        prompt = CounterMetricFamily("airgate_prompt_tokens", "Prompt tokens vLLM reported, "
                                     "by token NAME and model.", labels=("token", "model"))
        completion = CounterMetricFamily("airgate_completion_tokens", "Completion tokens vLLM "
                                         "reported, by token NAME and model.",
                                         labels=("token", "model"))
        for labels, (prompt_count, completion_count) in list(m.usage.items()):
            prompt.add_metric(labels, prompt_count)
            completion.add_metric(labels, completion_count)
        yield prompt
        yield completion


def _labelled_counter(name: str, doc: str, label: str, table: dict[str, int]) -> Metric:
    family = CounterMetricFamily(name, doc, labels=(label,))
    for value, count in list(table.items()):
        family.add_metric((value,), count)
    return family


def _float_str(value: float) -> str:
    # As prometheus-client writes bucket bounds: 1.0 -> "1.0", 0.005 -> "0.005".
    return repr(float(value))
