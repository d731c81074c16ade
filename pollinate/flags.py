"""The ``pollinate`` command line's one vocabulary: every flag two commands share is defined here, once.

``simulate`` and ``server`` take the same run-config flags (``--scenario``, ``--set``, ``--rounds``, ``--db``, ...)
with the same meaning; every command that reads a ``pollinate certs`` directory takes it as ``--certs DIR``; every
command that opens the round store finds it the same way (``store_url``). Spellings we retired stay known, so a
script that still uses one is refused with the new spelling instead of an argparse "unrecognized arguments".
This module imports only the run-config schema and the certificate layout: the commands import it, never the
other way round.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError

from pollinate.proto.run_config import PRIVACY_MODES, ConfigError, RunConfig, Scalar, parse_assignments
from pollinate.security.certs import CertDir

STORE_ENV = "POLLINATE_DB"  # the round store when no --db is given
DEFAULT_STORE_FILE = "pollinate.db"  # ... and when $POLLINATE_DB is unset: this file in the working directory
DP_DEFAULT_STRATEGY = "ffa-lora"  # FFA-LoRA under DP (Sun et al. 2024): noise on one factor, exact aggregation
# What --dp MODE sets when the command line does not (docs/privacy-bench.md): under central DP over 500 nodes fedavg
# kept 98% of its non-private accuracy at epsilon 8, while ffa-lora (only B trained, from zero, A at random) stayed
# near the majority class in 20 rounds, with or without DP.
DP_DEFAULTS: dict[str, dict[str, Scalar]] = {
    "sample": {"federation.strategy": DP_DEFAULT_STRATEGY},
    "local": {"federation.strategy": DP_DEFAULT_STRATEGY},
    "central": {"federation.strategy": "fedavg"},
}
STORE_DEFAULT_HELP = f"default: ${STORE_ENV}, else sqlite:///<absolute path of ./{DEFAULT_STORE_FILE}>"

# Named run-config flags -> the run config key each one sets (``--set KEY=VALUE`` sets any key).
RUN_CONFIG_FLAGS: tuple[tuple[str, str], ...] = (
    ("rounds", "federation.rounds"), ("strategy", "federation.strategy"), ("rank", "adapter.r"),
    ("db", "store.db"), ("output", "store.output-dir"), ("corpus", "data.dataset"),
    ("dp", "privacy.mode"), ("epsilon", "privacy.target-epsilon"), ("delta", "privacy.delta"),
    ("noise_multiplier", "privacy.noise-multiplier"), ("clip_norm", "privacy.clip-norm"))
RUN_CONFIG_SWITCHES: tuple[tuple[str, str], ...] = (
    ("secagg", "secagg.enabled"), ("adaptive_clipping", "privacy.adaptive-clipping"))
PATH_KEYS = ("store.db", "store.output-dir")  # the ServerApp may run in another process: never relative

# Retired spellings -> what to write instead (each refused with that message, exit code 2).
RENAMED_TLS_SERVER = {
    "--ssl-ca-certfile": "--certs DIR (the directory `pollinate certs` wrote; ca.crt is read from it)",
    "--ssl-certfile": "--certs DIR (the directory `pollinate certs` wrote; server.crt is read from it)",
    "--ssl-keyfile": "--certs DIR (the directory `pollinate certs` wrote; server.key is read from it)",
}
RENAMED_TLS_CLIENT = {
    "--root-certificates": "--certs DIR (the directory `pollinate certs` wrote, or this node's copy; ca.crt is "
                           "read from it)",
    "--auth-supernode-private-key": "--node-key FILE (this node's private key, nodes/node-<i> from "
                                    "`pollinate certs`), with --certs DIR",
}
RENAMED_SIMULATE = {
    "--data": "--corpus PATH (the CSV/JSONL corpus partitioned across the simulated nodes; `--data` is a "
              "deployed node's own file, `pollinate client --data`)",
}


class _Renamed(argparse.Action):
    """A retired spelling: refuse it, naming the flag that replaced it."""

    def __init__(self, option_strings: Sequence[str], dest: str, instead: str = "", **kwargs: object) -> None:
        super().__init__(option_strings, dest, nargs="?", help=argparse.SUPPRESS, **kwargs)  # type: ignore[arg-type]
        self.instead = instead

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: object,
                 option_string: str | None = None) -> None:
        parser.error(f"{option_string} is no longer a pollinate flag; use {self.instead}")


def refuse_renamed(parser: argparse.ArgumentParser, renamed: Mapping[str, str]) -> None:
    """Make each retired flag of ``parser`` an error that names its replacement (hidden from --help)."""
    for old, instead in renamed.items():
        parser.add_argument(old, action=_Renamed, instead=instead, dest=f"renamed_{old.lstrip('-')}")


def add_scenario_arguments(parser: argparse.ArgumentParser, default_help: str) -> None:
    """``--scenario NAME|PATH``; ``[SCENARIO]`` is the same argument without the flag (``pollinate simulate NAME``)."""
    what = "scenario TOML: a path, or a name in simulations/scenarios/ (default, heterogeneous, ...)"
    parser.add_argument("scenario_arg", nargs="?", metavar="SCENARIO", help="the same as --scenario")
    parser.add_argument("--scenario", help=f"{what}; {default_help}")


def scenario_of(args: argparse.Namespace) -> str | None:
    """The scenario given by ``--scenario`` or as ``SCENARIO``; None when neither was."""
    flag, positional = args.scenario, args.scenario_arg
    if flag is not None and positional is not None and flag != positional:
        raise ConfigError(f"two scenarios given, {positional!r} and --scenario {flag!r}; give one")
    return flag if flag is not None else positional


def add_db_argument(parser: argparse.ArgumentParser, scenario: bool = False) -> None:
    """``--db URL``: the round store (``store_url`` resolves it when omitted)."""
    default = STORE_DEFAULT_HELP.replace(", else sqlite", ", else the scenario's [store] db, else sqlite") \
        if scenario else STORE_DEFAULT_HELP
    parser.add_argument("--db", metavar="URL", help=f"round store URL (store.db), e.g. "
                        f"postgresql+psycopg://user@host:5432/db; {default}")


def add_run_config_arguments(parser: argparse.ArgumentParser, set_example: str) -> None:
    """The flags of ``simulate`` and ``server`` that set run config keys (both commands start a run)."""
    parser.add_argument("--rounds", type=int, help="federation.rounds")
    parser.add_argument("--strategy", help="federation.strategy (see `pollinate strategies`)")
    parser.add_argument("--rank", type=int, help="adapter.r")
    add_db_argument(parser, scenario=True)
    parser.add_argument("--output", metavar="DIR", help="where the adapter (and a simulation's partitions) go "
                        "(store.output-dir)")
    dp = parser.add_argument_group("differential privacy (privacy.*; docs/privacy-bench.md)")
    dp.add_argument("--dp", choices=[m for m in PRIVACY_MODES if m != "off"],
                    help="sample: DP-SGD on each client; central: client-level DP on the server; local: each client "
                         f"noises its own upload (privacy.mode). Without --strategy: fedavg under central, "
                         f"{DP_DEFAULT_STRATEGY} under sample and local")
    dp.add_argument("--epsilon", type=float, help="the privacy budget (privacy.target-epsilon)")
    dp.add_argument("--delta", type=float, help="privacy.delta, below 1/n")
    dp.add_argument("--noise-multiplier", type=float, help="z (privacy.noise-multiplier; 0: calibrated from --epsilon)")
    dp.add_argument("--clip-norm", type=float, help="C: per-example gradient (sample) or adapter-delta (central, "
                                                    "local) bound (privacy.clip-norm)")
    dp.add_argument("--adaptive-clipping", action="store_true",
                    help="central: adapt C to the median delta norm (privacy.adaptive-clipping)")
    parser.add_argument("--secagg", action="store_true",
                        help="secure aggregation: the server learns only the sum of the uploads (secagg.enabled)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help=f"override any run config key, e.g. --set {set_example} (repeatable)")


def overrides_from_args(args: argparse.Namespace, example: str = "train.lr=5e-4") -> dict[str, Scalar]:
    """Flat run-config keys from --set KEY=VALUE and the named flags (named flags win); the store from
    ``$POLLINATE_DB`` when no flag names it; store paths absolute."""
    flat = parse_assignments(args.set, example)
    for attr, key in RUN_CONFIG_FLAGS:
        value = getattr(args, attr, None)
        if value is not None:
            flat[key] = value
    for attr, key in RUN_CONFIG_SWITCHES:
        if getattr(args, attr, False):
            flat[key] = True
    if "store.db" not in flat and os.environ.get(STORE_ENV):
        flat["store.db"] = os.environ[STORE_ENV]
    defaults = {k: v for k, v in DP_DEFAULTS.get(getattr(args, "dp", None) or "", {}).items() if k not in flat}
    if defaults:
        flat.update(defaults)
        print(f"--dp {args.dp}: " + ", ".join(f"{k} = {v}" for k, v in defaults.items()) + " (the defaults under "
              f"--dp {args.dp}, docs/privacy-bench.md; --strategy NAME or --set KEY=VALUE to change)", flush=True)
    return {k: absolute_location(str(v), k) if k in PATH_KEYS else v for k, v in flat.items()}


def absolute_locations(cfg: RunConfig) -> RunConfig:
    """``cfg`` with its store URL and output directory made absolute (a scenario may give them relative)."""
    return cfg.replace(**{k: absolute_location(str(v), k) for k, v in cfg.to_flat().items() if k in PATH_KEYS})


def absolute_location(value: str, key: str) -> str:
    """An output directory or a SQLite file URL resolved against the working directory; other URLs as given."""
    if key == "store.output-dir":
        return str(_output_dir(Path(value).resolve()))
    example = f"sqlite:///{DEFAULT_STORE_FILE} or postgresql+psycopg://user@host:5432/db"
    try:
        url = make_url(value)
    except ArgumentError:
        raise ConfigError(f"--db {value!r} is not a database URL; give one such as {example}") from None
    try:
        url.get_dialect()  # an unknown scheme (foo://) fails here, not in the middle of a run
    except NoSuchModuleError:
        raise ConfigError(f"--db {value!r}: {url.drivername!r} is not a database pollinate can open; give a URL "
                          f"such as {example}") from None
    if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
        return url.set(database=str(Path(url.database).resolve())).render_as_string(hide_password=False)
    return value


def _output_dir(path: Path) -> Path:
    """``path`` if it is, or can become, a directory: refused when it or a parent is a regular file."""
    for ancestor in (path, *path.parents):
        if ancestor.exists():
            if not ancestor.is_dir():
                raise ConfigError(f"--output {path}: {ancestor} is a file, not a directory; give a directory "
                                  f"(store.output-dir) that does not lie under a file")
            return path
    return path


def store_url(db: str | None) -> str:
    """The round store a command opens: ``--db``, else ``$POLLINATE_DB``, else ./pollinate.db (absolute)."""
    url = db or os.environ.get(STORE_ENV) or f"sqlite:///{DEFAULT_STORE_FILE}"
    return absolute_location(url, "store.db")


def add_certs_argument(parser: argparse.ArgumentParser, reads: str) -> None:
    """``--certs DIR``: the directory ``pollinate certs`` wrote (or this machine's copy of its part of it)."""
    parser.add_argument("--certs", type=Path, metavar="DIR",
                        help=f"TLS: the directory `pollinate certs` wrote (or this machine's copy); {reads}")


def certs_of(args: argparse.Namespace) -> CertDir | None:
    return CertDir(args.certs) if args.certs is not None else None


PORT_RANGE = (1, 65535)


def port_number(value: str) -> int:
    """argparse ``type`` of a port a server listens on: 1..65535 (0, "any free port", is no port to tell nodes)."""
    try:
        port = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a port number; use {PORT_RANGE[0]}..{PORT_RANGE[1]}") \
            from None
    if not PORT_RANGE[0] <= port <= PORT_RANGE[1]:
        raise argparse.ArgumentTypeError(f"{port} is outside the valid range {PORT_RANGE[0]}..{PORT_RANGE[1]}")
    return port


def host_port(value: str) -> str:
    """argparse ``type`` of a server's address, ``HOST:PORT`` (``[v6]:PORT`` for IPv6), the port in 1..65535."""
    host, sep, port = value.rpartition(":")
    if not sep or not host.strip("[]"):
        raise argparse.ArgumentTypeError(f"{value!r} is not HOST:PORT, e.g. coordinator.example.org:9092")
    port_number(port)
    return value


def add_insecure_argument(parser: argparse.ArgumentParser, serves: str) -> None:
    """``--insecure``: allow serving ``serves`` without TLS on a non-loopback --host (explicitly, with a warning)."""
    parser.add_argument("--insecure", action="store_true",
                        help=f"allow {serves} without TLS on a non-loopback --host (plaintext and unauthenticated: "
                             f"only on a network you trust); without --certs a non-loopback --host is refused")
