"""`pollinate server` / `pollinate client` refuse what cannot work, before starting anything, and say what to do."""

from __future__ import annotations

import signal
import socket
from pathlib import Path

import pytest

from pollinate.server.resume import RESUMABLE_KEYS, resumed_config
from pollinate.proto.run_config import ConfigError, RunConfig
from pollinate.server.store import RoundStore
from tests.support.paths import TINY
from tests.support.commands import pollinate


@pytest.fixture(autouse=True)
def keep_sigterm():
    handler = signal.getsignal(signal.SIGTERM)  # the commands turn SIGTERM into KeyboardInterrupt
    yield
    signal.signal(signal.SIGTERM, handler)


def _says(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    code, said = pollinate(capsys, *argv)
    assert code == 2
    return said


@pytest.fixture
def stored(tmp_path: Path) -> tuple[str, int, int]:
    """A store with a completed run and one whose coordinator died (still 'running')."""
    url = f"sqlite:///{tmp_path / 'store.db'}"
    store = RoundStore(url)
    cfg = RunConfig()
    done = store.start_run(cfg.to_flat(), "fedavg", "minilm")
    store.finish_run(done, "completed", adapter_dir="/somewhere")
    died = store.start_run(cfg.to_flat(), "fedavg", "minilm")
    return url, done, died


def test_resume_refuses_an_unknown_or_completed_run(capsys, stored) -> None:
    url, done, _ = stored
    assert "run 99 is not in the store" in _says(capsys, "server", "--resume", "99", "--db", url)
    assert f"run {done} is completed" in _says(capsys, "server", "--resume", str(done), "--db", url)


def test_resume_keeps_the_stored_config_and_refuses_changes_that_alter_the_math(capsys, stored) -> None:
    url, _, died = stored
    said = _says(capsys, "server", "--resume", str(died), "--db", url, "--set", "federation.strategy=fedadam")
    assert "refused change(s): federation.strategy: 'fedavg' -> 'fedadam'" in said
    assert "--scenario" in _says(capsys, "server", "--resume", str(died), "--db", url, "--scenario", TINY)
    more = resumed_config(RunConfig().to_flat(), {"federation.rounds": 7, "store.resume-run": died})
    assert more.federation.rounds == 7 and more.federation.strategy == "fedavg"
    with pytest.raises(ConfigError, match="train.lr"):
        resumed_config(RunConfig().to_flat(), {"train.lr": 1.0})
    assert "federation.rounds" in RESUMABLE_KEYS and "adapter.r" not in RESUMABLE_KEYS


def test_a_port_in_use_is_named_with_the_fix(capsys, tmp_path: Path) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        said = _says(capsys, "server", "--scenario", TINY, "--db", f"sqlite:///{tmp_path / 's.db'}", "--output",
                     str(tmp_path), "--port", str(port))
    assert f"127.0.0.1:{port} is in use" in said and "choose another --port" in said


def test_a_node_without_its_data_or_its_superlink_says_what_to_do(capsys, tmp_path: Path) -> None:
    said = _says(capsys, "client", "--superlink", "127.0.0.1:1", "--data", str(tmp_path / "none.jsonl"))
    assert "no such file on this node" in said
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "fine", "label": 1}\n')
    said = _says(capsys, "client", "--superlink", "127.0.0.1:1", "--data", str(data), "--wait", "1")
    assert "a node needs at least 2 examples to train and evaluate, it has 1" in said  # checked before connecting
    data.write_text('{"text": "fine", "label": 1}\n{"text": "poor", "label": 0}\n')
    said = _says(capsys, "client", "--superlink", "127.0.0.1:1", "--data", str(data), "--wait", "1")
    assert "the SuperLink at 127.0.0.1:1 did not answer within 1 s" in said and "pollinate server" in said


def test_the_server_command_knows_the_status_service_port_without_importing_it() -> None:
    from pollinate.server.cli import STATUS_PORT
    from pollinate.server.status_service import DEFAULT_PORT

    assert STATUS_PORT == DEFAULT_PORT


def test_node_keys_without_node_auth_or_that_do_not_exist_are_refused_before_anything_starts(capsys,
                                                                                               tmp_path: Path) -> None:
    common = ["server", "--scenario", TINY, "--db", f"sqlite:///{tmp_path / 's.db'}", "--output", str(tmp_path),
              "--no-status"]
    key = tmp_path / "node-1.pub"
    key.write_text("ecdsa-sha2-nistp384 AAAA... node-1\n")
    assert "add --enable-supernode-auth" in _says(capsys, *common, "--register-node", str(key))
    said = _says(capsys, *common, "--enable-supernode-auth", "--register-node", str(tmp_path / "none.pub"))
    assert "none.pub: no such file" in said and "pollinate certs" in said


def test_node_authentication_without_a_certificate_directory_is_refused_before_anything_starts(
        capsys, tmp_path: Path) -> None:
    """Flower authenticates SuperNodes only over TLS: a key without --certs would silently go unused."""
    said = _says(capsys, "server", "--scenario", TINY, "--db", f"sqlite:///{tmp_path / 's.db'}", "--output",
                 str(tmp_path), "--no-status", "--enable-supernode-auth")
    assert "--enable-supernode-auth needs --certs DIR" in said
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "fine", "label": 1}\n')
    node = ["client", "--superlink", "127.0.0.1:1", "--data", str(data), "--wait", "1"]
    assert "--node-key needs --certs DIR" in _says(capsys, *node, "--node-key", str(tmp_path / "node-1"))
    said = _says(capsys, *node, "--certs", str(tmp_path / "no-certs"))
    assert f"{tmp_path / 'no-certs' / 'ca.crt'} missing" in said


def test_a_node_keeps_its_privacy_budget_where_it_is_told_and_refuses_an_unwritable_place(tmp_path: Path) -> None:
    from flwr.common.config import parse_config_args

    from pollinate.client.node import node_config
    from pollinate.proto.node_config import NodeConfig
    from pollinate.proto.run_config import ConfigError

    data = tmp_path / "node.jsonl"
    data.write_text('{"text": "a fine film", "label": 1}\n')
    (tmp_path / "state").mkdir()
    config = node_config(data, 4, "cpu", tmp_path / "state" / "budget.json")
    node = NodeConfig.from_flower(parse_config_args([config]))  # as the SuperNode hands it to the ClientApp
    assert node.budget_path == tmp_path / "state" / "budget.json" and node.data_path == data
    assert NodeConfig.from_flower(parse_config_args([node_config(data, 4, "cpu")])).budget_path.parent == tmp_path
    for bad in (tmp_path / "state", tmp_path / "missing" / "budget.json"):
        with pytest.raises(ConfigError, match="--privacy-state"):
            node_config(data, 4, "cpu", bad)
