"""federation.update-bound: a node's update norm from its LoRA factors equals the dense ||dW||_F."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from pollinate.server.update_bound import norm_limit, update_norm


@given(seed=st.integers(0, 2**32 - 1), d_out=st.integers(1, 12), d_in=st.integers(1, 12), r0=st.integers(1, 6),
       r1=st.integers(1, 6), alpha=st.floats(0.5, 32), head=st.booleans(), extra=st.booleans())
def test_the_factored_norm_equals_the_dense_norm_of_the_weight_change(seed: int, d_out: int, d_in: int, r0: int,
                                                                      r1: int, alpha: float, head: bool,
                                                                      extra: bool) -> None:
    rng = np.random.default_rng(seed)
    a0, b0 = rng.standard_normal((r0, d_in)), rng.standard_normal((d_out, r0))
    a1, b1 = rng.standard_normal((r1, d_in)), rng.standard_normal((d_out, r1))
    sent = {"m.lora_A.weight": a0.astype(np.float32), "m.lora_B.weight": b0.astype(np.float32)}
    reply = {"m.lora_A.weight": a1.astype(np.float32), "m.lora_B.weight": b1.astype(np.float32)}
    scaling = lambda r: alpha / r  # noqa: E731 - PEFT's alpha / r
    dense = (scaling(r1) * reply["m.lora_B.weight"].astype(np.float64) @ reply["m.lora_A.weight"]
             - scaling(r0) * sent["m.lora_B.weight"].astype(np.float64) @ sent["m.lora_A.weight"])
    squared = float(np.sum(dense ** 2))
    if head:  # a tensor trained whole: its plain difference
        sent["head.weight"] = rng.standard_normal((2, d_in)).astype(np.float32)
        reply["head.weight"] = rng.standard_normal((2, d_in)).astype(np.float32)
        squared += float(np.sum((reply["head.weight"].astype(np.float64) - sent["head.weight"]) ** 2))
    if extra:  # a tensor the node was not sent: its own norm
        reply["other.weight"] = rng.standard_normal((3,)).astype(np.float32)
        squared += float(np.sum(reply["other.weight"].astype(np.float64) ** 2))
    assert math.isclose(update_norm(sent, reply, scaling), math.sqrt(squared), rel_tol=1e-6, abs_tol=1e-9)


def test_an_unchanged_adapter_has_norm_zero_and_the_limits_follow_the_mode() -> None:
    rng = np.random.default_rng(0)
    sent = {"m.lora_A.weight": rng.standard_normal((4, 8)).astype(np.float32),
            "m.lora_B.weight": rng.standard_normal((6, 4)).astype(np.float32)}
    assert update_norm(sent, dict(sent)) < 1e-5
    norms = {1: 1.0, 2: 2.0, 3: 3.0, 4: 100.0}
    assert norm_limit(norms, 0.0, "median") is None
    assert norm_limit(norms, 3.0, "median") == 7.5  # 3 x the median 2.5: the outlier 100 is above it
    assert norm_limit(norms, 3.0, "absolute") == 3.0
