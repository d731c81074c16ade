"""A per-node bound on the size of its update: ``federation.update-bound`` and ``federation.update-bound-mode``.

The size of a node's update is the Frobenius norm of what it changes in the model, over all modules:
for a LoRA module sent (B, A) at rank r and answered with (B', A') at rank r', the change of the weight is
dW = s' B'A' - s BA = [s' B', -s B] [A'; A], a product of rank <= r + r'. Its norm comes from the two small
Gram matrices, ||U V||_F^2 = trace((U^T U)(V V^T)) with U (d_out, r + r'), V (r + r', d_in), at a cost of
O((d_out + d_in)(r + r')^2): dW (d_out x d_in) is never built. Other tensors (a classifier head, a factor
uploaded alone) count by the norm of their plain difference to what was sent; a tensor the node was not
sent, by its own norm.

``absolute``: an update whose norm exceeds the bound is rejected. ``median``: the bound is that multiple of
the median norm of the exchange's otherwise valid updates (robust to a minority of outliers). Outliers are
rejected, not clipped: a clipped LoRA delta is no longer a rank-r product, so it could not be sent back as
factors, and a rejection names the node in the ledger (its norm and the bound in the reason).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from statistics import median

import numpy as np

NamedArrays = dict[str, np.ndarray]
A_SUFFIX, B_SUFFIX = ".lora_A.weight", ".lora_B.weight"


def update_norm(sent: Mapping[str, np.ndarray], reply: Mapping[str, np.ndarray],
                scaling: Callable[[int], float] | None = None) -> float:
    """||change of the model||_F of ``reply`` against ``sent``, LoRA pairs through their factors (see above)."""
    squared, done = 0.0, set()
    for a_key in reply:
        if not a_key.endswith(A_SUFFIX):
            continue
        b_key = a_key.removesuffix(A_SUFFIX) + B_SUFFIX
        if b_key not in reply or a_key not in sent or b_key not in sent:
            continue
        a1, b1 = reply[a_key].astype(np.float64), reply[b_key].astype(np.float64)  # (r', d_in), (d_out, r')
        a0, b0 = sent[a_key].astype(np.float64), sent[b_key].astype(np.float64)  # (r, d_in), (d_out, r)
        if a1.shape[1] != a0.shape[1] or b1.shape[0] != b0.shape[0]:
            continue  # not the same module shape: counted tensor by tensor below
        s1, s0 = (scaling(a1.shape[0]), scaling(a0.shape[0])) if scaling else (1.0, 1.0)
        u = np.concatenate([s1 * b1, -s0 * b0], axis=1)  # (d_out, r' + r)
        v = np.concatenate([a1, a0], axis=0)  # (r' + r, d_in)
        squared += float(np.sum((u.T @ u) * (v @ v.T)))  # trace(X Y) = sum(X * Y^T), both symmetric
        done |= {a_key, b_key}
    for name, value in reply.items():
        if name in done:
            continue
        if name in sent and sent[name].shape == value.shape:
            squared += float(np.sum((value.astype(np.float64) - sent[name]) ** 2))
        else:
            squared += float(np.sum(value.astype(np.float64) ** 2))
    return float(np.sqrt(max(squared, 0.0)))  # the Gram form can round a tiny negative


def norm_limit(norms: Mapping[int, float], bound: float, mode: str) -> float | None:
    """The largest accepted norm this exchange (None: no bound), from ``federation.update-bound`` and its mode."""
    if bound <= 0 or not norms:
        return None
    return bound if mode == "absolute" else bound * median(norms.values())
