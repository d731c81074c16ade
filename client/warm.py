"""The warm worker: one long-lived process that runs every ClientApp task of its SuperNode.

flwr 1.42's ``flwr-clientapp`` handles one message and exits, so each message re-imports torch, rebuilds
the model and re-reads the data. With ``flower-supernode --isolation process`` the SuperNode launches
nothing itself: whoever holds its Runtime API port acquires tasks (``AcquireTask``, what ``flower-superexec``
does) and runs them. This worker is that, for ClientApp tasks only, in one process that stays up:

    loop: AcquireTask -> with the task's token, do what flwr/supernode/runtime/run_clientapp.py does once
          (task heartbeat, pull message + context + FAB, install the FAB once, load the ClientApp, run it,
          push the reply and the task output), but return instead of ``flwr_exit``.

The ClientApp (``pollinate.client.app``) is imported once, so its resident state (``client/resident.py``)
survives across messages and rounds. The Flower functions used are pinned by
``tests/client/test_warm_runtime.py``. The SuperNode stays the node's only network endpoint: this worker
speaks only to its Runtime API on 127.0.0.1.

Faults: any exception in a task, CUDA out-of-memory included, becomes that message's error reply with the
reason and the worker keeps serving. If the worker itself dies mid-task, the SuperNode's task heartbeat
expires and Flower answers the coordinator with an error reply; ``pollinate client`` restarts the worker.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from logging import ERROR, INFO

from flwr.app import Context, Error, Message
from flwr.cli.install import install_from_fab
from flwr.clientapp.utils import get_load_client_app_fn
from flwr.common.constant import ErrorCode, SubStatus
from flwr.proto.runtime_pb2 import AcquireTaskRequest  # pylint: disable=E0611
from flwr.supercore import log
from flwr.supercore.app_utils import start_parent_process_monitor
from flwr.supercore.constant import TaskType
from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
from flwr.supercore.retry import make_simple_http_retry_invoker
from flwr.supercore.runtime import RuntimeHttpClient
from flwr.supernode.runtime.run_clientapp import pull_task_input, push_message, push_task_output

# Test hook for the fault tests: the worker dies (os._exit, no clean-up) on its N-th task, after pulling it.
CRASH_AT_TASK = "POLLINATE_FAULT_CRASH_AT_TASK"
CRASH_EXIT_CODE = 70
POLL_S = 0.2  # how often an idle worker asks its SuperNode for a task (flower-superexec asks every 1 s)
# A task's message objects are already on its SuperNode when the task exists, so pulling them takes moments. A task
# whose objects never come (seen: the evaluate message of a run whose coordinator died, which the SuperNode then
# ignored) would hold Flower's pull in its retry loop for up to 2 h; flwr-clientapp spends a process on it, and the
# one warm worker would stop serving every later message. Past this bound the task fails and the worker goes on.
PULL_TIMEOUT_S = 30.0


class TaskInputUnavailable(RuntimeError):
    """The task's message could not be pulled from the SuperNode in time."""


def _pull_bounded(client: RuntimeHttpClient, timeout_s: float) -> tuple[Message, Context, object, object]:
    """Flower's ``pull_task_input``, given at most ``timeout_s``; the caller closes ``client`` either way, which
    ends a pull still retrying in its thread."""
    box: dict[str, object] = {}

    def pull() -> None:
        try:
            box["value"] = pull_task_input(client)
        except BaseException as e:  # noqa: BLE001 - re-raised in the worker's thread below
            box["error"] = e

    thread = threading.Thread(target=pull, name="pull-task-input", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise TaskInputUnavailable(f"the task's message could not be pulled from the SuperNode within {timeout_s:g} s "
                                   f"(a message of a run that has stopped?); the task is skipped")
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]  # type: ignore[return-value]


def _runtime_client(address: str, token: str | None) -> RuntimeHttpClient:
    interceptors = [RuntimeVersionHttpInterceptor(component_name="flwr-clientapp" if token else "SuperExec")]
    if token:
        interceptors.append(RuntimeTokenHttpInterceptor(token))
    return RuntimeHttpClient.from_server_address(server_address=address, insecure=True, root_certificates=None,
                                                 interceptors=interceptors,
                                                 retry_invoker=make_simple_http_retry_invoker())


def _failure_reason(ex: BaseException) -> str:
    import torch  # already imported with the ClientApp

    if isinstance(ex, torch.cuda.OutOfMemoryError):
        torch.cuda.empty_cache()  # the failed step's tensors are gone; give their memory back for the next message
        return (f"CUDA out of memory on this node ({str(ex).splitlines()[0]}); lower train.batch-size or "
                f"model.max-length, or run the node with --device cpu")
    return f"{type(ex)}:<'{ex}'>"  # Flower's own format (run_clientapp.py)


class Worker:
    """Serves the tasks of one SuperNode's Runtime API, one at a time, until stopped."""

    def __init__(self, address: str, crash_at_task: int = 0, pull_timeout_s: float = PULL_TIMEOUT_S) -> None:
        self.address, self.pull_timeout_s = address, pull_timeout_s
        self.installed: set[str] = set()  # FAB hashes already installed into FLWR_HOME by this process
        self.tasks = 0
        self.crash_at_task = crash_at_task
        self.load_client_app = get_load_client_app_fn(default_app_ref="", app_path=None, multi_app=True)

    def serve(self, max_tasks: int | None = None) -> None:
        acquirer = _runtime_client(self.address, None)
        try:
            while max_tasks is None or self.tasks < max_tasks:
                res = acquirer.AcquireTask(AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP]))
                if res.HasField("task") and res.token:
                    self.run_task(res.token)
                else:
                    time.sleep(POLL_S)
        finally:
            acquirer.close()

    def run_task(self, token: str) -> None:
        """One ClientApp task, as ``run_clientapp`` runs it, without leaving the process."""
        self.tasks += 1
        started = time.monotonic()
        client = _runtime_client(self.address, token)
        heartbeat = HeartbeatSender(make_task_heartbeat_fn_http(client))
        heartbeat.start()
        message: Message | None = None
        reply: Message | None = None
        context: Context | None = None
        status, details = SubStatus.FAILED, "ClientApp task failed due to unknown reason"
        try:
            message, context, run, fab = _pull_bounded(client, self.pull_timeout_s)
            log(INFO, "task %d (%s) started", self.tasks, message.metadata.message_type)
            if self.tasks == self.crash_at_task:
                os._exit(CRASH_EXIT_CODE)  # the fault hook: a crash mid-round, nothing cleaned up
            if fab.hash_str not in self.installed:
                install_from_fab(fab.content, skip_prompt=True)
                self.installed.add(fab.hash_str)
            app = self.load_client_app(run.fab_id, run.fab_version, fab.hash_str)  # a module import, once
            reply = app(message=message, context=context)
            status, details = SubStatus.COMPLETED, ""
        except Exception as ex:  # noqa: BLE001 - any task failure is that message's error reply, not the worker's end
            reason = _failure_reason(ex)
            log(ERROR, "ClientApp raised an exception: %s", reason, exc_info=ex)
            details = reason
            if message is not None:
                reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=message)
        finally:
            try:
                if reply is not None and context is not None:
                    push_message(client, reply, context)
            except Exception as ex:  # noqa: BLE001 - the SuperNode expires the task; the worker goes on
                log(ERROR, "Failed to push the reply: %s", ex)
            push_task_output(client=client, context=context, sub_status=status, details=details)
            heartbeat.stop()
            client.close()
            kind = message.metadata.message_type if message is not None else "?"
            log(INFO, "task %d (%s) %s in %.2f s", self.tasks, kind, status, time.monotonic() - started)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pollinate.client.warm",
                                     description="serve a SuperNode's ClientApp tasks in one warm process")
    parser.add_argument("--runtime-api-address", required=True, metavar="127.0.0.1:PORT")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--parent-pid", type=int, help="exit when this process (`pollinate client`) is gone")
    args = parser.parse_args(argv)
    if args.threads > 0:  # before torch loads: its OpenMP pool reads this once
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch

    import pollinate.client.app  # noqa: F401 - torch, transformers and PEFT once, before the first message

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.parent_pid:  # a `pollinate client` killed with SIGKILL cannot stop us: we notice and leave
        start_parent_process_monitor(args.parent_pid)

    crash_at = int(os.environ.get(CRASH_AT_TASK, "0") or 0)
    log(INFO, "pollinate warm worker (pid %d) serving %s", os.getpid(), args.runtime_api_address)
    try:
        Worker(args.runtime_api_address, crash_at).serve()
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
