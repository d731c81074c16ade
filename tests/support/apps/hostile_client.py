"""A ClientApp for tests: pollinate's real client, but one node's replies are rewritten by a test's ``Forge``.

``hostile_app(forge)`` answers every message with pollinate's own handlers, then hands the hostile node's
honest reply to ``forge(message_type, honest_reply)``, which returns the content that node sends instead
(edited or replaced). It is built per test and used in an in-process federation (tests/support/inprocess.py).
"""

from __future__ import annotations

from collections.abc import Callable

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

from pollinate.client.app import describe_node, evaluate_adapter, train_adapter
from pollinate.proto.node_config import PARTITION_ID

Forge = Callable[[str, RecordDict], RecordDict]  # (message type, the honest reply's content) -> what is sent
Handler = Callable[[Message, Context], Message]


def hostile_app(forge: Forge, hostile_partition: int = 0) -> ClientApp:
    """pollinate's ClientApp, but the node of ``hostile_partition`` sends ``forge``'s content instead of its own."""
    app = ClientApp()

    def wrap(handler: Handler, message_type: str) -> Handler:
        def answer(msg: Message, context: Context) -> Message:
            reply = handler(msg, context)
            if int(context.node_config[PARTITION_ID]) != hostile_partition or reply.has_error():
                return reply
            return Message(forge(message_type, reply.content), reply_to=msg)
        return answer

    app.query()(wrap(describe_node, "query"))
    app.train()(wrap(train_adapter, "train"))
    app.evaluate()(wrap(evaluate_adapter, "evaluate"))
    return app
