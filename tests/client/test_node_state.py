"""A strategy's node state survives between messages in Flower's context.state, and only its own records."""

from __future__ import annotations

import numpy as np
from flwr.app import ConfigRecord, RecordDict

from pollinate.client.app import keep_node_state, read_node_state


def test_node_state_round_trips_through_the_context_and_leaves_other_records_alone() -> None:
    state = RecordDict({"secagg-session": ConfigRecord({"stage": 1})})
    b = np.arange(6, dtype=np.float32).reshape(3, 2)
    keep_node_state(state, {"personal-factors": {"m.lora_B.weight": b}, "kept": {"x": np.ones(2, np.float32)}})
    back = read_node_state(state)
    assert back.keys() == {"personal-factors", "kept"} and np.array_equal(back["personal-factors"]["m.lora_B.weight"], b)
    back.pop("kept")  # a strategy drops what it no longer needs (sketch, after its projection)
    keep_node_state(state, back)
    assert read_node_state(state).keys() == {"personal-factors"}
    assert state.config_records["secagg-session"]["stage"] == 1
