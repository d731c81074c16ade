"""The run config: one schema, validated at the edge, mirrored by pyproject.toml."""

from __future__ import annotations

import tomllib

import pytest

from pollinate.proto.run_config import ConfigError, RunConfig, flatten
from tests.support.paths import REPO, SCENARIOS


def test_pyproject_app_config_mirrors_the_schema_defaults() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert flatten(project["tool"]["flwr"]["app"]["config"]) == RunConfig().to_flat()


def test_flat_round_trip_and_coercion() -> None:
    cfg = RunConfig.from_flat({"adapter.r": "16", "train.lr": 1, "federation.rounds": 5})
    assert cfg.adapter.r == 16 and cfg.train.lr == 1.0 and cfg.federation.rounds == 5
    assert RunConfig.from_flat(cfg.to_flat()) == cfg


@pytest.mark.parametrize("flat, says", [
    ({"adapter.r": 0}, "adapter.r = 0 is invalid: the LoRA rank must be a positive integer"),
    ({"adapter.r": -4}, "adapter.r = -4 is invalid"),
    ({"adapter.rank": 8}, "unknown run config key(s) ['adapter.rank']"),
    ({"train.lr": "fast"}, "train.lr must be float"),
    ({"federation.wire-dtype": "bfloat16"}, "use float32 or float16"),
    ({"data.eval-fraction": 1.5}, "data.eval-fraction = 1.5 is invalid"),
    ({"adapter.options": "[1, 2]"}, "adapter.options must be a JSON object"),
])
def test_bad_values_fail_with_a_message_that_names_the_key(flat: dict, says: str) -> None:
    with pytest.raises(ConfigError) as e:
        RunConfig.from_flat(flat)
    assert says in str(e.value)


@pytest.mark.parametrize("scenario", sorted((REPO / "simulations" / "scenarios").glob("*.toml"))
                         + sorted(SCENARIOS.glob("*.toml")), ids=lambda p: p.name)
def test_every_shipped_scenario_parses(scenario) -> None:
    tree = tomllib.loads(scenario.read_text())
    tree.pop("simulation", None)
    RunConfig.from_flat(flatten(tree))
