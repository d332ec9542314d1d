"""Writes Tandem's Grafana dashboards (deploy/grafana/*.json) from the panel lists below.

    python deploy/grafana/build.py          # after editing a panel; a test checks the JSON is current

Each dashboard is a grid of time series (or heatmap / stat) panels over Prometheus queries of the
`tandem:` metrics (docs/operations.md lists them). Panels pick their data source from the
`datasource` variable, so the files import into any Grafana unchanged; the Helm chart ships them as a
ConfigMap for Grafana's dashboard sidecar (helm/tandem/dashboards links here).
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
DS = {"type": "prometheus", "uid": "${datasource}"}

# title -> (uid, description, [(panel title, kind, unit, [(expr, legend)])])
DASHBOARDS = {
    "Tandem / Serving overview": ("tandem-serving", "Requests, throughput and latency of the whole platform", [
        ("Requests running", "timeseries", "short", [("sum by (role) (tandem:num_requests_running)", "{{role}}")]),
        ("Requests waiting", "timeseries", "short", [("sum by (role) (tandem:num_requests_waiting)", "{{role}}")]),
        ("Generation throughput", "timeseries", "tokens/s",
         [("sum by (role) (rate(tandem:generation_tokens_total[1m]))", "{{role}}")]),
        ("Prompt throughput", "timeseries", "tokens/s",
         [("sum by (role) (rate(tandem:prompt_tokens_total[1m]))", "{{role}}")]),
        ("Time to first token (client)", "timeseries", "s", [
            ("histogram_quantile(0.5, sum by (le) (rate(tandem:gateway_time_to_first_token_seconds_bucket[1m])))", "p50"),
            ("histogram_quantile(0.95, sum by (le) (rate(tandem:gateway_time_to_first_token_seconds_bucket[1m])))", "p95"),
        ]),
        ("Inter-token latency (client)", "timeseries", "s", [
            ("histogram_quantile(0.5, sum by (le) (rate(tandem:gateway_inter_token_latency_seconds_bucket[1m])))", "p50"),
            ("histogram_quantile(0.95, sum by (le) (rate(tandem:gateway_inter_token_latency_seconds_bucket[1m])))", "p95"),
        ]),
        ("End-to-end latency p95 by role", "timeseries", "s", [
            ("histogram_quantile(0.95, sum by (le, role) (rate(tandem:e2e_request_latency_seconds_bucket[1m])))", "{{role}}"),
        ]),
        ("Queue time p95 by role", "timeseries", "s", [
            ("histogram_quantile(0.95, sum by (le, role) (rate(tandem:request_queue_time_seconds_bucket[1m])))", "{{role}}"),
        ]),
        ("KV-cache usage (busiest worker)", "timeseries", "percentunit",
         [("max by (role) (tandem:kv_cache_usage_perc)", "{{role}}")]),
        ("Prefix-cache hit rate", "stat", "percentunit", [
            ("sum(rate(tandem:prefix_cache_hits_total[5m])) / sum(rate(tandem:prefix_cache_queries_total[5m]))", "hit rate"),
        ]),
        ("Finished requests by reason", "timeseries", "reqps",
         [("sum by (finished_reason) (rate(tandem:gateway_request_success_total[5m]))", "{{finished_reason}}")]),
        ("HTTP requests by status", "timeseries", "reqps",
         [("sum by (route, status) (rate(tandem:gateway_http_requests_total[1m]))", "{{route}} {{status}}")]),
        ("Services up", "stat", "short", [("tandem:service_up", "{{service}}")]),
        ("Preemptions", "timeseries", "short", [("sum by (role) (increase(tandem:num_preemptions_total[5m]))", "{{role}}")]),
        ("Speculative decoding: drafts accepted", "timeseries", "percentunit", [
            ("sum by (method) (increase(tandem:spec_decode_num_accepted_tokens_total[5m])) / clamp_min(sum by (method) "
             "(increase(tandem:spec_decode_num_draft_tokens_total[5m])), 1)", "{{method}}"),
        ]),
    ]),
    "Tandem / Disaggregation": ("tandem-disaggregation", "Prefill and decode workers and the KV handoffs between them", [
        ("Routes by prefill placement", "timeseries", "reqps",
         [("sum by (prefill) (rate(tandem:router_decisions_total[1m]))", "prefill {{prefill}}")]),
        ("Requests running: prefill vs decode", "timeseries", "short",
         [("sum by (role) (tandem:num_requests_running{role=~\"prefill|decode\"})", "{{role}}")]),
        ("Time to first token p95 by role", "timeseries", "s", [
            ("histogram_quantile(0.95, sum by (le, role) (rate(tandem:time_to_first_token_seconds_bucket[1m])))", "{{role}}"),
        ]),
        ("Prefill time p95 (scheduled to first token)", "timeseries", "s", [
            ("histogram_quantile(0.95, sum by (le, role) (rate(tandem:request_prefill_time_seconds_bucket[1m])))", "{{role}}"),
        ]),
        ("KV blocks moved through the store", "timeseries", "short",
         [("sum by (role, direction) (rate(tandem:kv_transfer_blocks_total[1m]))", "{{role}} {{direction}}")]),
        ("Time moving KV (share of a second)", "timeseries", "percentunit",
         [("sum by (role, op) (rate(tandem:kv_transfer_seconds_total[1m]))", "{{role}} {{op}}")]),
        ("Expected prefix reuse (router)", "stat", "percentunit", [
            ("sum(rate(tandem:router_prefix_hit_tokens_total[5m])) / sum(rate(tandem:router_prompt_tokens_total[5m]))", "reuse"),
        ]),
        ("Retries and prefill fallbacks", "timeseries", "short", [
            ("sum(increase(tandem:router_retries_total[5m])) or vector(0)", "retries"),
            ("sum(increase(tandem:router_prefill_fallbacks_total[5m]))", "prefill fallbacks"),
        ]),
        ("Requests in flight by worker", "timeseries", "short",
         [("sum by (worker, role) (tandem:router_requests_in_flight)", "{{role}} {{worker}}")]),
        ("Healthy workers by role", "stat", "short", [("sum by (role) (tandem:router_workers{healthy=\"true\"})", "{{role}}")]),
    ]),
    "Tandem / KV store": ("tandem-kvstore", "The remote KV-cache store: tiers, hits, bytes, evictions, leases", [
        ("Block reads by tier", "timeseries", "ops", [
            ("sum by (tier) (rate(tandem:kvstore_hits_total[1m]))", "hit {{tier}}"),
            ("sum(rate(tandem:kvstore_misses_total[1m]))", "miss"),
        ]),
        ("Bytes read and written", "timeseries", "Bps", [
            ("sum by (tier) (rate(tandem:kvstore_bytes_read_total[1m]))", "read {{tier}}"),
            ("sum(rate(tandem:kvstore_bytes_written_total[1m]))", "written"),
        ]),
        ("Memory tier fill", "timeseries", "percentunit",
         [("sum(tandem:kvstore_bytes{tier=\"memory\"}) / sum(tandem:kvstore_memory_budget_bytes)", "used / budget")]),
        ("Blocks held", "timeseries", "short", [("sum by (tier) (tandem:kvstore_blocks)", "{{tier}}")]),
        ("Evictions", "timeseries", "ops", [("sum by (tier) (rate(tandem:kvstore_evictions_total[5m]))", "{{tier}}")]),
        ("Pinned blocks and open leases", "timeseries", "short", [
            ("sum(tandem:kvstore_pinned_blocks)", "pinned blocks"),
            ("sum(tandem:kvstore_leases)", "leases"),
        ]),
        ("Lease expiries", "timeseries", "short", [("sum(increase(tandem:kvstore_lease_expiries_total[15m]))", "expired")]),
        ("Store call latency p95", "timeseries", "s", [
            ("histogram_quantile(0.95, sum by (le, grpc_method) (rate(tandem:grpc_server_handling_seconds_bucket{grpc_service=\"tandem.v1.KVStore\"}[5m])))",
             "{{grpc_method}}"),
        ]),
    ]),
    "Tandem / MoE experts": ("tandem-moe", "Expert-parallel decode groups: expert load, balance, all-to-all", [
        ("Tokens per expert and layer", "heatmap", "short",
         [("sum by (layer, expert) (rate(tandem:moe_expert_tokens_total[5m]))", "layer {{layer}} expert {{expert}}")]),
        ("Expert imbalance (max / mean) by layer", "timeseries", "short",
         [("max by (layer) (tandem:moe_expert_imbalance)", "layer {{layer}}")]),
        ("All-to-all time (share of a second) by shard", "timeseries", "percentunit",
         [("sum by (shard) (rate(tandem:moe_all_to_all_seconds_total[1m]))", "shard {{shard}}")]),
        ("All-to-all bytes sent by shard", "timeseries", "Bps",
         [("sum by (shard) (rate(tandem:moe_all_to_all_bytes_total[1m]))", "shard {{shard}}")]),
        ("Routed tokens by shard", "timeseries", "short",
         [("sum by (shard) (rate(tandem:moe_expert_tokens_total[1m]))", "shard {{shard}}")]),
    ]),
    "Tandem / Training": ("tandem-training", "Training jobs of the controller", [
        ("Jobs by state", "timeseries", "short", [("sum by (state) (tandem:training_jobs)", "{{state}}")]),
        ("Training loss", "timeseries", "short", [("tandem:training_loss", "{{job_id}} ({{model}})")]),
        ("Progress", "timeseries", "percentunit",
         [("tandem:training_step / tandem:training_total_steps", "{{job_id}}")]),
        ("Trained tokens per second", "timeseries", "short", [("tandem:training_tokens_per_second", "{{job_id}}")]),
        ("Trained tokens", "timeseries", "short", [("tandem:training_trained_tokens_total", "{{job_id}}")]),
        ("Controller calls", "timeseries", "reqps", [
            ("sum by (grpc_method) (rate(tandem:grpc_server_handled_total{grpc_service=\"tandem.v1.Controller\"}[5m]))",
             "{{grpc_method}}"),
        ]),
    ]),
}  # fmt: skip


def panel(i: int, title: str, kind: str, unit: str, targets: list[tuple[str, str]]) -> dict:
    p = {
        "id": i + 1,
        "type": kind,
        "title": title,
        "datasource": DS,
        "gridPos": {"h": 8, "w": 12, "x": 12 * (i % 2), "y": 8 * (i // 2)},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "targets": [
            {"refId": chr(ord("A") + n), "datasource": DS, "expr": expr, "legendFormat": legend}
            for n, (expr, legend) in enumerate(targets)
        ],
    }
    if kind == "heatmap":
        p["options"] = {"calculate": False, "yAxis": {"unit": unit}}
        p["targets"][0]["format"] = "time_series"
    return p


def dashboard(title: str, uid: str, description: str, panels: list) -> dict:
    return {
        "uid": uid,
        "title": title,
        "description": description,
        "tags": ["tandem"],
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "time": {"from": "now-1h", "to": "now"},
        "refresh": "10s",
        "templating": {
            "list": [{"name": "datasource", "label": "Prometheus", "type": "datasource", "query": "prometheus"}]
        },
        "panels": [panel(i, *p) for i, p in enumerate(panels)],
    }


def render() -> dict[str, str]:
    """{file name: JSON text} of every dashboard."""
    return {
        f"{uid}.json": json.dumps(dashboard(title, uid, description, panels), indent=2) + "\n"
        for title, (uid, description, panels) in DASHBOARDS.items()
    }


if __name__ == "__main__":
    for name, text in render().items():
        (HERE / name).write_text(text)
        print(f"wrote {HERE / name}")
