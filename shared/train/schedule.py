"""Learning-rate schedules as a multiplier of the peak rate, for torch's LambdaLR.

warmup   linear from 1/warmup to 1 over the first `warmup_steps` steps, then:
cosine   half a cosine from 1 down to min_lr_ratio at the last step
wsd      warmup-stable-decay: 1 until the last `decay_fraction` of the steps, then linear to min_lr_ratio
constant 1
"""

from __future__ import annotations

import math
from collections.abc import Callable

from shared.train.config import Hyperparameters


def lr_multiplier(hp: Hyperparameters, total_steps: int) -> Callable[[int], float]:
    warmup, floor = hp.warmup_steps, hp.min_lr_ratio

    def factor(step: int) -> float:  # step: optimizer steps already taken
        if step < warmup:
            return (step + 1) / warmup
        if hp.schedule == "constant":
            return 1.0
        if hp.schedule == "cosine":
            span = max(1, total_steps - 1 - warmup)
            progress = min(1.0, (step - warmup) / span)
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
        decay_steps = max(1, round(hp.decay_fraction * (total_steps - warmup)))
        decay_start = total_steps - decay_steps
        if step < decay_start:
            return 1.0
        progress = min(1.0, (step - decay_start + 1) / decay_steps)
        return 1.0 - (1.0 - floor) * progress

    return factor
