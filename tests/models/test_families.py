"""Every supported family, proven on tiny random checkpoints that transformers itself creates
(config class + save_pretrained), imported through `tandem models import`, loaded from the store:
logits for a packed batch of sequences match transformers in fp32."""

from __future__ import annotations

import pytest
import torch

from services.platform.cli.main import main as tandem_main
from shared.models.attention import VarlenAttention
from shared.models.loader import load_model
from tests.tiny_models import BASE, CASES, make_tiny

transformers = pytest.importorskip("transformers")

SEQ_LENS = [23, 5, 40]  # 40 > the dynamic-rope case's trained length of 16 and the sliding window of 8


@pytest.mark.parametrize("case", list(CASES))
def test_family_logits_match_transformers(case, tmp_path, store_root, report):
    src = tmp_path / case
    ref = make_tiny(case, src)

    name = f"tiny-{case}"
    assert tandem_main(["models", "--store", str(store_root), "import", str(src), "--name", name]) == 0
    ours = load_model(store_root / name)

    seqs = [torch.randint(0, BASE["vocab_size"], (n,)) for n in SEQ_LENS]
    # Dynamic NTK scales by the longest sequence in a forward (as transformers does for a padded
    # batch), so that case is compared one sequence per forward; the others as one packed batch.
    batches = [[s] for s in seqs] if "dynamic" in case else [seqs]
    worst = 0.0
    with torch.no_grad():
        for batch in batches:
            lens = [len(s) for s in batch]
            positions = torch.cat([torch.arange(n) for n in lens])
            got = ours.compute_logits(ours(torch.cat(batch), positions, VarlenAttention(lens)))
            start = 0
            for s in batch:
                want = ref(s[None]).logits[0]
                worst = max(worst, (got[start : start + len(s)] - want).abs().max().item())
                start += len(s)
    report(f"tiny {case}: max|Δlogit| vs transformers = {worst:.2e}")
    assert worst < 1e-4, f"{case}: logits differ by {worst}"
