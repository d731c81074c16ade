"""The run config: one schema, validated at the edge, mirrored by pyproject.toml."""

from __future__ import annotations

import tomllib
from dataclasses import fields

import pytest
from flwr.common.config import get_fused_config_from_dir, parse_config_args

from pollinate import strategies
from pollinate.proto.pyproject_mirror import COMMAND, current_table, mirror_table
from pollinate.proto.run_config import ConfigError, RunConfig, flatten, schema_defaults
from pollinate.strategies.fedavg import FedProx
from pollinate.strategies.hetlora import HetLora
from tests.support.paths import REPO, SCENARIOS


def test_pyproject_app_config_is_the_generated_mirror() -> None:
    text = (REPO / "pyproject.toml").read_text()
    assert current_table(text) == mirror_table(), f"pyproject.toml's [tool.flwr.app.config] is stale: run {COMMAND}"
    project = tomllib.loads(text)
    assert flatten(project["tool"]["flwr"]["app"]["config"]) == schema_defaults()


def test_the_mirror_lists_every_builtin_strategys_options_with_their_defaults() -> None:
    defaults = schema_defaults()
    for name, cls in strategies.builtin().items():
        for f in fields(cls.Options):
            assert defaults[f"strategy.{name}.{f.name.replace('_', '-')}"] == f.default
    assert {k: v for k, v in defaults.items() if not k.startswith("strategy.")} == RunConfig().to_flat()


def test_flwr_run_config_overrides_of_strategy_options_reach_the_strategy() -> None:
    # What `flwr run . --run-config '...'` does with the checkout's pyproject: Flower refuses keys it does not list.
    flat = get_fused_config_from_dir(REPO, parse_config_args(
        ['federation.strategy="fedprox" strategy.fedprox.proximal-mu=0.5 adapter.target-modules="query,key"']))
    cfg = RunConfig.from_flat(flat)
    assert cfg.strategy == FedProx.Options(proximal_mu=0.5)
    assert cfg.adapter.target_modules == ("query", "key")
    assert strategies.build(cfg).options.proximal_mu == 0.5
    with pytest.raises(ValueError, match="strategy.proximal-mu"):  # an old key is not in the mirror: Flower refuses it
        get_fused_config_from_dir(REPO, parse_config_args(["strategy.proximal-mu=0.5"]))


def test_flat_round_trip_and_coercion() -> None:
    cfg = RunConfig.from_flat({"adapter.r": "16", "train.lr": 1, "federation.rounds": 5,
                               "federation.strategy": "hetlora", "strategy.hetlora.norm-weighting": "false",
                               "strategy.hetlora.prune": 0})
    assert cfg.adapter.r == 16 and cfg.train.lr == 1.0 and cfg.federation.rounds == 5
    assert cfg.strategy == HetLora.Options(prune=0.0, norm_weighting=False)
    assert RunConfig.from_flat(cfg.to_flat()) == cfg
    assert cfg.to_flat()["strategy.hetlora.norm-weighting"] is False
    assert not any(k.startswith("strategy.") and ".hetlora." not in k for k in cfg.to_flat())


@pytest.mark.parametrize("modules", ["query, value", ["query", "value"], ("query", "value")])
def test_target_modules_are_a_tuple_from_a_comma_string_or_a_list(modules) -> None:
    cfg = RunConfig.from_flat({"adapter.target-modules": modules})
    assert cfg.adapter.target_modules == ("query", "value")
    assert cfg.to_flat()["adapter.target-modules"] == "query,value"


def test_adapter_options_stay_a_json_string_on_the_wire_and_are_parsed_once() -> None:
    cfg = RunConfig.from_flat({"adapter.options": '{"use_rslora": true}'})
    assert cfg.adapter.option_dict == {"use_rslora": True}
    assert cfg.adapter.option_dict is cfg.adapter.option_dict
    assert cfg.to_flat()["adapter.options"] == '{"use_rslora": true}'
    with pytest.raises(TypeError):
        cfg.adapter.option_dict["use_rslora"] = False  # type: ignore[index]


def test_another_strategys_option_at_its_default_is_accepted_as_unset() -> None:
    # Flower delivers every key of the mirror, so every strategy's options arrive at their defaults.
    cfg = RunConfig.from_flat({"federation.strategy": "fedavg", "strategy.fedprox.proximal-mu": 0.01,
                               "strategy.sketch.oversample": "8"})
    assert cfg.strategy == strategies.get("fedavg").Options()


def test_a_strategy_is_refused_options_of_another_strategys_class() -> None:
    from dataclasses import replace

    with pytest.raises(ConfigError, match="takes its options as FedProx.Options"):
        FedProx(strategies.StrategyContext(rank=4, alpha=8.0, options=HetLora.Options()))
    with pytest.raises(ConfigError, match="federation.strategy = 'fedavg' takes"):
        replace(RunConfig(), strategy=FedProx.Options()).validate()


@pytest.mark.parametrize("flat, says", [
    ({"adapter.r": 0}, "adapter.r = 0 is invalid: the LoRA rank must be a positive integer"),
    ({"adapter.r": -4}, "adapter.r = -4 is invalid"),
    ({"adapter.rank": 8}, "unknown run config key(s) ['adapter.rank']"),
    ({"train.lr": "fast"}, "train.lr must be float"),
    ({"data.eval-fraction": 1.5}, "data.eval-fraction = 1.5 is invalid"),
    ({"adapter.options": "[1, 2]"}, "adapter.options must be a JSON object"),
    ({"adapter.target-modules": " , "}, "adapter.target-modules = '' is invalid: name at least one module"),
    # enumerations (Literal types): one check that names the allowed values
    ({"federation.wire-dtype": "bfloat16"}, "federation.wire-dtype = 'bfloat16' is invalid: use one of float32, "
                                            "float16 (bfloat16 does not travel in a Flower ArrayRecord)"),
    ({"model.task": "regression"}, "model.task = 'regression' is invalid: use one of classification, causal-lm"),
    ({"data.partitioning": "random"}, "data.partitioning = 'random' is invalid: use one of iid, dirichlet, natural"),
    ({"federation.on-round-failure": "retry"}, "federation.on-round-failure = 'retry' is invalid: use one of stop, "
                                               "continue"),
    ({"privacy.mode": "everything"}, "privacy.mode = 'everything' is invalid: use one of off, sample, central, local"),
    # strategy options: only the chosen strategy's, by their new names, in range
    ({"federation.strategy": "no-such"}, "unknown strategy 'no-such'; choose one of"),
    ({"strategy.fedprox.proximal-mu": 0.5}, "strategy.fedprox.proximal-mu = 0.5 is an option of strategy 'fedprox', "
                                            "but federation.strategy = 'fedavg': choose fedprox or remove the key "
                                            "(fedavg has no options)"),
    ({"federation.strategy": "fedprox", "strategy.sketch.oversample": 16},
     "is an option of strategy 'sketch', but federation.strategy = 'fedprox': choose sketch or remove the key "
     "(fedprox's options are strategy.fedprox.proximal-mu"),
    ({"federation.strategy": "fedadam", "strategy.fedadam.lr": 0.1},
     "unknown strategy option 'strategy.fedadam.lr' for federation.strategy = 'fedadam': fedadam's options are "
     "strategy.fedadam.server-lr (server learning rate eta), strategy.fedadam.beta1"),
    ({"strategy.no-such.x": 1}, "unknown strategy option 'strategy.no-such.x' for federation.strategy = 'fedavg': "
                                "fedavg has no options"),
    ({"strategy.proximal-mu": 0.1}, "strategy.proximal-mu is an old key: each strategy has its own options now; "
                                    "use strategy.fedprox.proximal-mu"),
    ({"strategy.server-lr": 0.1}, "use strategy.fedadam.server-lr or strategy.fedyogi.server-lr"),
    ({"federation.strategy": "fedyogi", "strategy.tau": 0.1}, "use strategy.fedyogi.tau ("),
    ({"federation.strategy": "hetlora", "strategy.hetlora-prune": 0.2}, "use strategy.hetlora.prune ("),
    ({"strategy.sketch-oversample": 4}, "use strategy.sketch.oversample ("),
    ({"federation.strategy": "fedprox", "strategy.fedprox.proximal-mu": -1},
     "strategy.fedprox.proximal-mu = -1.0 is invalid: use a value >= 0"),
    ({"federation.strategy": "fedadam", "strategy.fedadam.beta2": 1}, "strategy.fedadam.beta2 = 1.0 is invalid: use "
                                                                     "a value in [0, 1)"),
    ({"federation.strategy": "hetlora", "strategy.hetlora.norm-weighting": "maybe"},
     "strategy.hetlora.norm-weighting must be bool, got str 'maybe'"),
    ({"train.group-by-length": "maybe"}, "train.group-by-length must be bool, got str 'maybe'; use true or false"),
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
