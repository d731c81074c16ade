"""The real ServerApp loop against the real ClientApp in one process, without Ray: a whole run in seconds.

``pollinate simulate`` pays about 20 s per run before round 1 (Ray, and every actor importing torch). The tests and
the robustness bench (bench/robustness.py) run hundreds of short federations, so here the coordinator's
``run_federation`` drives a ``ClientApp`` through a Grid that calls it directly: each message and reply still goes
through Flower's protobuf serde, as on the wire; each node keeps its own ``Context`` (node config, state) across
messages, as a SuperNode does; a ClientApp exception becomes Flower's error reply.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterable, Iterator, Mapping
from uuid import uuid4

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.supercore.task_identity import TaskIdentity

from pollinate.client.app import app as pollinate_client
from pollinate.proto.node_config import PARTITION_ID
from pollinate.proto.run_config import RunConfig


NodeConfigOf = Callable[[int], Mapping[str, "int | float | str"]]  # partition id -> extra node config


def _wire(message: Message) -> Message:
    """The message as the other side receives it: through Flower's protobuf serialisation."""
    return message_from_proto(message_to_proto(message))


class InProcessGrid:
    """A Flower Grid (the part the coordinator uses) whose nodes answer in this process, in turn, when pushed to."""

    def __init__(self, contexts: dict[int, Context], app: ClientApp | None = pollinate_client) -> None:
        self.contexts, self.app = contexts, app
        self._replies: list[Message] = []  # not pulled yet

    @classmethod
    def of_scenario(cls, cfg: RunConfig, clients: int, app: ClientApp = pollinate_client,
                    seed: int = 0, node_config: NodeConfigOf | None = None) -> InProcessGrid:
        """``clients`` nodes as the Simulation Engine makes them: a partition id each, the run config.

        ``node_config``: more node config for the node of each partition id (what `pollinate client` flags set).
        """
        node_ids = random.Random(seed).sample(range(1, 2**62), clients)  # Flower ids are large, unordered
        return cls({node: Context(run_id=1, node_id=node,
                                  node_config={PARTITION_ID: i, **(node_config(i) if node_config else {})},
                                  state=RecordDict(), run_config=cfg.to_flat())
                    for i, node in enumerate(node_ids)}, app)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def deliver(self, msg: Message) -> list[Message]:
        """The node's replies to ``msg``: its ClientApp's, through Flower's serde both ways."""
        assert self.app is not None
        received = _wire(msg)
        try:
            reply = self.app(received, self.contexts[msg.metadata.dst_node_id])
        except Exception as e:  # what Flower's ClientApp runner sends back
            reply = Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, f"{type(e).__name__}: {e}"),
                            reply_to=received)
        return [_wire(reply)]

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for msg in messages:
            # A pushed message gets its id from the grid. Metadata has no public setter for it: this is the line
            # Flower's own grids run on push (flwr/superlink/grid/inmemory_grid.py, grpc_grid.py).
            msg.metadata.__dict__["_message_id"] = str(uuid4())
            ids.append(msg.metadata.message_id)
            self._replies += self.deliver(msg)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        wanted = set(message_ids)
        pulled = [r for r in self._replies if r.metadata.reply_to_message_id in wanted]
        self._replies = [r for r in self._replies if r.metadata.reply_to_message_id not in wanted]
        return pulled


@contextlib.contextmanager
def serverapp_identity() -> Iterator[None]:
    """What Flower sets in a ServerApp process before messages can be created (run 1, the SuperLink's node)."""
    saved = tuple(_identity(name) for name in ("task_id", "run_id", "node_id"))
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID
    try:
        yield
    finally:
        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = saved  # type: ignore[assignment]


def _identity(name: str) -> int | None:
    """One field of this process's Flower task identity, or None when unset (its public getter raises then)."""
    try:
        return getattr(TaskIdentity, name)
    except RuntimeError:
        return None
