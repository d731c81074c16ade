"""A ClientApp for tests: pollinate's real client, but partition 0 is hostile (issue #13's attack).

It uploads lora_B = 5.0 in every module and declares a million training examples, at the query exchange and in
its training report alike, so no declaration check rejects it: under example weights it is the global model
unless the aggregation rule itself resists. Every other node is honest.
"""

from __future__ import annotations

import numpy as np
from flwr.app import RecordDict

from pollinate.proto.adapter_record import ADAPTER, REPORT
from tests.support.apps.hostile_client import array_of, hostile_app

HOSTILE_B, HOSTILE_EXAMPLES = 5.0, 1_000_000


def _forge(message_type: str, content: RecordDict) -> RecordDict:
    if message_type in ("query", "train"):
        content.metric_records[REPORT]["num-examples"] = HOSTILE_EXAMPLES
    if message_type == "train":
        record = content.array_records[ADAPTER]
        for name in [k for k in record if ".lora_B." in k]:
            record[name] = array_of(np.full(record[name].shape, HOSTILE_B))
    return content


app = hostile_app(_forge)
