"""The operator view the gateway serves: /dashboard (a page), /dashboard/status (its JSON),
/dashboard/targets (Prometheus HTTP service discovery) and /metrics.

Where the status comes from:
  - under `tandem up`, the platform controller's status (every service, its health, load and metrics
    address; per expert-parallel group, the per-layer, per-expert routed-token counts summed over its
    shards);
  - a gateway started alone (`tandem serve gateway`) shows what the router reports of its workers.
The gateway adds what it sees itself (`LiveStats`: throughput, time to first token and inter-token
latency of the last minute, as its clients saw them) and, with a training controller, the newest jobs
with their loss curves.

The page is one self-contained HTML file (no external scripts or fonts: clusters are often offline)
that polls /dashboard/status every 2 s and draws: the topology (every service with role, address,
health), live throughput and latency tiles with sparklines, KV-cache usage and prefix-cache hit rate
per worker, for each expert-parallel group a heatmap of expert load (rows MoE layers, columns experts,
colour the share of the layer's routed tokens), and the training jobs with their loss curves.

/metrics is the gateway's own Prometheus registry (HTTP requests, user-facing latencies) followed by
`tandem:service_up` per service of the platform status. Every other service serves its own metrics on
its own port; /dashboard/targets lists them all in Prometheus' http_sd format, so one scrape config
(`http_sd_configs: [{url: http://GATEWAY/dashboard/targets}]`) finds the whole platform.
"""

from __future__ import annotations

import logging
import time
from collections import deque

import grpc
from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest

from services.gateway.protocol import OpenAIError
from shared.telemetry.metrics import ITL_BUCKETS, REQUEST_BUCKETS, RPC_BUCKETS, TTFT_BUCKETS, metric_name
from tandem.v1 import controller_pb2 as pb

log = logging.getLogger("tandem.gateway")

_LOAD_GAUGES = ("running", "waiting", "kv_usage", "kv_blocks_free", "kv_blocks_total")
WINDOW_S = 60.0


def router_status(workers) -> dict:
    """A status dict from the router's ListWorkers answer (standalone gateway)."""
    services = []
    for w in workers.workers:
        load = {k: getattr(w.load, k) for k in _LOAD_GAUGES}
        load["prefix_cache_hit_blocks"] = w.load.prefix_cache_hit_blocks
        services.append(
            {
                "name": w.address,
                "role": w.load.role or "worker",
                "address": w.address,
                "healthy": w.healthy,
                "load": load,
            }
        )
    return {"state": "standalone gateway", "services": services}


def _escape(value) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(**kv) -> str:
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in kv.items()) + "}"


def prometheus_text(status: dict) -> str:
    """Each service of the platform status: up (1) or not, in the Prometheus text format."""
    lines = [
        "# HELP tandem:service_up 1 if the service answers its health check.",
        "# TYPE tandem:service_up gauge",
    ]
    for s in status.get("services", []):
        lines.append(
            f"tandem:service_up{_labels(service=s['name'], role=s['role'])} {int(bool(s.get('healthy')))}"
        )
    return "\n".join(lines) + "\n"


def sd_targets(status: dict, gateway_address: str | None) -> list[dict]:
    """Prometheus http_sd target groups: every service's metrics address, labelled `service` and
    `tandem_role` (not `role`: the engine metrics carry their own)."""
    groups = []
    listed = any(s["role"] == "gateway" and s.get("metrics") for s in status.get("services", []))
    if gateway_address and not listed:  # a gateway started alone: itself (as its client reached it)
        groups.append(
            {"targets": [gateway_address], "labels": {"service": "gateway", "tandem_role": "gateway"}}
        )
    for s in status.get("services", []):
        for i, address in enumerate(s.get("metrics") or []):
            name = s["name"] if i == 0 else f"{s['name']}-shard{i}"
            groups.append({"targets": [address], "labels": {"service": name, "tandem_role": s["role"]}})
    return groups


class GatewayMetrics:
    """The gateway's Prometheus registry: HTTP requests, and each choice's latencies as the client
    sees them (through tokenization, routing, a remote prefill and the decode)."""

    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.http = Counter(metric_name("gateway_http_requests"), "HTTP requests, by route and status.",
                            ["method", "route", "status"], registry=r)  # fmt: skip
        self.http_seconds = Histogram(
            metric_name("gateway_http_request_duration_seconds"), "HTTP request time (streams: to the last byte).",
            ["method", "route"], buckets=RPC_BUCKETS, registry=r,
        )  # fmt: skip
        labels = ["model_name"]
        self.ttft = Histogram(metric_name("gateway_time_to_first_token_seconds"),
                              "Time from the request to its first token, as the client sees it.", labels,
                              buckets=TTFT_BUCKETS, registry=r)  # fmt: skip
        self.itl = Histogram(metric_name("gateway_inter_token_latency_seconds"),
                             "Time between consecutive tokens, as the client sees it.", labels,
                             buckets=ITL_BUCKETS, registry=r)  # fmt: skip
        self.e2e = Histogram(metric_name("gateway_e2e_request_latency_seconds"),
                             "Time from the request to its last token.", labels, buckets=REQUEST_BUCKETS,
                             registry=r)  # fmt: skip
        self.tokens = Counter(metric_name("gateway_generation_tokens"), "Tokens streamed to clients.", labels,
                              registry=r)  # fmt: skip
        self.finished = Counter(metric_name("gateway_request_success"), "Choices finished, by reason.",
                                ["model_name", "finished_reason"], registry=r)  # fmt: skip
        self.live = LiveStats()

    def first_token(self, model: str, seconds: float, tokens: int) -> None:
        self.ttft.labels(model).observe(seconds)
        self.tokens.labels(model).inc(tokens)
        self.live.add("ttft", seconds)
        self.live.add("tokens", tokens)

    def next_tokens(self, model: str, seconds: float, tokens: int) -> None:
        self.itl.labels(model).observe(seconds / tokens)
        self.tokens.labels(model).inc(tokens)
        self.live.add("itl", seconds / tokens)
        self.live.add("tokens", tokens)

    def done(self, model: str, reason: str, seconds: float) -> None:
        self.e2e.labels(model).observe(seconds)
        self.finished.labels(model, reason).inc()
        self.live.add("requests", 1)


class LiveStats:
    """The last minute of what the gateway saw, for the dashboard's tiles (Prometheus has the rest)."""

    def __init__(self, window: float = WINDOW_S, clock=time.monotonic):
        self.window, self.clock = window, clock
        self.samples: dict[str, deque] = {k: deque() for k in ("tokens", "requests", "ttft", "itl")}

    def add(self, kind: str, value: float) -> None:
        self.samples[kind].append((self.clock(), value))

    def summary(self) -> dict:
        now = self.clock()
        for q in self.samples.values():
            while q and q[0][0] < now - self.window:
                q.popleft()
        values = {k: sorted(v for _, v in q) for k, q in self.samples.items()}

        def pct(kind, p):
            v = values[kind]
            return round(v[min(len(v) - 1, int(p * len(v)))], 4) if v else None

        return {
            "window_s": self.window,
            "tokens_per_s": round(sum(values["tokens"]) / self.window, 2),
            "requests_per_min": round(sum(values["requests"]) * 60 / self.window, 1),
            "ttft_p50_s": pct("ttft", 0.5), "ttft_p95_s": pct("ttft", 0.95),
            "itl_p50_s": pct("itl", 0.5), "itl_p95_s": pct("itl", 0.95),
        }  # fmt: skip


def training_summary(jobs, events_of) -> list[dict]:
    """The newest jobs (controller_pb2.Job) with their loss curves ({step, loss} from metrics events)."""
    import json

    out = []
    for j in jobs:
        curve = []
        for e in events_of.get(j.id, []):
            if e.type == "metrics" and e.data_json:
                d = json.loads(e.data_json)
                if "step" in d and "train_loss" in d:
                    curve.append({"step": d["step"], "loss": round(d["train_loss"], 5)})
        out.append({
            "id": j.id, "model": j.spec.model, "status": j.status, "step": j.step, "total_steps": j.total_steps,
            "loss": round(j.loss, 5), "fine_tuned_model": j.fine_tuned_model, "loss_curve": sorted(curve, key=lambda c: c["step"]),
        })  # fmt: skip
    return out


def operator_router(gw, platform_status, controller) -> APIRouter:
    """/dashboard, /dashboard/status, /dashboard/targets and /metrics of the gateway `gw`.
    `platform_status` (under `tandem up`: the controller's status; None: the router's view of its
    workers); `controller()` gives the training controller's client, or None."""
    api = APIRouter()
    unavailable = (grpc.aio.AioRpcError, RuntimeError, OSError)

    async def platform() -> dict:
        if platform_status is not None:
            return await platform_status()
        return router_status(await gw.backends.workers())

    async def training_jobs(client, limit: int = 4) -> list[dict]:
        try:
            jobs = (await client.call("ListJobs", pb.ListJobsRequest(limit=limit))).jobs
            events = {
                j.id: (await client.call("ListEvents", pb.ListEventsRequest(id=j.id))).events for j in jobs
            }
        except OpenAIError as e:
            log.warning("training jobs unavailable for the dashboard: %s", e)
            return []
        return training_summary(jobs, events)

    @api.get("/dashboard", include_in_schema=False)
    async def dashboard_page():
        return HTMLResponse(PAGE)

    @api.get("/dashboard/status")
    async def dashboard_status():
        try:
            out = await platform()
        except unavailable as e:
            raise OpenAIError(503, f"platform status unavailable: {e}") from e
        out["serving"] = gw.metrics.live.summary()
        if controller() is not None:
            out["training"] = await training_jobs(controller())
        return out

    @api.get("/dashboard/targets")
    async def dashboard_targets(request: Request):
        """Every service's metrics endpoint in Prometheus' http_sd format."""
        try:
            current = await platform_status() if platform_status is not None else {}
        except unavailable as e:
            raise OpenAIError(503, f"platform status unavailable: {e}") from e
        return sd_targets(current, request.headers.get("host"))

    @api.get("/metrics")
    async def metrics():
        text = generate_latest(gw.metrics.registry).decode()
        try:
            text += prometheus_text(await platform())
        except unavailable as e:  # the gateway's own metrics still answer
            log.warning("platform status unavailable for /metrics: %s", e)
        return PlainTextResponse(text, media_type=CONTENT_TYPE_LATEST)

    return api


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Tandem — operator dashboard</title>
<style>
 body { font: 14px system-ui, sans-serif; margin: 1.2em 1.5em; color: #222; background: #fafafa; }
 h1 { font-size: 1.3em; margin: 0 0 .6em; } h2 { font-size: 1.05em; margin: 1.4em 0 .5em; }
 table { border-collapse: collapse; background: #fff; }
 td, th { padding: 3px 8px; border-bottom: 1px solid #e4e4e4; text-align: left; }
 .bad { color: #b00; font-weight: bold; } .ok { color: #070; } .muted { color: #888; }
 #tiles { display: flex; flex-wrap: wrap; gap: 10px; }
 .tile { background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: 8px 12px; min-width: 150px; }
 .tile .label { font-size: 12px; color: #666; } .tile .value { font-size: 22px; font-weight: 600; }
 .bar { display: inline-block; width: 80px; height: 9px; background: #eee; vertical-align: middle; }
 .bar span { display: block; height: 100%; background: #3a7bd5; }
 table.heatmap td { width: 22px; height: 16px; padding: 0; border: 1px solid #fff; }
 table.heatmap th { font-weight: normal; font-size: 11px; color: #666; padding: 0 4px; }
 .job { display: inline-block; background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: 8px; margin: 0 10px 10px 0; }
 #err { color: #b00; }
</style></head>
<body>
<h1>Tandem <span id="state" class="muted"></span></h1>
<div id="err"></div>
<div id="tiles">
 <div class="tile" data-k="tokens_per_s"><div class="label">throughput (tokens/s, last min)</div><div class="value">–</div><svg class="spark" width="140" height="28"></svg></div>
 <div class="tile" data-k="ttft"><div class="label">time to first token p50 / p95</div><div class="value">–</div><svg class="spark" width="140" height="28"></svg></div>
 <div class="tile" data-k="itl"><div class="label">inter-token latency p50 / p95</div><div class="value">–</div><svg class="spark" width="140" height="28"></svg></div>
 <div class="tile" data-k="requests_per_min"><div class="label">requests / min</div><div class="value">–</div></div>
 <div class="tile" data-k="kv_usage"><div class="label">KV-cache usage (busiest worker)</div><div class="value">–</div></div>
 <div class="tile" data-k="prefix_hit"><div class="label">prefix-cache hit rate (prompt tokens)</div><div class="value">–</div></div>
</div>
<h2>Topology</h2>
<table id="services"><thead><tr><th>service</th><th>role</th><th>address</th><th>health</th>
<th>running</th><th>waiting</th><th>KV usage</th><th>prefix hits</th><th>metrics</th></tr></thead><tbody></tbody></table>
<div id="experts"></div>
<h2>Training jobs</h2>
<div id="training"><span class="muted">no training controller</span></div>
<script>
// with API keys the page asks for one (an admin-scoped key) and keeps it for this tab only
function headers() { const k = sessionStorage.getItem("tandem-key"); return k ? {"Authorization": "Bearer " + k} : {}; }
function askKey() {
  if (document.getElementById("keyform")) return;
  const f = el("form"); f.id = "keyform";
  const i = el("input"); i.type = "password"; i.placeholder = "API key (admin scope)"; i.id = "key";
  f.append(i, el("button", "open"));
  f.onsubmit = ev => { ev.preventDefault(); sessionStorage.setItem("tandem-key", i.value); f.remove(); refresh(); };
  document.getElementById("err").after(f);
}
const history = {tokens_per_s: [], ttft: [], itl: []};
const NS = "http://www.w3.org/2000/svg";
function el(tag, text, cls) { const e = document.createElement(tag); if (text !== undefined) e.textContent = text; if (cls) e.className = cls; return e; }
function ms(s) { return s === null || s === undefined ? "–" : (s < 1 ? (1000 * s).toFixed(0) + " ms" : s.toFixed(2) + " s"); }
function pct(x) { return x === null || x === undefined || isNaN(x) ? "–" : (100 * x).toFixed(1) + " %"; }
function line(svg, values, w, h, color) {
  svg.replaceChildren();
  const v = values.filter(x => x !== null && x !== undefined);
  if (v.length < 2) return;
  const max = Math.max(...v), min = Math.min(...v);
  const pts = v.map((y, i) => `${(i * (w - 2) / (v.length - 1) + 1).toFixed(1)},${(h - 2 - (max > min ? (y - min) / (max - min) : 0.5) * (h - 4)).toFixed(1)}`);
  const p = document.createElementNS(NS, "polyline");
  p.setAttribute("points", pts.join(" ")); p.setAttribute("fill", "none"); p.setAttribute("stroke", color); p.setAttribute("stroke-width", "1.5");
  svg.appendChild(p);
}
function tile(k, text, series) {
  const t = document.querySelector(`.tile[data-k="${k}"]`);
  t.querySelector(".value").textContent = text;
  const svg = t.querySelector("svg");
  if (svg && series) line(svg, series, 140, 28, "#3a7bd5");
}
function heatmap(svc) {
  const box = el("div");
  box.appendChild(el("h2", `Expert load — ${svc.name} (${svc.shards} shards, imbalance ${svc.expert_imbalance})`));
  const rows = svc.expert_tokens, max = Math.max(1, ...rows.flat());
  const t = el("table", undefined, "heatmap");
  const head = el("tr"); head.appendChild(el("th"));
  rows[0].forEach((_, e) => head.appendChild(el("th", "e" + e)));
  t.appendChild(head);
  rows.forEach((counts, layer) => {
    const tr = el("tr"); tr.appendChild(el("th", "layer " + layer));
    counts.forEach((n, e) => {
      const td = el("td"); td.style.background = `rgba(200, 60, 20, ${(n / max).toFixed(3)})`;
      td.title = `layer ${layer}, expert ${e}: ${n} tokens`; tr.appendChild(td);
    });
    t.appendChild(tr);
  });
  box.appendChild(t);
  return box;
}
function job(j) {
  const box = el("div", undefined, "job");
  box.appendChild(el("div", `${j.id} — ${j.model}`));
  box.appendChild(el("div", `${j.status}, step ${j.step}/${j.total_steps}, loss ${j.loss.toFixed(4)}` + (j.fine_tuned_model ? ` → ${j.fine_tuned_model}` : ""), "muted"));
  const svg = document.createElementNS(NS, "svg"); svg.setAttribute("width", "260"); svg.setAttribute("height", "70"); svg.classList.add("loss");
  box.appendChild(svg);
  line(svg, j.loss_curve.map(c => c.loss), 260, 70, "#c0392b");
  return box;
}
function hitRate(l) {
  const hit = (l.prefix_cache_hit_blocks || 0) * (l.block_size || 16), computed = l.prompt_tokens_computed || 0;
  return hit + computed ? hit / (hit + computed) : null;
}
async function refresh() {
  try {
    const r = await fetch("/dashboard/status", {headers: headers()});
    if (r.status === 401 || r.status === 403) { askKey(); throw new Error("an admin API key is needed"); }
    if (!r.ok) throw new Error(`status ${r.status}`);
    const s = await r.json();
    document.getElementById("err").textContent = "";
    document.getElementById("state").textContent = "— " + s.state;
    const live = s.serving || {};
    history.tokens_per_s.push(live.tokens_per_s); history.ttft.push(live.ttft_p50_s); history.itl.push(live.itl_p50_s);
    for (const k in history) if (history[k].length > 60) history[k].shift();
    tile("tokens_per_s", live.tokens_per_s === undefined ? "–" : live.tokens_per_s.toFixed(1), history.tokens_per_s);
    tile("ttft", `${ms(live.ttft_p50_s)} / ${ms(live.ttft_p95_s)}`, history.ttft);
    tile("itl", `${ms(live.itl_p50_s)} / ${ms(live.itl_p95_s)}`, history.itl);
    tile("requests_per_min", live.requests_per_min === undefined ? "–" : String(live.requests_per_min));
    const workers = s.services.filter(x => x.load && x.load.kv_usage !== undefined);
    tile("kv_usage", workers.length ? pct(Math.max(...workers.map(w => w.load.kv_usage))) : "–");
    let hit = 0, total = 0;
    for (const w of workers) { const bs = w.load.block_size || 16, h = (w.load.prefix_cache_hit_blocks || 0) * bs; hit += h; total += h + (w.load.prompt_tokens_computed || 0); }
    tile("prefix_hit", total ? pct(hit / total) : "–");
    const body = document.querySelector("#services tbody"); body.replaceChildren();
    for (const svc of s.services) {
      const l = svc.load || {}, tr = el("tr");
      const kv = el("td");
      if (l.kv_usage !== undefined) { const b = el("span", undefined, "bar"), f = el("span"); f.style.width = (100 * l.kv_usage).toFixed(1) + "%"; b.appendChild(f); kv.append(b, " " + pct(l.kv_usage)); }
      tr.append(el("td", svc.name), el("td", svc.role), el("td", svc.address || "-"),
        el("td", svc.healthy ? "healthy" : ("down " + (svc.error || "")), svc.healthy ? "ok" : "bad"),
        el("td", l.running ?? ""), el("td", l.waiting ?? ""), kv, el("td", l.kv_usage === undefined ? "" : pct(hitRate(l))),
        el("td", (svc.metrics || []).join(" "), "muted"));
      body.appendChild(tr);
    }
    const ex = document.getElementById("experts"); ex.replaceChildren();
    s.services.filter(x => x.expert_tokens && x.expert_tokens.length).forEach(x => ex.appendChild(heatmap(x)));
    if (s.training) {
      const tr = document.getElementById("training"); tr.replaceChildren();
      if (!s.training.length) tr.appendChild(el("span", "no jobs yet", "muted"));
      s.training.forEach(j => tr.appendChild(job(j)));
    }
  } catch (e) { document.getElementById("err").textContent = "cannot read status: " + e.message; }
}
refresh(); setInterval(refresh, 2000);
</script></body></html>
"""
