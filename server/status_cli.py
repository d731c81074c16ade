"""`pollinate status` and `pollinate download`: the status service for people (rich tables) and scripts (--json)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import grpc
from google.protobuf.json_format import MessageToDict
from rich.console import Console
from rich.table import Table

from pollinate.flags import add_certs_argument, certs_of, host_port
from pollinate.proto import pollinate_status_pb2 as pb
from pollinate.server.status_client import connect, download
from pollinate.server.status_service import DEFAULT_PORT

console = Console(highlight=False, width=max(120, Console().width))


def add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--coordinator", default=f"127.0.0.1:{DEFAULT_PORT}", type=host_port,
                        help="HOST:PORT of the status service (started by `pollinate server`)")
    add_certs_argument(parser, "mutual TLS: the service is verified against ca.crt, and operator.crt/operator.key "
                       "are presented")


def add_status_arguments(parser: argparse.ArgumentParser) -> None:
    add_connection_arguments(parser)
    parser.add_argument("run", nargs="?", type=int, help="one run: its rounds and the last round's client ledger")
    parser.add_argument("--round", type=int, default=None, help="with RUN: this round's client ledger")
    parser.add_argument("--follow", action="store_true", help="print rounds as they are recorded until the run ends")
    parser.add_argument("--json", action="store_true", help="machine-readable output (--follow: one JSON per line)")


def add_download_arguments(parser: argparse.ArgumentParser) -> None:
    add_connection_arguments(parser)
    parser.add_argument("run", type=int, help="run id (`pollinate status` lists them)")
    parser.add_argument("--round", type=int, default=0, help="round number (default: the last stored round)")
    parser.add_argument("out_dir", type=Path, help="new directory for the PEFT adapter")


def _as_dict(message) -> dict:
    return MessageToDict(message, preserving_proto_field_name=True)


def status_command(args: argparse.Namespace) -> int:
    stub = connect(args.coordinator, certs_of(args))
    try:
        if args.run is None and not args.follow:
            runs = stub.ListRuns(pb.ListRunsRequest(), timeout=30).runs
            print(json.dumps([_as_dict(r) for r in runs], indent=2)) if args.json else console.print(_runs_table(runs))
            return 0
        run_id = args.run if args.run is not None else _latest_run(stub)
        if run_id is None:
            console.print("[red]error:[/] the status service holds no runs yet; nothing to follow")
            return 2
        if args.follow:
            return _follow(stub, run_id, args.json)
        run = stub.GetRun(pb.GetRunRequest(run_id=run_id), timeout=30)
        number = args.round if args.round is not None else (run.rounds[-1].number if run.rounds else None)
        ledger = stub.GetRound(pb.GetRoundRequest(run_id=run_id, round=number), timeout=30) if number else None
        if args.json:
            print(json.dumps({"run": _as_dict(run), "round": _as_dict(ledger) if ledger else None}, indent=2))
            return 0
        console.print(_rounds_table(run))
        if ledger is not None:
            console.print(_ledger_table(ledger))
        return 0
    except grpc.RpcError as e:
        return _rpc_failed(e, args.coordinator)


def download_command(args: argparse.Namespace) -> int:
    stub = connect(args.coordinator, certs_of(args))
    try:
        out, header = download(stub, args.run, args.round, args.out_dir)
    except grpc.RpcError as e:
        return _rpc_failed(e, args.coordinator)
    console.print(f"run {header.run_id} round {header.round}: {header.total_bytes} bytes, sha256 {header.sha256} "
                  f"verified; PEFT adapter written to {out}")
    return 0


def _latest_run(stub) -> int | None:
    runs = stub.ListRuns(pb.ListRunsRequest(), timeout=30).runs
    return runs[-1].id if runs else None


def _follow(stub, run_id: int, as_json: bool) -> int:
    for event in stub.WatchRun(pb.WatchRunRequest(run_id=run_id)):
        if as_json:
            print(json.dumps(_as_dict(event)), flush=True)
        elif event.kind == pb.RunEvent.ROUND_RECORDED:
            console.print(_round_line(event.round))
            for c in event.round.clients:
                if c.status != "accepted":
                    console.print(f"  [yellow]node {c.node_id} {c.phase} {c.status}[/]: {c.reason}")
        else:
            run = event.run
            console.print(f"run {run.id} {run.status}" + (f": {run.error}" if run.error else "")
                          + (f"; adapter at {run.adapter_dir}" if run.adapter_dir else ""))
    return 0


def _rpc_failed(e: grpc.RpcError, coordinator: str) -> int:
    code = e.code()
    if code == grpc.StatusCode.UNAVAILABLE:
        console.print(f"[red]error:[/] cannot reach the status service at {coordinator}: {e.details()}. Check "
                      f"--coordinator, that `pollinate server` runs, and --certs when it uses TLS")
    else:
        console.print(f"[red]error:[/] {code.name}: {e.details()}")
    return 2


def _fmt(value: float | None, spec: str = ".4f") -> str:
    return "-" if value is None else format(value, spec)


def _opt(message, name: str) -> float | None:
    return getattr(message, name) if message.HasField(name) else None


def _round_line(r: pb.Round) -> str:
    return (f"run {r.run_id} round {r.number}: {r.accepted}/{r.participants} updates accepted, train loss "
            f"{_fmt(_opt(r, 'train_loss'))}, eval loss {_fmt(_opt(r, 'eval_loss'))}, accuracy "
            f"{_fmt(_opt(r, 'eval_accuracy'))}, {r.duration_s:.1f} s, adapter sha256 {r.adapter_sha256[:12]}")


def _runs_table(runs) -> Table:
    table = Table(title="runs")
    for col in ("run", "status", "strategy", "model", "rounds", "started", "adapter / error"):
        table.add_column(col)
    for r in runs:
        table.add_row(str(r.id), r.status, r.strategy, r.model, str(r.rounds_stored),
                      r.started_at.ToDatetime().strftime("%Y-%m-%d %H:%M"), r.error or r.adapter_dir)
    return table


def _rounds_table(run: pb.Run) -> Table:
    table = Table(title=f"run {run.id}: {run.strategy} on {run.model} ({run.status})")
    for col in ("round", "train loss", "eval loss", "accuracy", "accepted", "KiB up", "KiB down", "s", "sha256"):
        table.add_column(col, justify="right")
    for r in run.rounds:
        table.add_row(str(r.number), _fmt(_opt(r, "train_loss")), _fmt(_opt(r, "eval_loss")),
                      _fmt(_opt(r, "eval_accuracy")), f"{r.accepted}/{r.participants}", f"{r.bytes_up / 1024:.1f}",
                      f"{r.bytes_down / 1024:.1f}", f"{r.duration_s:.1f}", r.adapter_sha256[:12])
    return table


def _ledger_table(r: pb.Round) -> Table:
    table = Table(title=f"run {r.run_id} round {r.number}: client ledger")
    for col in ("node", "phase", "status", "rank", "examples", "KiB up", "KiB down", "reason"):
        table.add_column(col)
    for c in r.clients:
        table.add_row(c.node_id, c.phase, c.status, str(c.rank) if c.HasField("rank") else "-", str(c.num_examples),
                      f"{c.bytes_up / 1024:.1f}", f"{c.bytes_down / 1024:.1f}", c.reason)
    return table
