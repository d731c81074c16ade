"""FedSA-LoRA: selective aggregation of LoRA factors, with B personal to each node."""

from __future__ import annotations

from pollinate.proto.instructions import Instructions
from pollinate.strategies.base import MeanUpdate, NamedArrays, NodeState, Request, lora_pairs, with_instructions
from pollinate.strategies.fedavg import FedAvg

PERSONAL = "personal-factors"  # node state: this node's own LoRA B, kept across rounds


class FedSaLora(FedAvg):
    """FedSA-LoRA (Guo et al. 2025, "Selective Aggregation for Low-Rank Adaptation in Federated Learning"):
    A learns what clients share and is averaged; B stays on each node as its personal factor.

    Nodes upload everything but B, and evaluate with their own B (a personalised model). The
    exported adapter holds the shared A and heads with the initial B: each node's B never leaves it.
    """

    name = "fedsa-lora"
    summary = "A shared and averaged, B kept personal on each node (never uploaded); personalised evaluation"
    exact = False
    lora_factors = True

    def request(self, state: NamedArrays, rank: int, round_number: int) -> Request:
        request = with_instructions(super().request(state, rank, round_number), personal_factors="B")
        personal = {b for _, b in lora_pairs(state).values()}
        return Request(request.tensors, request.instructions,
                       reply_shapes={k: v.shape for k, v in state.items() if k not in personal})

    def evaluation_request(self, state: NamedArrays) -> Request:
        return with_instructions(super().evaluation_request(state), personal_factors="B")

    def aggregate_mean(self, state: NamedArrays, mean: MeanUpdate, round_number: int) -> NamedArrays:
        out = dict(mean.tensors)
        out.update({b: state[b] for _, b in lora_pairs(state).values()})  # the server never sees a node's B
        return out

    # The node half: B is put back before training and evaluation, and kept out of the upload.

    def prepare_received(self, tensors: NamedArrays, instructions: Instructions, node_state: NodeState) -> NamedArrays:
        if not instructions.personal_factors or PERSONAL not in node_state:
            return tensors  # the first round: the node trains from the B it was sent (PEFT's zero init)
        return {**tensors, **{k: v for k, v in node_state[PERSONAL].items() if k in tensors}}

    def transform_upload(self, trained: NamedArrays, received: NamedArrays, instructions: Instructions,
                         node_state: NodeState) -> tuple[NamedArrays, dict[str, float]]:
        if not instructions.personal_factors:
            return trained, {}
        personal = {b for _, b in lora_pairs(trained).values()}
        node_state[PERSONAL] = {k: trained[k] for k in personal}  # for the next round and for evaluation
        return {k: v for k, v in trained.items() if k not in personal}, {}
