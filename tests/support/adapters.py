"""Sample adapters and examples: random LoRA factors on one module, dense references, and labelled texts."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

P = "base_model.model.layer.q"
A, B, HEAD = f"{P}.lora_A.weight", f"{P}.lora_B.weight", "base_model.model.classifier.weight"


def adapter(rng: np.random.Generator, rank: int, d_out: int = 12, d_in: int = 10) -> dict[str, np.ndarray]:
    """One LoRA module at ``rank`` (A: (rank, d_in), B: (d_out, rank)) plus a fully trained 2-class head."""
    return {A: rng.standard_normal((rank, d_in)).astype(np.float32),
            B: rng.standard_normal((d_out, rank)).astype(np.float32),
            HEAD: rng.standard_normal((2, d_out)).astype(np.float32)}


def dense(tensors: Mapping[str, np.ndarray], scaling: float) -> np.ndarray:
    """The module's update s * B @ A, in float64."""
    return scaling * tensors[B].astype(np.float64) @ tensors[A].astype(np.float64)


def close(x: np.ndarray, y: np.ndarray, tol: float = 1e-4) -> bool:
    """Relative closeness in Frobenius norm."""
    return bool(np.linalg.norm(x - y) <= tol * max(1.0, np.linalg.norm(y)))


def examples(seed: int, n: int = 24):  # -> list[pollinate.client.data.Example]
    """``n`` labelled 8-word texts from a 10-word vocabulary."""
    from pollinate.client.data import Example

    rng = np.random.default_rng(seed)
    words = ["good", "bad", "film", "great", "awful", "plot", "actor", "boring", "fun", "slow"]
    return [Example(text=" ".join(rng.choice(words, size=8)), label=int(rng.integers(0, 2))) for _ in range(n)]
