"""The warm node runtime: resident state (client/resident.py) and the Flower functions the warm worker
(client/warm.py) calls in place of ``flwr-clientapp``, pinned so a Flower upgrade that changes them fails here."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, Message, RecordDict

from pollinate.client import resident
from pollinate.client.app import app
from pollinate.models import adapter_state
from pollinate.proto.adapter_record import ADAPTER, REPORT, to_record
from pollinate.proto.node_config import DATA_PATH, DEVICE
from pollinate.proto.reply_schema import EVALUATE, MODEL_LOADS, TRAIN, check_reply
from tests.support.adapters import examples
from tests.support.inprocess import serverapp_identity


def test_the_flower_functions_the_warm_worker_calls_keep_their_signatures_and_their_place_in_a_task() -> None:
    import flwr
    from flwr.cli.install import install_from_fab
    from flwr.clientapp.utils import get_load_client_app_fn
    from flwr.supercore.heartbeat import HeartbeatSender, make_task_heartbeat_fn_http
    from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
    from flwr.supercore.runtime import RuntimeHttpClient
    from flwr.supernode.runtime import run_clientapp

    def params(f: object) -> list[str]:
        return list(inspect.signature(f).parameters)  # type: ignore[arg-type]

    assert params(run_clientapp.pull_task_input) == ["client"]
    assert params(run_clientapp.push_message) == ["client", "message", "context"]
    assert params(run_clientapp.push_task_output) == ["client", "context", "sub_status", "details"]
    assert params(install_from_fab)[:1] == ["fab_file"] and "skip_prompt" in params(install_from_fab)
    assert params(get_load_client_app_fn) == ["default_app_ref", "app_path", "multi_app"]
    assert params(make_task_heartbeat_fn_http) == ["client"]
    assert params(HeartbeatSender.__init__) == ["self", "heartbeat_fn"]
    assert params(RuntimeTokenHttpInterceptor.__init__) == ["self", "token"]
    assert params(RuntimeVersionHttpInterceptor.__init__) == ["self", "component_name"]
    assert params(RuntimeHttpClient.from_server_address)[:4] == ["server_address", "insecure", "root_certificates",
                                                                  "interceptors"]
    assert all(hasattr(RuntimeHttpClient, m) for m in ("AcquireTask", "PullTaskInput", "PushTaskOutput"))
    # What one task does in flwr-clientapp, in this order, is what Worker.run_task does: if Flower adds a step,
    # this list changes and the worker must follow.
    body = inspect.getsource(run_clientapp.run_clientapp)
    steps = ["HeartbeatSender(", "pull_task_input(", "install_from_fab(", "load_client_app_fn(", "client_app(",
             "push_message(", "push_task_output("]
    at = [body.find(s) for s in steps]
    assert all(i >= 0 for i in at) and at[:-1] == sorted(at[:-1]), dict(zip(steps, at))
    assert flwr.__version__.startswith("1.42."), "the warm worker is written against flwr 1.42's Runtime API"


@pytest.fixture
def node(tmp_path: Path, tiny_cfg) -> Context:
    path = tmp_path / "node.jsonl"
    path.write_text("".join(json.dumps({"text": e.text, "label": e.label}) + "\n" for e in examples(3, 40)))
    return Context(run_id=90_001, node_id=7, node_config={DATA_PATH: str(path), DEVICE: "cpu"}, state=RecordDict(),
                   run_config=tiny_cfg.to_flat())


def _ask(context: Context, kind: str, tensors: dict[str, np.ndarray]) -> Message:
    with serverapp_identity():  # the message is made as the coordinator makes it
        msg = Message(RecordDict({ADAPTER: to_record(tensors, "float32")}), dst_node_id=context.node_id,
                      message_type=kind)
    msg.metadata.__dict__["_message_id"] = f"{kind}-{np.random.default_rng().integers(1 << 30)}"
    return app(msg, context)


def test_a_node_loads_its_model_once_per_run_and_no_adapter_state_leaks_between_messages(node: Context,
                                                                                        tiny_cfg) -> None:
    from pollinate.models import build_peft_model

    received = adapter_state(build_peft_model(tiny_cfg)[0])  # a fresh global adapter, as round 1 sends it
    before = resident.model_loads()
    first = _ask(node, "evaluate", received)
    trained = _ask(node, "train", received)  # trains the resident model's adapter in place
    again = _ask(node, "evaluate", received)
    assert resident.model_loads() == before + 1  # three messages, one load
    reports = [check_reply(kind, m.content) for kind, m in ((EVALUATE, first), (TRAIN, trained), (EVALUATE, again))]
    assert [r[MODEL_LOADS] for r in reports] == [before + 1] * 3
    # The second evaluation saw what was sent, not what the node trained in between: the adapter was reset.
    assert first.content.metric_records[REPORT]["loss"] == again.content.metric_records[REPORT]["loss"]
    # A new run releases the old run's model and loads again, once.
    node.run_id += 1
    _ask(node, "evaluate", received)
    _ask(node, "evaluate", received)
    assert resident.model_loads() == before + 2


def test_a_crashing_task_is_that_messages_error_reply_and_a_cuda_oom_says_what_to_do() -> None:
    import torch

    from pollinate.client.warm import _failure_reason

    oom = _failure_reason(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert oom.startswith("CUDA out of memory on this node (CUDA out of memory. Tried to allocate 2.00 GiB)")
    assert "train.batch-size" in oom and "--device cpu" in oom
    assert _failure_reason(ValueError("bad rank")) == "<class 'ValueError'>:<'bad rank'>"


def test_a_task_whose_message_never_comes_is_skipped_and_the_worker_goes_on() -> None:
    # Seen in the resume test: the SuperNode kept a task for a message of the run whose coordinator died, and
    # Flower's pull retries its objects for up to 2 h. The one warm worker must not wait that long.
    import threading

    from pollinate.client.warm import TaskInputUnavailable, _pull_bounded

    released = threading.Event()

    class NeverAnswers:  # the Runtime API client: its first call blocks until the worker gives up on it
        def PullTaskInput(self, request: object) -> object:  # noqa: N802 - Flower's RPC name
            released.wait(30)
            raise ConnectionError("closed")

    # Without the bound this would block 30 s and then raise ConnectionError, not the worker's own error.
    with pytest.raises(TaskInputUnavailable, match="could not be pulled from the SuperNode within 0.5 s"):
        _pull_bounded(NeverAnswers(), timeout_s=0.5)  # type: ignore[arg-type]
    released.set()
