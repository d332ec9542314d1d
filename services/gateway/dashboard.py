"""The operator view the gateway serves: /dashboard (a page), /dashboard/status (its JSON), /metrics.

Where the status comes from:
  - under `tandem up`, the platform controller's status (every service, its health and load; per
    expert-parallel group, the per-layer, per-expert routed-token counts summed over its shards);
  - a gateway started alone (`tandem serve gateway`) shows what the router reports of its workers.

The page is one self-contained HTML file (no external scripts: clusters are often offline) that
polls /dashboard/status every 2 s and draws a services table, the workers' KV usage, and for each
expert-parallel group a heatmap of expert load: rows are MoE layers, columns experts, colour the
share of the layer's routed tokens (white = none, dark = the most loaded expert of the whole map).
/metrics renders the same status in the Prometheus text format.
"""

from __future__ import annotations

_LOAD_GAUGES = ("running", "waiting", "kv_usage", "kv_blocks_free", "kv_blocks_total")


def router_status(workers) -> dict:
    """A status dict from the router's ListWorkers answer (standalone gateway)."""
    services = []
    for w in workers.workers:
        load = {k: getattr(w.load, k) for k in _LOAD_GAUGES}
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
    """The status as Prometheus text exposition (gauges and a counter per expert)."""
    lines = [
        "# HELP tandem_service_up 1 if the service answers its health check.",
        "# TYPE tandem_service_up gauge",
    ]
    for s in status.get("services", []):
        lines.append(
            f"tandem_service_up{_labels(name=s['name'], role=s['role'])} {int(bool(s.get('healthy')))}"
        )
    for gauge in _LOAD_GAUGES:
        lines += [
            f"# HELP tandem_worker_{gauge} The worker engine's {gauge}.",
            f"# TYPE tandem_worker_{gauge} gauge",
        ]
        for s in status.get("services", []):
            value = (s.get("load") or {}).get(gauge)
            if isinstance(value, int | float):
                lines.append(f"tandem_worker_{gauge}{_labels(name=s['name'], role=s['role'])} {value}")
    groups = [s for s in status.get("services", []) if s.get("expert_tokens")]
    if groups:
        lines += [
            "# HELP tandem_expert_tokens_total Tokens routed to each expert of each MoE layer (all shards).",
            "# TYPE tandem_expert_tokens_total counter",
        ]
        for s in groups:
            for layer, counts in enumerate(s["expert_tokens"]):
                for expert, n in enumerate(counts):
                    lines.append(
                        f"tandem_expert_tokens_total{_labels(name=s['name'], layer=layer, expert=expert)} {n}"
                    )
        lines += [
            "# HELP tandem_expert_imbalance Max over mean of the expert token counts.",
            "# TYPE tandem_expert_imbalance gauge",
        ]
        lines += [
            f"tandem_expert_imbalance{_labels(name=s['name'])} {s.get('expert_imbalance', 1.0)}"
            for s in groups
        ]
    return "\n".join(lines) + "\n"


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Tandem — operator dashboard</title>
<style>
 body { font: 14px system-ui, sans-serif; margin: 1.5em; color: #222; }
 h1 { font-size: 1.3em; } h2 { font-size: 1.05em; margin-top: 1.6em; }
 table { border-collapse: collapse; } td, th { padding: 3px 8px; border-bottom: 1px solid #ddd; text-align: left; }
 .bad { color: #b00; font-weight: bold; } .ok { color: #070; }
 table.heatmap td { width: 22px; height: 16px; padding: 0; border: 1px solid #fff; }
 table.heatmap th { font-weight: normal; font-size: 11px; color: #666; padding: 0 4px; }
 #err { color: #b00; }
</style></head>
<body>
<h1>Tandem <span id="state"></span></h1>
<div id="err"></div>
<h2>Services</h2>
<table id="services"><thead><tr><th>name</th><th>role</th><th>address</th><th>health</th>
<th>running</th><th>waiting</th><th>KV usage</th></tr></thead><tbody></tbody></table>
<div id="experts"></div>
<script>
const key = new URLSearchParams(location.search).get("key");
const headers = key ? {"Authorization": "Bearer " + key} : {};
function cell(text, cls) { const td = document.createElement("td"); td.textContent = text; if (cls) td.className = cls; return td; }
function heatmap(svc) {
  const box = document.createElement("div");
  const h = document.createElement("h2");
  h.textContent = `Expert load — ${svc.name} (${svc.shards} shards, imbalance ${svc.expert_imbalance})`;
  box.appendChild(h);
  const rows = svc.expert_tokens, max = Math.max(1, ...rows.flat());
  const t = document.createElement("table"); t.className = "heatmap";
  const head = document.createElement("tr"); head.appendChild(document.createElement("th"));
  rows[0].forEach((_, e) => { const th = document.createElement("th"); th.textContent = e; head.appendChild(th); });
  t.appendChild(head);
  rows.forEach((counts, layer) => {
    const tr = document.createElement("tr");
    const th = document.createElement("th"); th.textContent = "layer " + layer; tr.appendChild(th);
    counts.forEach((n, e) => {
      const td = document.createElement("td"), a = n / max;
      td.style.background = `rgba(200, 60, 20, ${a.toFixed(3)})`;
      td.title = `layer ${layer}, expert ${e}: ${n} tokens`;
      tr.appendChild(td);
    });
    t.appendChild(tr);
  });
  box.appendChild(t);
  return box;
}
async function refresh() {
  try {
    const r = await fetch("/dashboard/status", {headers});
    if (!r.ok) throw new Error(`status ${r.status}`);
    const s = await r.json();
    document.getElementById("err").textContent = "";
    document.getElementById("state").textContent = "— " + s.state;
    const body = document.querySelector("#services tbody"); body.replaceChildren();
    for (const svc of s.services) {
      const l = svc.load || {}, tr = document.createElement("tr");
      tr.append(cell(svc.name), cell(svc.role), cell(svc.address || "-"),
        cell(svc.healthy ? "healthy" : ("down " + (svc.error || "")), svc.healthy ? "ok" : "bad"),
        cell(l.running ?? ""), cell(l.waiting ?? ""), cell(l.kv_usage === undefined ? "" : (100 * l.kv_usage).toFixed(1) + " %"));
      body.appendChild(tr);
    }
    const ex = document.getElementById("experts"); ex.replaceChildren();
    s.services.filter(x => x.expert_tokens && x.expert_tokens.length).forEach(x => ex.appendChild(heatmap(x)));
  } catch (e) { document.getElementById("err").textContent = "cannot read status: " + e.message; }
}
refresh(); setInterval(refresh, 2000);
</script></body></html>
"""
