"""FedAvgM (Hsu et al. 2019, "Measuring the Effects of Non-Identical Data Distribution for Federated Visual
Classification", Sec. 3): FedAvg with server momentum.

The server treats Delta_t = x_t - FedAvg(updates) as a pseudo-gradient and takes a heavy-ball step,
v <- beta v + Delta_t, x_{t+1} = x_t - eta v. With beta = 0 and eta = 1 it is FedAvg. The clients' part is
plain FedAvg, so the server needs only the weighted mean of the uploads: linear (secure aggregation works).
The momentum v is carried in ``state_arrays`` so that a resumed run continues exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pollinate.proto.run_config import option
from pollinate.strategies.base import AggregationError, MeanUpdate, NamedArrays, StrategyContext
from pollinate.strategies.fedavg import FedAvg


class FedAvgM(FedAvg):
    name = "fedavgm"
    summary = "FedAvg with server momentum on the pseudo-gradient: v = beta v + (x - mean), x = x - eta v"

    @dataclass(frozen=True)
    class Options:
        momentum: float = option(0.9, "beta: share of last round's server step carried into this one (0: FedAvg)",
                                 lambda v: 0.0 <= v < 1.0, "use a value in [0, 1), e.g. 0.9")
        server_lr: float = option(1.0, "eta: server learning rate on the pseudo-gradient (1 with momentum 0: FedAvg)",
                                  lambda v: v > 0.0, "use a positive learning rate, e.g. 1.0")

    options: Options

    def __init__(self, ctx: StrategyContext) -> None:
        super().__init__(ctx)
        self.velocity: NamedArrays = {}  # v per adapter tensor, zero before the first round

    def aggregate_mean(self, state: NamedArrays, mean: MeanUpdate, round_number: int) -> NamedArrays:
        beta, eta = np.float32(self.options.momentum), np.float32(self.options.server_lr)
        out: NamedArrays = {}
        for name, x in state.items():
            pseudo_gradient = x - mean.tensors[name]  # Delta_t: the step FedAvg would take, negated
            v = beta * self.velocity.get(name, np.zeros_like(x)) + pseudo_gradient
            self.velocity[name] = v.astype(np.float32)
            out[name] = (x - eta * v).astype(np.float32)
        return out

    def state_arrays(self) -> NamedArrays:
        """The momentum v, which a resumed run must continue from."""
        return {f"v/{k}": v for k, v in self.velocity.items()}

    def load_state_arrays(self, arrays: NamedArrays) -> None:
        unknown = sorted(k for k in arrays if not k.startswith("v/"))
        if unknown:
            raise AggregationError(f"{self.name} keeps only its momentum (v/...), but the store holds "
                                   f"{unknown[:3]} for it; the run was started by another version of this strategy")
        self.velocity = {k.removeprefix("v/"): v for k, v in arrays.items()}
