"""A ClientApp for tests: pollinate's real client, but partition 0 is hostile (issue #13's attack).

It uploads lora_B = 5.0 in every module and reports a million training examples, which makes it the global
model under any example-weighted mean; every other node is honest.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, Context, Message
from flwr.clientapp import ClientApp

from pollinate.client.app import train_adapter
from pollinate.proto.adapter_record import ADAPTER, RAW_STYPE, REPORT
from tests.support.apps import answer_honestly

HOSTILE_B, HOSTILE_EXAMPLES = 5.0, 1_000_000

app = ClientApp()
answer_honestly(app)


@app.train()
def train(msg: Message, context: Context) -> Message:
    reply = train_adapter(msg, context)
    if int(context.node_config["partition-id"]) != 0 or reply.has_error():
        return reply
    record = reply.content.array_records[ADAPTER]
    for name in [k for k in record if ".lora_B." in k]:
        values = np.full(record[name].shape, HOSTILE_B, dtype="<f4")
        record[name] = Array(dtype="float32", shape=values.shape, stype=RAW_STYPE, data=values.tobytes())
    reply.content.metric_records[REPORT]["num-examples"] = HOSTILE_EXAMPLES
    return reply
