"""The client's part of the ``sketch`` strategy: two uploads computed from the adapter it trained.

Exchange 1 (after training): Y = s B (A Omega) per LoRA module and every other adapter tensor
as trained; the trained factors wait in the node's Flower context for exchange 2, which sends
Q and gets back Z = Q^T (s B A). The server weights both by examples (``exchange.mean``). The math is in ``strategies.sketch_math``.
"""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord, RecordDict

from pollinate.proto.instructions import Instructions
from pollinate.strategies.base import NamedArrays, lora_pairs
from pollinate.strategies.sketch import SKETCH_Q, SKETCH_Y, SKETCH_Z
from pollinate.strategies.sketch_math import project_upload, sketch_matrix, sketch_upload

TRAINED = "sketch-trained-adapter"  # context.state key: this round's trained adapter, for exchange 2


def sketch_y(trained: NamedArrays, instructions: Instructions, scaling: float, state: RecordDict) -> NamedArrays:
    """Exchange 1's upload; keeps ``trained`` in the node state for exchange 2."""
    pairs = lora_pairs(trained)
    factor_keys = {k for pair in pairs.values() for k in pair}
    out = {k: v for k, v in trained.items() if k not in factor_keys}
    for prefix, (a_key, b_key) in pairs.items():
        omega = sketch_matrix(instructions.sketch_seed, trained[a_key].shape[1], instructions.sketch_size)
        out[prefix + SKETCH_Y] = sketch_upload(trained[a_key], trained[b_key], scaling, omega)
    record = ArrayRecord()
    for k, v in trained.items():
        record[k] = Array(np.ascontiguousarray(v, dtype=np.float32))
    state[TRAINED] = record
    return {k: np.asarray(v, dtype=np.float32) for k, v in out.items()}


def sketch_z(received: NamedArrays, instructions: Instructions, scaling: float, state: RecordDict) -> NamedArrays:
    """Exchange 2's upload: Z = Q^T (n s B A) per module, from the factors kept at exchange 1."""
    if TRAINED not in state.array_records:
        raise ValueError(f"round {instructions.round}: asked for the sketch projection before this node sent "
                         f"its sketch (exchange 1); nothing to project")
    trained = {k: v.numpy() for k, v in state.array_records[TRAINED].items()}
    out = {}
    for prefix, (a_key, b_key) in lora_pairs(trained).items():
        q = received[prefix + SKETCH_Q]
        out[prefix + SKETCH_Z] = project_upload(q, trained[a_key], trained[b_key], scaling)
    del state[TRAINED]
    return {k: np.asarray(v, dtype=np.float32) for k, v in out.items()}
