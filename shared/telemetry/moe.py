"""Expert-parallel MoE metrics of one shard, read at scrape time from its ExpertParallelMoE layers.

    tandem:moe_expert_tokens_total{layer, expert, shard}   tokens this shard routed to each expert
    tandem:moe_expert_imbalance{layer, shard}              max / mean of those counts (1 = balanced)
    tandem:moe_all_to_all_seconds_total{layer, shard}      time in the layer's all-to-all exchanges
    tandem:moe_all_to_all_bytes_total{layer, shard}        hidden-state bytes this shard sent

A group's load per expert is the sum over its shards (`sum by (layer, expert)`).
"""

from __future__ import annotations

from shared.telemetry.metrics import family


def moe_metrics(model) -> list:
    from shared.parallel.expert_parallel import moe_layers

    layers = moe_layers(model)
    if not layers:
        return []
    tokens = family("counter", "moe_expert_tokens", "Tokens routed to each expert by this shard.",
                    ["layer", "expert", "shard"])  # fmt: skip
    imbalance = family("gauge", "moe_expert_imbalance", "Max over mean of the layer's expert token counts.",
                       ["layer", "shard"])  # fmt: skip
    seconds = family("counter", "moe_all_to_all_seconds", "Time in the layer's all-to-all exchanges.",
                     ["layer", "shard"])  # fmt: skip
    sent = family(
        "counter", "moe_all_to_all_bytes", "Hidden-state bytes this shard sent.", ["layer", "shard"]
    )
    for i, m in enumerate(layers):
        layer, shard = str(i), str(m.rank)
        for e, n in enumerate(m.expert_tokens.tolist()):
            tokens.add_metric([layer, str(e), shard], n)
        imbalance.add_metric([layer, shard], m.imbalance())
        seconds.add_metric([layer, shard], m.comm_seconds)
        sent.add_metric([layer, shard], m.comm_bytes)
    return [tokens, imbalance, seconds, sent]
