"""``pollinate server``'s coordinator: a Flower SuperLink plus the pollinate ServerApp as one Flower run on it.

How the run is started (flwr 1.42): the SuperLink serves its Fleet, Control and Runtime APIs on one
HTTP port (``--host``/``--port``; the per-API address flags are deprecated) and, with
``--isolation subprocess``, starts ``flower-superexec``, which launches the ServerApp of every
submitted run as ``flwr-serverapp``. We submit the run through the Control API with Flower's own
supported client, ``flwr run APP CONNECTION --format json`` (APP is a Flower App directory whose
``[tool.flwr.app.config]`` is the typed run config, exactly what ``pollinate simulate`` builds;
CONNECTION is written to a private ``$FLWR_HOME/config.toml``, so ``~/.flwr`` is never touched), then
follow it with ``flwr log RUN_ID CONNECTION --stream``, which prints the coordinator's output and
returns when the run finishes. Not ``flwr run --stream`` alone: we need the Flower run id to find the
pollinate run in the round store afterwards. The SuperLink's own state lives in a file
(``--database``), so nodes stay registered, with the same ids, when a coordinator is restarted.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import tomli_w

from pollinate.proto.run_config import ConfigError, RunConfig
from pollinate.runtime.app_dir import write_app_dir
from pollinate.runtime.processes import Daemon, executable, flower_env, require_free_port, wait_healthy
from pollinate.security.certs import CertDir
from pollinate.security.flower_flags import superlink_flags
from pollinate.server.round_events import EVENTS_ENV
from pollinate.server.store import PASSWORD_ENV, PASSWORD_FILE_ENV, password_env

CONNECTION = "pollinate"  # the SuperLink connection's name in our private FLWR_HOME
# Where the coordinator's own environment may hold store credentials ("POLLINATE_DB" is pollinate.flags.STORE_ENV,
# a layer above; its URL may carry a password). None of them is passed on: the SuperLink gets exactly the password
# of this run's store, and the `flwr` CLI calls get none.
STORE_CREDENTIALS = ("POLLINATE_DB", PASSWORD_ENV, PASSWORD_FILE_ENV)


@dataclass(frozen=True)
class SuperLinkSecurity:
    """TLS and SuperNode authentication for the SuperLink, from a `pollinate certs` directory; no directory: insecure."""

    certs: CertDir | None = None  # --certs: server.crt/server.key presented, ca.crt (also what `flwr` verifies with)
    node_auth: bool = False  # --enable-supernode-auth: only registered SuperNode public keys may connect
    node_keys: tuple[Path, ...] = ()  # --register-node: public keys registered once the SuperLink is up

    @property
    def tls(self) -> bool:
        return self.certs is not None

    @property
    def ca_cert(self) -> Path | None:
        return self.certs.ca_cert if self.certs is not None else None

    def flags(self) -> list[str]:
        if self.node_keys and not self.node_auth:
            raise ConfigError("--register-node registers keys for SuperNode authentication; add "
                              "--enable-supernode-auth (and --certs DIR: Flower requires TLS for it)")
        absent = [str(k) for k in self.node_keys if not Path(k).is_file()]
        if absent:
            raise ConfigError(f"--register-node {', '.join(absent)}: no such file; give the nodes' public keys "
                              f"(nodes/node-<i>.pub from `pollinate certs`)")
        if self.node_auth and self.certs is None:
            raise ConfigError("--enable-supernode-auth needs --certs DIR: Flower authenticates SuperNodes only over "
                              "TLS (`pollinate certs DIR` writes the files)")
        if self.certs is None:
            return ["--insecure"]
        return superlink_flags(self.certs, self.node_auth)

    def status_server_credentials(self):  # -> grpc.ServerCredentials (grpc is imported only when TLS is on)
        """The status service beside the SuperLink: the same certificate; operators present one from the same CA."""
        assert self.certs is not None  # only called with TLS on
        return self.certs.status_server_credentials()


def superlink_command(host: str, port: int, state_db: Path, security: SuperLinkSecurity) -> list[str]:
    # Dependencies are installed with pollinate already; Flower's runtime `uv sync` of the app is not wanted.
    return [executable("flower-superlink"), *security.flags(), "--host", host, "--port", str(port),
            "--isolation", "subprocess", "--database", str(state_db), "--disable-runtime-dependency-installation"]


def write_connection(flwr_home: Path, host: str, port: int, security: SuperLinkSecurity) -> None:
    """``$FLWR_HOME/config.toml`` with one SuperLink connection, the default, for `flwr run` and `flwr log`."""
    connection: dict[str, object] = {"address": f"{_client_host(host)}:{port}", "insecure": not security.tls}
    if security.tls:
        connection["root-certificates"] = str(security.ca_cert)
    flwr_home.mkdir(parents=True, exist_ok=True)
    (flwr_home / "config.toml").write_text(tomli_w.dumps({"superlink": {"default": CONNECTION,
                                                                       CONNECTION: connection}}))


@dataclass
class Coordinated:
    """What ``coordinate`` leaves to report: the Flower run id, and how the coordinator ended."""

    log: Path
    flower_run_id: int | None = None
    superlink_exit: int | None = None  # the SuperLink's exit code if it died during the run
    interrupted: bool = False  # Ctrl-C / SIGTERM: everything we started was stopped


def coordinate(cfg: RunConfig, host: str, port: int, state_dir: Path,
               security: SuperLinkSecurity = SuperLinkSecurity(), startup_timeout_s: float = 120.0,
               stale_runs: Sequence[int] = (), output: Callable[[str], None] | None = None) -> Coordinated:
    """Start a SuperLink, run the ServerApp on it with ``cfg`` until the run ends, stop the SuperLink.

    ``output``: gets each line of the coordinator's output, its round events as ``round_events`` lines
    (``server.progress_view.ProgressView.line`` draws them); None: the output goes to this process's stdout.

    ``stale_runs``: Flower runs of earlier coordinators of this pollinate run (a resume). The SuperLink's
    state keeps them, and the messages of the round they were in, after their ServerApp died: they are
    stopped first, so no node trains for a dead coordinator.
    """
    require_free_port(host, port, "SuperLink", "--port")
    state_dir.mkdir(parents=True, exist_ok=True)
    result = Coordinated(log=state_dir / "superlink.log")
    with tempfile.TemporaryDirectory(prefix="pollinate-coordinator-") as tmp, result.log.open("a") as log:
        home = Path(tmp) / "flwr-home"
        write_connection(home, host, port, security)
        env = without_store_credentials(flower_env(home))
        # The ServerApp (flwr-serverapp, started by the SuperExec with the SuperLink's environment) reaches us only
        # through `flwr log`'s text: with a reader here, it writes its round events there as event lines.
        events = {EVENTS_ENV: "lines"} if output is not None else {}
        superlink = Daemon("SuperLink", superlink_command(host, port, state_dir / "state.db", security),
                           {**superlink_env(env, cfg.store.db), **events}, log)
        try:
            scheme = "https" if security.tls else "http"
            verify: str | bool = str(security.ca_cert) if security.tls else False
            if not wait_healthy(f"{scheme}://{_client_host(host)}:{port}", startup_timeout_s, verify, superlink):
                raise ConfigError(f"the SuperLink did not come up on {host}:{port} within {startup_timeout_s:.0f} s "
                                  f"(exit code {superlink.process.poll()}); see {result.log}")
            for key in security.node_keys:
                _register(key, env)
            for stale in stale_runs:
                _stop(stale, env)
            result.flower_run_id = _submit(write_app_dir(cfg, Path(tmp) / "app"), env)
            _follow(result, superlink, env, output)
        except KeyboardInterrupt:
            result.interrupted = True
        finally:
            superlink.stop()
    return result


def without_store_credentials(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k not in STORE_CREDENTIALS}


def superlink_env(env: dict[str, str], store_url: str) -> dict[str, str]:
    """The SuperLink's environment: ``env`` plus the password of ``store_url`` only (if it has one).

    Flower 1.42 gives the SuperLink's environment to the SuperExec it starts and to every ``flwr-serverapp``
    that one launches (subprocess isolation; no option narrows it), and the ServerApp opens the store. So the
    SuperLink, the SuperExec and the ServerApp hold this one password, and no other store credential of ours.
    """
    return {**without_store_credentials(env), **password_env(store_url)}


def _follow(result: Coordinated, superlink: Daemon, env: dict[str, str],
            output: Callable[[str], None] | None) -> None:
    """Hand the run's output to ``output`` (or print it) until it finishes, or until the SuperLink dies under it."""
    follower = Daemon("flwr log", [executable("flwr"), "log", str(result.flower_run_id), CONNECTION, "--stream"], env,
                      subprocess.PIPE if output is not None else None)
    if output is not None:  # a thread reads, so this loop keeps watching the SuperLink
        threading.Thread(target=_read_lines, args=(follower.process.stdout, output), daemon=True).start()
    try:
        while follower.running():
            if not superlink.running():
                result.superlink_exit = superlink.process.returncode
                return
            try:
                follower.process.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                pass
    finally:
        follower.stop()


def _read_lines(stream: IO[bytes], output: Callable[[str], None]) -> None:
    for raw in iter(stream.readline, b""):
        output(raw.decode("utf-8", errors="replace"))


def _flwr(args: list[str], env: dict[str, str], timeout_s: float = 120.0) -> tuple[dict[str, object], str]:
    """``flwr ARGS CONNECTION --format json`` against our SuperLink: (its JSON answer, or {}; everything it said)."""
    done = subprocess.run([executable("flwr"), *args, CONNECTION, "--format", "json"], env=env, capture_output=True,
                          text=True, timeout=timeout_s)
    said = (done.stdout + done.stderr).strip()
    try:
        return json.loads(done.stdout[done.stdout.index("{"):]), said
    except ValueError:
        return {}, said


def _submit(app_dir: Path, env: dict[str, str]) -> int:
    answer, said = _flwr(["run", str(app_dir)], env, timeout_s=300)
    if answer.get("success") and answer.get("run-id"):
        return int(str(answer["run-id"]))
    raise ConfigError(f"the SuperLink refused the run (`flwr run`): {said[-2000:]}")


def _register(public_key: Path, env: dict[str, str]) -> None:
    """``flwr supernode register``; a key the SuperLink's state already holds (a restart) is fine as it is."""
    answer, said = _flwr(["supernode", "register", str(public_key)], env)
    if answer.get("node-id"):
        print(f"registered SuperNode key {public_key} (node {answer['node-id']})", flush=True)
    elif "already in use" in said:
        print(f"SuperNode key {public_key} was already registered", flush=True)
    else:
        raise ConfigError(f"the SuperLink did not register {public_key}: {said[-1000:]}")


def _stop(flower_run_id: int, env: dict[str, str]) -> None:
    """``flwr stop``, saying what became of the run (one this SuperLink does not know cannot reach its nodes)."""
    answer, said = _flwr(["stop", str(flower_run_id)], env)
    if answer.get("success"):
        print(f"Flower run {flower_run_id} of the coordinator that died: stopped", flush=True)
    elif "already finished" in said:
        print(f"Flower run {flower_run_id} of the coordinator that died: already finished", flush=True)
    else:  # e.g. another --state-dir: this SuperLink never knew the run, so no node can get its messages from it
        print(f"Flower run {flower_run_id} of the coordinator that died was not stopped: "
              f"{said.splitlines()[-1] if said else 'flwr stop said nothing'}", flush=True)


def _client_host(host: str) -> str:
    """Where a local client reaches a SuperLink listening on ``host`` (0.0.0.0 listens everywhere)."""
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
