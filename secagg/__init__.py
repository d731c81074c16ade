"""Secure aggregation (SecAgg+: Bonawitz et al. 2017; Bell et al. 2020) as pure state machines.

The server learns only the sum of the surviving clients' quantised inputs. No Flower or torch here:
the wiring puts these messages into Flower records, four exchanges per round.
"""

from pollinate.secagg.client import ClientSession  # one client's side of a round
from pollinate.secagg.graph import minimum_threshold, regular_graph, suggested_degree  # who pairs with whom
from pollinate.secagg.loopback import RoundResult, StageTimes, run_round  # a whole round in one process
from pollinate.secagg.messages import (EncryptedShares, MaskedInput, NeighbourKeys, PublicKeys, SecAggError, Setup,
                             ShareDelivery, UnmaskRequest, UnmaskShares)  # the wire schema, stage by stage
from pollinate.secagg.quantize import Quantization, dequantize_sum, quantize  # floats <-> ring Z_{2^b}
from pollinate.secagg.server import RoundConfig, ServerSession  # the server's side of a round

__all__ = [
    "ClientSession", "EncryptedShares", "MaskedInput", "NeighbourKeys", "PublicKeys", "Quantization",
    "RoundConfig", "RoundResult", "SecAggError", "ServerSession", "Setup", "ShareDelivery", "StageTimes",
    "UnmaskRequest", "UnmaskShares", "dequantize_sum", "minimum_threshold", "quantize", "regular_graph",
    "run_round", "suggested_degree",
]
