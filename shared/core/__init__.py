"""The torch-free core every layer may import: how a request samples and stops (SamplingParams) and
how KV blocks are named (the block-key chain, BlockKey), the dtype table, and how a validation
failure names its field (errors.py). The router, the gateway and the KV store need no more
than this, so they start without torch (tests/unit/test_layering.py)."""
