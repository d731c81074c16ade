"""A ClientApp for tests: pollinate's real client, but one node vanishes mid-way through secure aggregation.

Partition 0 drops after sending its encrypted shares: its neighbours already added pairwise masks
shared with it, so the server must rebuild its masking key from their shares to strip them. It
raises, which Flower turns into an error reply: to the server, a node that stopped answering.
(With 5 nodes, k = 4 and t = 3, one dropout is what the protocol tolerates; the in-process tests
in tests/server/test_secure_rounds.py drop nodes at every stage.)
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from pollinate.client import secure
from pollinate.client.app import train_adapter
from tests.support.apps import answer_honestly

app = ClientApp()
answer_honestly(app)


def _partition(context: Context) -> int:
    return int(context.node_config["partition-id"])


@app.train()
def train(msg: Message, context: Context) -> Message:
    return train_adapter(msg, context)


@app.train("secagg_share")
def share(msg: Message, context: Context) -> Message:
    return secure.share(msg, context)


@app.train("secagg_mask")
def mask(msg: Message, context: Context) -> Message:
    if _partition(context) == 0:
        raise ConnectionError("partition 0 dropped out after sharing its keys")
    return secure.mask(msg, context)


@app.train("secagg_unmask")
def unmask(msg: Message, context: Context) -> Message:
    return secure.unmask(msg, context)
