"""One flag vocabulary: `simulate` and `server` mean the same by the same flag, every certificate directory is
`--certs DIR`, every command finds the round store the same way, and a retired spelling is refused with its
replacement (exit code 2, no traceback)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pollinate.cli import build_parser, main
from pollinate.flags import STORE_ENV, overrides_from_args, scenario_of, store_url
from pollinate.proto.run_config import ConfigError, RunConfig
from pollinate.server.store import RoundStore

NODE = ["client", "--superlink", "127.0.0.1:1", "--data", "node.jsonl"]


@pytest.mark.parametrize("argv, instead", [
    (["simulate", "--data", "corpus.csv"], "use --corpus PATH"),
    (["simulate", "heterogeneous", "--data", "corpus.csv"], "use --corpus PATH"),
    (["server", "--ssl-ca-certfile", "ca.crt"], "use --certs DIR"),
    (["server", "--ssl-certfile", "server.crt"], "use --certs DIR"),
    (["server", "--ssl-keyfile", "server.key"], "use --certs DIR"),
    ([*NODE, "--root-certificates", "ca.crt"], "use --certs DIR"),
    ([*NODE, "--auth-supernode-private-key", "nodes/node-1"], "use --node-key FILE"),
])
def test_a_retired_spelling_is_refused_naming_its_replacement(argv: list[str], instead: str, capsys) -> None:
    with pytest.raises(SystemExit) as refused:
        main(argv)
    said = " ".join(capsys.readouterr().err.split())
    assert refused.value.code == 2
    assert f"{argv[-2]} is no longer a pollinate flag; {instead}" in said, said
    assert "Traceback" not in said


def test_a_retired_spelling_in_a_real_process_is_a_one_line_refusal(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "pollinate.cli", "server", "--ssl-certfile", "server.crt"],
                          cwd=tmp_path, env=os.environ.copy(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "--ssl-certfile is no longer a pollinate flag; use --certs DIR" in " ".join(done.stderr.split())
    assert "Traceback" not in done.stderr + done.stdout


def test_retired_spellings_are_not_advertised() -> None:
    sub = build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    assert "--ssl-certfile" not in sub["server"].format_help() and "--certs DIR" in sub["server"].format_help()
    assert "--root-certificates" not in sub["client"].format_help() and "--node-key" in sub["client"].format_help()
    assert "--corpus" in sub["simulate"].format_help()


def test_simulate_and_server_set_the_same_keys_with_the_same_flags(tmp_path: Path) -> None:
    shared = ["--rounds", "3", "--strategy", "fedprox", "--rank", "4", "--db", f"sqlite:///{tmp_path / 's.db'}",
              "--output", str(tmp_path / "out"), "--dp", "central", "--epsilon", "2", "--delta", "1e-6",
              "--noise-multiplier", "1.1", "--clip-norm", "0.5", "--adaptive-clipping", "--secagg",
              "--set", "train.lr=0.1"]
    parser = build_parser()
    simulated = overrides_from_args(parser.parse_args(["simulate", *shared]))
    served = overrides_from_args(parser.parse_args(["server", *shared]))
    assert simulated == served
    assert simulated == {"federation.rounds": 3, "federation.strategy": "fedprox", "adapter.r": 4,
                         "store.db": f"sqlite:///{tmp_path / 's.db'}", "store.output-dir": str(tmp_path / "out"),
                         "privacy.mode": "central", "privacy.target-epsilon": 2.0, "privacy.delta": 1e-6,
                         "privacy.noise-multiplier": 1.1, "privacy.clip-norm": 0.5,
                         "privacy.adaptive-clipping": True, "secagg.enabled": True, "train.lr": "0.1"}
    assert RunConfig.from_flat(simulated).train.lr == 0.1  # strings from --set are typed by the schema


def test_the_corpus_is_the_simulations_data_and_data_is_a_nodes_own_file() -> None:
    parser = build_parser()
    assert overrides_from_args(parser.parse_args(["simulate", "--corpus", "mine.csv"]))["data.dataset"] == "mine.csv"
    assert parser.parse_args(NODE).data == Path("node.jsonl")


@pytest.mark.parametrize("command", ["simulate", "server"])
def test_a_scenario_is_named_by_flag_or_position_and_only_once(command: str) -> None:
    parser = build_parser()
    assert scenario_of(parser.parse_args([command, "--scenario", "heterogeneous"])) == "heterogeneous"
    assert scenario_of(parser.parse_args([command, "heterogeneous"])) == "heterogeneous"
    assert scenario_of(parser.parse_args([command, "tiny", "--scenario", "tiny"])) == "tiny"
    assert scenario_of(parser.parse_args([command])) is None
    with pytest.raises(ConfigError, match="two scenarios given, 'a' and --scenario 'b'; give one"):
        scenario_of(parser.parse_args([command, "a", "--scenario", "b"]))


def test_the_default_store_is_the_environment_else_an_absolute_pollinate_db(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(STORE_ENV, raising=False)
    assert store_url(None) == f"sqlite:///{tmp_path / 'pollinate.db'}"
    assert store_url("sqlite:///rel.db") == f"sqlite:///{tmp_path / 'rel.db'}"
    monkeypatch.setenv(STORE_ENV, "sqlite:///env.db")
    assert store_url(None) == f"sqlite:///{tmp_path / 'env.db'}"
    assert store_url("postgresql+psycopg://u@h/db") == "postgresql+psycopg://u@h/db"  # --db wins
    parser = build_parser()
    assert overrides_from_args(parser.parse_args(["simulate"]))["store.db"] == f"sqlite:///{tmp_path / 'env.db'}"
    assert overrides_from_args(parser.parse_args(["server", "--db", "sqlite:///f.db"]))["store.db"] == \
        f"sqlite:///{tmp_path / 'f.db'}"
    assert overrides_from_args(parser.parse_args(["server", "--set", "store.db=sqlite:///s.db"]))["store.db"] == \
        f"sqlite:///{tmp_path / 's.db'}"


def test_a_malformed_store_url_is_named_with_an_example(capsys, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv(STORE_ENV, raising=False)
    assert main(["runs", "--db", "not a url"]) == 2
    said = " ".join(capsys.readouterr().out.split())
    assert "--db 'not a url' is not a database URL; give one such as sqlite:///pollinate.db" in said


@pytest.mark.parametrize("command", [["runs", "--json"], ["privacy", "1", "--json"]])
def test_runs_and_privacy_read_the_store_named_by_the_environment(command: list[str], tmp_path: Path, monkeypatch,
                                                                  capsys) -> None:
    url = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    run = RoundStore(url).start_run(RunConfig().to_flat(), "fedavg", "minilm")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(STORE_ENV, url)
    assert main(command) == 0
    said = json.loads(capsys.readouterr().out)
    assert (said[0]["id"] if command[0] == "runs" else said["run"]) == run
    monkeypatch.delenv(STORE_ENV)
    assert main(["runs", "--json"]) == 0  # no variable: ./pollinate.db, a new empty store here
    assert json.loads(capsys.readouterr().out) == [] and (tmp_path / "pollinate.db").is_file()


def test_every_store_flag_says_its_default() -> None:
    sub = build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    for command in ("simulate", "server", "runs", "privacy"):
        said = " ".join(sub[command].format_help().split())
        assert f"${STORE_ENV}, else" in said and "<absolute path of ./pollinate.db>" in said, command
