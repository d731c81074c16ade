"""FedAdam and FedYogi (Reddi et al. 2021, "Adaptive Federated Optimization", Algorithm 2) on adapters.

The server treats Delta = FedAvg(updates) - x as a pseudo-gradient and takes an Adam or
Yogi step on the global adapter with its own moments m and v (kept across rounds). The
clients' part is plain FedAvg, so the server needs only a weighted sum: linear.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np

from pollinate.proto.run_config import option
from pollinate.strategies.base import MeanUpdate, NamedArrays, StrategyContext
from pollinate.strategies.fedavg import FedAvg
from pollinate.strategies.fedopt_math import fedopt_step


class FedAdam(FedAvg):
    name = "fedadam"
    summary = "server-side Adam on the FedAvg pseudo-gradient (strategy.fedadam.server-lr, beta1, beta2, tau)"
    variant: ClassVar[Literal["adam", "yogi"]] = "adam"

    @dataclass(frozen=True)
    class Options:
        """Reddi et al. 2021, Algorithm 2 (FedAdam / FedYogi)."""

        server_lr: float = option(0.01, "server learning rate eta", lambda v: v > 0, "use a positive learning rate")
        beta1: float = option(0.9, "first-moment decay", lambda v: 0 <= v < 1, "use a value in [0, 1)")
        beta2: float = option(0.99, "second-moment decay", lambda v: 0 <= v < 1, "use a value in [0, 1)")
        tau: float = option(1e-3, "adaptivity (v_0 = tau^2)", lambda v: v > 0, "use a positive value, e.g. 1e-3")

    options: Options

    def __init__(self, ctx: StrategyContext) -> None:
        super().__init__(ctx)
        self.m: NamedArrays = {}
        self.v: NamedArrays = {}

    def aggregate_mean(self, state: NamedArrays, mean: MeanUpdate, round_number: int) -> NamedArrays:
        o = self.options
        out: NamedArrays = {}
        for name, x in state.items():
            m = self.m.get(name, np.zeros_like(x))
            v = self.v.get(name, np.full_like(x, o.tau**2))  # v_0 = tau^2 (Reddi et al. 2021, Alg. 2)
            out[name], self.m[name], self.v[name] = fedopt_step(x, mean.tensors[name] - x, m, v, o.server_lr, o.beta1,
                                                                o.beta2, o.tau, self.variant)
        return out

    def state_arrays(self) -> NamedArrays:
        """The moments m and v (Reddi et al. 2021, Alg. 2), which a resumed run must continue from."""
        return {**{f"m/{k}": v for k, v in self.m.items()}, **{f"v/{k}": v for k, v in self.v.items()}}

    def load_state_arrays(self, arrays: NamedArrays) -> None:
        self.m = {k.removeprefix("m/"): v for k, v in arrays.items() if k.startswith("m/")}
        self.v = {k.removeprefix("v/"): v for k, v in arrays.items() if k.startswith("v/")}


class FedYogi(FedAdam):
    name = "fedyogi"
    summary = "server-side Yogi on the FedAvg pseudo-gradient (strategy.fedyogi.server-lr, beta1, beta2, tau)"
    variant = "yogi"
