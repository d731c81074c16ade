"""A node's own privacy policy: the weakest DP it will train under, and its own budget across every run.

The run config comes from the coordinator, so a node that only follows it trusts the coordinator with
its privacy. A node started with ``pollinate client --max-epsilon E --delta D`` does not: it refuses a
run without DP it applies itself (``sample`` or ``local``; ``central`` noise is added by the server), a
run whose delta is larger than D, a run whose target epsilon exceeds what is left of E, and any round
whose release would take its own spend over E. The spend is computed by the node's accountant at the
node's delta from what the node itself ran (``privacy/budget.py``).

``scope``: ``node`` (default) counts every release this node ever made, under any run key from any
coordinator; ``run`` gives each pollinate run key its own E (a coordinator that changes the key resets it:
the node chooses to allow that).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

BudgetScope = Literal["node", "run"]
SCOPES: tuple[BudgetScope, ...] = ("node", "run")
NODE_MODES = ("sample", "local")  # the mechanisms whose noise the node adds itself


class PolicyError(ValueError):
    """A node's privacy policy is invalid (a flag or node config value); the message says how to fix it."""


@dataclass(frozen=True)
class NodePolicy:
    """``max_epsilon``: the node's budget E; ``delta``: the largest delta it accepts, and its accounting delta."""

    max_epsilon: float
    delta: float
    scope: BudgetScope = "node"

    def __post_init__(self) -> None:
        if not (isinstance(self.max_epsilon, int | float) and math.isfinite(self.max_epsilon)
                and self.max_epsilon > 0):
            raise PolicyError(f"--max-epsilon {self.max_epsilon!r} is invalid: use this node's privacy budget, "
                              f"a finite number > 0, e.g. 3")
        if not (isinstance(self.delta, int | float) and 0 < self.delta < 1):
            raise PolicyError(f"--delta {self.delta!r} is invalid: use the largest delta this node accepts, in "
                              f"(0, 1) and below 1 / its examples, e.g. 1e-5")
        if self.scope not in SCOPES:
            raise PolicyError(f"--budget-scope {self.scope!r} is invalid: use 'node' (one budget across every run, "
                              f"the default) or 'run' (one budget per pollinate run)")

    def refusal(self, mode: str, run_delta: float, run_target: float, spent: float) -> str | None:
        """Why this node will not train in a run of ``mode`` at (``run_target``, ``run_delta``); None: it may.

        ``spent``: this node's epsilon so far, in its scope, at its own delta.
        """
        if mode not in NODE_MODES:
            what = "no differential privacy" if mode == "off" else (
                "central DP, whose noise the coordinator adds (this node cannot check it)")
            return (f"this node's privacy policy (--max-epsilon {self.max_epsilon:g}) requires DP that the node "
                    f"applies itself (privacy.mode 'sample' or 'local'), but this run uses {what}")
        if run_delta > self.delta:
            return (f"this run's privacy.delta = {run_delta:g} is larger than this node's --delta {self.delta:g}; "
                    f"the coordinator must lower privacy.delta")
        left = self.max_epsilon - spent
        if run_target > left * (1 + 1e-9):
            return (f"this run's privacy.target-epsilon = {run_target:g} exceeds this node's remaining budget "
                    f"{max(left, 0):.4g} (--max-epsilon {self.max_epsilon:g}, {spent:.4g} spent"
                    + (" across every run" if self.scope == "node" else " in this run") + ")")
        return None
