"""A ClientApp for tests: pollinate's real client, but some nodes corrupt their upload on the way out.

partition 0 sends a NaN, partition 1 sends a lora_A of the wrong rank, partition 2 adds a
tensor that is not part of the adapter; every other node is honest.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, Context, Message
from flwr.clientapp import ClientApp

from pollinate.client.app import train_adapter
from tests.support.apps import answer_honestly
from pollinate.proto.adapter_record import ADAPTER, RAW_STYPE

app = ClientApp()
answer_honestly(app)


@app.train()
def train(msg: Message, context: Context) -> Message:
    reply = train_adapter(msg, context)
    record = reply.content.array_records[ADAPTER]
    partition = int(context.node_config["partition-id"])
    name = sorted(k for k in record if "lora_A" in k)[0]
    if partition == 0:
        values = np.frombuffer(record[name].data, dtype="<f4").copy()
        values[0] = np.nan
        record[name] = Array(dtype="float32", shape=record[name].shape, stype=RAW_STYPE, data=values.tobytes())
    elif partition == 1:
        rows, cols = record[name].shape
        wrong = np.zeros((rows * 2, cols), dtype="<f4")
        record[name] = Array(dtype="float32", shape=wrong.shape, stype=RAW_STYPE, data=wrong.tobytes())
    elif partition == 2:
        extra = np.zeros((4, 4), dtype="<f4")
        record["base_model.model.bert.embeddings.word_embeddings.weight"] = Array(
            dtype="float32", shape=extra.shape, stype=RAW_STYPE, data=extra.tobytes())
    return reply
