"""``robust-clip``: the norm-clipped mean of LoRA updates (norm bounding, Sun et al. 2019, "Can You Really
Backdoor Federated Learning?", Sec. 4).

Node k's update is u_k = P_k - P_g: its products s_k B_k A_k minus the global's s_R B_g A_g per module, and
its dense tensors minus the global's. It is scaled by c_k = min(1, bound / ||u_k||), and the new global is
P_g + sum_k p_k c_k u_k = (1 - sum_k p_k c_k) P_g + sum_k p_k c_k P_k: again a weighted sum of products,
refactorised to rank R by FlexLoRA's factored SVD. With nothing clipped it is flexlora's aggregate. A node
below the global rank was sent the truncated global, so its u_k also holds the directions it could not keep,
as in flexlora.

The bound is absolute (``bound-mode = "absolute"``) or ``bound`` times the round's median update norm
(``"median"``, the default): a minority of hostile nodes cannot move the median past the honest norms.
Whatever their example counts, f hostile nodes move the global by at most (their share of examples) x bound.
The norms ||u_k|| come from r x r Gram matrices (``robust_math.product_gram``), no d_out x d_in matrix:
O(L (d_out + d_in) (R + sum_k r_k)^2) for L modules, then one factored SVD per module.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from pollinate.proto.run_config import option
from pollinate.strategies.base import ClientUpdate, NamedArrays, example_weights
from pollinate.strategies.robust import RobustLora, combine, gram
from pollinate.strategies.robust_math import clip_factors, squared_distances

BoundMode = Literal["median", "absolute"]


class RobustClip(RobustLora):
    name = "robust-clip"
    summary = "weighted mean of products, each node's update clipped to a norm bound (absolute or x median)"

    @dataclass(frozen=True)
    class Options:
        bound: float = option(1.0, "the clip: a factor on the round's median update norm (bound-mode = median) "
                                   "or an L2 norm (bound-mode = absolute)", lambda v: v > 0,
                              "use a positive value, e.g. 1.0")
        bound_mode: BoundMode = option("median", "median: bound x the round's median update norm; absolute: bound")

    options: Options

    def aggregate(self, state: NamedArrays, updates: Sequence[ClientUpdate], round_number: int) -> NamedArrays:
        weights = example_weights(updates)
        items = [self.products(state, 0), *(self.products(u.tensors, u.rank) for u in updates)]
        norms = np.sqrt(squared_distances(gram(items))[0, 1:])  # ||u_k|| = ||P_k - P_g||
        c = clip_factors(norms, self.bound(norms))
        kept = [w * ck for w, ck in zip(weights, c, strict=True)]
        return combine(state, items, [1.0 - sum(kept), *kept], self.ctx)

    def bound(self, norms: np.ndarray) -> float:
        """This round's clip from the nodes' update norms."""
        if self.options.bound_mode == "absolute":
            return self.options.bound
        return self.options.bound * float(np.median(norms))
