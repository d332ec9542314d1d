"""Prometheus metrics: one registry per service, served on the service's own metrics port.

    registry = CollectorRegistry()
    server = MetricsServer(registry, host, port=0)   # http://host:<server.port>/metrics
    engine_metrics = EngineMetrics(registry, model_name="m", role="decode", load=engine.load)

Every metric is named `tandem:<name>` (Prometheus' classic text format; counters get `_total`).
The engine's metrics keep vLLM's names and meanings, so dashboards and autoscalers written for
`vllm:num_requests_waiting` & co. work on `tandem:num_requests_waiting` after a prefix swap; every
one carries `model_name` and `role` (monolithic, prefill, decode; the gateway's user-facing latencies
carry role="gateway").

Gauges that mirror state (queue lengths, KV usage, store contents, job states) are read at scrape
time by a `Snapshot` collector from a function the service gives, so nothing has to be kept in sync;
events (tokens, latencies, retries) are counted as they happen.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger("tandem.metrics")
disable_created_metrics()  # no `_created` series beside every counter (as vLLM does)
PREFIX = "tandem:"

# vLLM's buckets for the same histograms, so quantiles compare across the two
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
               20.0, 40.0, 80.0)  # fmt: skip
REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
                   120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)  # fmt: skip
RPC_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
               30.0, 60.0, 300.0)  # fmt: skip


def metric_name(metric: str) -> str:
    return PREFIX + metric


class MetricsServer:
    """The registry over HTTP (`GET /metrics`) on a thread; port 0 picks a free one.

    Always the classic text format (version 0.0.4): prometheus_client's own server would answer a
    scraper that prefers OpenMetrics with names whose colons are escaped to underscores, so the
    same metric would be `tandem:…` on one scrape path and `tandem_…` on another."""

    def __init__(self, registry: CollectorRegistry, host: str = "127.0.0.1", port: int = 0):
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's name
                if self.path.split("?", 1)[0] not in ("/metrics", "/"):
                    self.send_error(404, "metrics are at /metrics")
                    return
                body = generate_latest(registry)
                self.send_response(200)
                self.send_header("Content-Type", CONTENT_TYPE_LATEST)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):  # no access log per scrape
                pass

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="metrics", daemon=True)
        self.thread.start()
        self.host = host
        self.port = self.httpd.server_port

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class Snapshot(Collector):
    """Metric families computed at scrape time by `collect_fn` (a service's view of its own state).
    A failing snapshot is logged and yields nothing, so one bad reading never breaks the scrape."""

    def __init__(self, collect_fn: Callable[[], Iterable]):
        self.collect_fn = collect_fn

    def collect(self):
        try:
            yield from list(self.collect_fn())
        except Exception:  # noqa: BLE001 - a scrape must not fail the service
            log.exception("metrics snapshot failed")


def family(kind: str, metric: str, doc: str, labelnames=()):
    """An empty gauge or counter family named tandem:<metric>; add samples with add_metric."""
    cls = GaugeMetricFamily if kind == "gauge" else CounterMetricFamily
    return cls(metric_name(metric), doc, labels=list(labelnames))


def gauge(metric: str, doc: str, labels: dict[str, str], value: float):
    """A gauge family with one sample."""
    f = family("gauge", metric, doc, labels)
    f.add_metric(list(labels.values()), value)
    return f


def counter(metric: str, doc: str, labels: dict[str, str], value: float):
    """A counter family with one sample (a total the service keeps itself)."""
    f = family("counter", metric, doc, labels)
    f.add_metric(list(labels.values()), value)
    return f


class RpcMetrics:
    """Per gRPC method: calls by status code and handling time (go-grpc-prometheus' names and labels,
    so its dashboards apply)."""

    def __init__(self, registry: CollectorRegistry):
        labels = ["grpc_service", "grpc_method"]
        self.handled = Counter(
            metric_name("grpc_server_handled"), "gRPC calls completed, by method and status code.",
            [*labels, "grpc_code"], registry=registry,
        )  # fmt: skip
        self.seconds = Histogram(
            metric_name("grpc_server_handling_seconds"), "gRPC call duration (streams: until the last message).",
            labels, buckets=RPC_BUCKETS, registry=registry,
        )  # fmt: skip

    def observe(self, full_method: str, code: str, seconds: float) -> None:
        service, _, method = full_method.lstrip("/").partition("/")
        self.handled.labels(service, method, code).inc()
        self.seconds.labels(service, method).observe(seconds)


class EngineMetrics:
    """vLLM's engine metrics for one worker (`load()` returns AsyncLLMEngine.load()'s dict).

    Per request, the service calls `arrived` when it takes the request, `output` for each engine
    output (in order) and nothing else: finishing is seen on the last output. Time to first token and
    end-to-end latency run from arrival at this worker; on a decode worker that continues a prefill
    worker's request, the "first token" is the first one it makes itself.
    """

    def __init__(self, registry: CollectorRegistry, model_name: str, role: str, load: Callable[[], dict]):
        self.labels = {"model_name": model_name, "role": role}
        self.load = load
        names = list(self.labels)
        values = list(self.labels.values())

        def c(metric, doc):
            return Counter(metric_name(metric), doc, names, registry=registry).labels(*values)

        def h(metric, doc, buckets):
            return Histogram(metric_name(metric), doc, names, buckets=buckets, registry=registry).labels(
                *values
            )

        self.prompt_tokens = c("prompt_tokens", "Prompt tokens of the requests this engine took.")
        self.generation_tokens = c("generation_tokens", "Tokens this engine generated.")
        self.prefix_queries = c("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.")
        self.prefix_hits = c("prefix_cache_hits", "Prompt tokens found in the prefix cache.")
        self.success = Counter(
            metric_name("request_success"), "Requests finished, by reason (stop, length, abort, handoff).",
            [*names, "finished_reason"], registry=registry,
        )  # fmt: skip
        self.ttft = h("time_to_first_token_seconds", "Time from arrival to the first token.", TTFT_BUCKETS)
        self.itl = h("inter_token_latency_seconds", "Time between consecutive tokens.", ITL_BUCKETS)
        self.e2e = h("e2e_request_latency_seconds", "Time from arrival to the last token.", REQUEST_BUCKETS)
        self.queue = h("request_queue_time_seconds", "Time from arrival to first scheduled.", REQUEST_BUCKETS)
        self.prefill_time = h(
            "request_prefill_time_seconds", "Time from first scheduled to the first token.", REQUEST_BUCKETS
        )
        self.pending: dict[str, list[float]] = {}  # request id -> [arrival, last token time]
        registry.register(Snapshot(self._gauges))

    def _gauges(self):
        load = self.load()
        yield gauge("num_requests_running", "Requests in the running batch.", self.labels, load["running"])
        yield gauge("num_requests_waiting", "Requests waiting to be scheduled.", self.labels, load["waiting"])
        yield gauge("kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0-1).", self.labels,
                    load["kv_usage"])  # fmt: skip
        yield counter("num_preemptions", "Requests preempted for want of KV blocks.", self.labels,
                      load["num_preemptions"])  # fmt: skip
        spec = load.get("spec", {})  # speculative decoding, by proposer (vLLM's spec_decode_* names)
        for metric, doc, key in (
            ("spec_decode_num_drafts", "Steps that verified speculative drafts.", "drafts"),
            ("spec_decode_num_draft_tokens", "Draft tokens proposed.", "draft_tokens"),
            ("spec_decode_num_accepted_tokens", "Draft tokens accepted.", "accepted_tokens"),
        ):
            f = family("counter", metric, doc, {**self.labels, "method": ""})
            for method, stats in spec.items():
                f.add_metric([*self.labels.values(), method], stats[key])
            yield f

    def arrived(self, request_id: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self.pending[request_id] = [now, 0.0]

    def output(self, out, now: float | None = None) -> None:
        """One RequestOutput of the engine (shared.engine.RequestOutput)."""
        now = time.monotonic() if now is None else now
        times = self.pending.get(out.request_id)
        if times is None:
            return
        arrival, last = times
        if out.new_token_ids:
            if not last:  # this engine's first output for the request
                self.ttft.observe(now - arrival)
                self.prompt_tokens.inc(out.num_prompt_tokens)
                self.prefix_queries.inc(out.num_prompt_tokens)
                self.prefix_hits.inc(out.num_cached_tokens)
                if out.scheduled_at is not None:
                    self.queue.observe(max(0.0, out.scheduled_at - arrival))
                    self.prefill_time.observe(max(0.0, now - out.scheduled_at))
            else:
                self.itl.observe((now - last) / len(out.new_token_ids))
            self.generation_tokens.inc(len(out.new_token_ids))
            times[1] = now
        if out.finished:
            self.finished(out.request_id, out.finish_reason or "abort", now)

    def finished(self, request_id: str, reason: str, now: float | None = None) -> None:
        """The request ended (also without a final output: a caller that went away is an abort)."""
        times = self.pending.pop(request_id, None)
        if times is None:
            return
        now = time.monotonic() if now is None else now
        self.success.labels(*self.labels.values(), reason).inc()
        self.e2e.observe(now - times[0])
