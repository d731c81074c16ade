"""The server's side of a SecAgg+ round: route keys and shares, sum masked inputs, strip the masks.

    server = ServerSession(RoundConfig(...))
    setups = server.setup()                                  # stage 0: one Setup per client
    server.receive_keys(msg) ...;   server.forward_keys()    # stage 1
    server.receive_shares(msg) ...; server.route_shares()    # stage 2
    server.receive_masked_input(msg) ...; server.unmask_requests()   # stage 3
    server.receive_unmask(msg) ...; total = server.aggregate()       # stage 4

U1..U4 (Bonawitz et al. 2017, Fig. 4) are the clients whose message of stage 1..4 was accepted. A
``receive_*`` that raises ``SecAggError`` leaves the session unchanged: drop that client and go on.
The server learns sum_{u in U3} x_u mod 2^b and nothing else about any x_u (for honest clients).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from pollinate.secagg import keys, masks, shamir
from pollinate.secagg.messages import (EncryptedShares, MaskedInput, NeighbourKeys, PublicKeys, SecAggError, Setup,
                             ShareDelivery, UnmaskRequest, UnmaskShares, unpack_share)
from pollinate.secagg.quantize import Quantization

STAGES = ("setup", "advertise_keys", "share_keys", "mask_input", "unmask", "aggregated")


@dataclass(frozen=True)
class RoundConfig:
    """Everything the server fixes before a round: graph, threshold, vector length, ring."""

    round_id: int
    neighbours: dict[int, list[int]]
    """Client id -> neighbour ids, symmetric (``graph.regular_graph``)."""
    threshold: int
    """t: shares needed to rebuild a secret; k/2 < t <= k for every client's degree k."""
    vector_length: int
    quantization: Quantization = field(default_factory=Quantization)

    def __post_init__(self) -> None:
        for u, vs in self.neighbours.items():
            if u in vs or any(u not in self.neighbours.get(v, ()) for v in vs):
                raise ValueError(f"neighbour graph must be symmetric without self-loops; check client {u}: {vs}")
            if not len(vs) // 2 < self.threshold <= len(vs):
                raise ValueError(f"threshold {self.threshold} must be in {len(vs) // 2 + 1}..{len(vs)} for client "
                                 f"{u} with {len(vs)} neighbours (t > k/2 keeps a lying server from getting both "
                                 "secrets of a client; t <= k lets it be rebuilt at all)")
        if self.vector_length < 1:
            raise ValueError(f"vector_length must be >= 1, got {self.vector_length}")
        self.quantization.check_fits(len(self.neighbours))


class ServerSession:
    """One round's routing tables and running masked sum."""

    def __init__(self, config: RoundConfig) -> None:
        self.config = config
        self._stage = 0
        self._public_keys: dict[int, PublicKeys] = {}  # U1
        self._forwarded: dict[int, set[int]] = {}  # u -> neighbours whose keys u received
        self._ciphertexts: dict[int, dict[int, bytes]] = {}  # U2: sender -> receiver -> ciphertext
        self._masked_senders: set[int] = set()  # U3
        self._total = np.zeros(config.vector_length, dtype=config.quantization.dtype)
        self._requests: dict[int, UnmaskRequest] = {}
        self._unmask_senders: set[int] = set()  # U4
        self._seed_shares: dict[int, dict[int, tuple[int, bytes]]] = {}  # owner -> holder -> share of b_owner
        self._key_shares: dict[int, dict[int, tuple[int, bytes]]] = {}  # owner -> holder -> share of s_sk_owner
        self.undecryptable: list[tuple[int, int]] = []
        """(sender, receiver) of share ciphertexts that failed AES-GCM authentication at the receiver."""

    @property
    def survivors(self) -> list[int]:
        """U3: the clients whose inputs are in the sum (known once stage 3 is closed)."""
        return sorted(self._masked_senders)

    def _advance(self, to: int) -> None:
        if self._stage != to - 1:
            raise SecAggError(f"server cannot close stage {STAGES[to - 1]} while in stage {STAGES[self._stage]}")
        self._stage = to

    def _check_incoming(self, what: str, stage: int, round_id: int, sender: int,
                        eligible: set[int] | dict, seen: set[int] | dict) -> None:
        if self._stage != stage:
            raise SecAggError(f"{what} from client {sender} arrived while the server is in stage "
                              f"{STAGES[self._stage]}, not {STAGES[stage]}; rejected (late or out of order)")
        if round_id != self.config.round_id:
            raise SecAggError(f"{what} from client {sender} is for round {round_id}, this is round "
                              f"{self.config.round_id}; rejected (a replay?)")
        if sender not in eligible:
            raise SecAggError(f"{what} from client {sender}, which is not in this round or missed an earlier stage; "
                              "rejected")
        if sender in seen:
            raise SecAggError(f"second {what} from client {sender}; rejected (duplicate)")

    def setup(self) -> dict[int, Setup]:
        """Stage 0: the parameters for each client."""
        self._advance(1)
        c, q = self.config, self.config.quantization
        return {u: Setup(c.round_id, u, len(c.neighbours), list(vs), c.threshold, c.vector_length,
                         q.modulus_bits, q.clip, q.levels) for u, vs in c.neighbours.items()}

    def receive_keys(self, msg: PublicKeys) -> None:
        self._check_incoming("PublicKeys", 1, msg.round_id, msg.sender, self.config.neighbours, self._public_keys)
        self._public_keys[msg.sender] = msg

    def forward_keys(self) -> dict[int, NeighbourKeys]:
        """Close stage 1: each client gets the public keys of its neighbours in U1."""
        self._advance(2)
        out = {}
        for u in self._public_keys:
            ids = [v for v in self.config.neighbours[u] if v in self._public_keys]
            self._forwarded[u] = set(ids)
            out[u] = NeighbourKeys(self.config.round_id, u, ids,
                                   [self._public_keys[v].encryption_key for v in ids],
                                   [self._public_keys[v].masking_key for v in ids])
        return out

    def receive_shares(self, msg: EncryptedShares) -> None:
        self._check_incoming("EncryptedShares", 2, msg.round_id, msg.sender, self._forwarded, self._ciphertexts)
        if set(msg.receivers) != self._forwarded[msg.sender]:
            # Masks cancel only if u shares with exactly the neighbours that will pair masks with it.
            raise SecAggError(f"EncryptedShares from client {msg.sender} address {sorted(msg.receivers)}, expected "
                              f"exactly its neighbours with keys {sorted(self._forwarded[msg.sender])}; rejected")
        self._ciphertexts[msg.sender] = dict(zip(msg.receivers, msg.ciphertexts))

    def route_shares(self) -> dict[int, ShareDelivery]:
        """Close stage 2: each client in U2 gets the ciphertexts addressed to it by neighbours in U2."""
        self._advance(3)
        out = {}
        for v in self._ciphertexts:
            senders = [u for u in self.config.neighbours[v] if u in self._ciphertexts]
            out[v] = ShareDelivery(self.config.round_id, v, senders, [self._ciphertexts[u][v] for u in senders])
        return out

    def receive_masked_input(self, msg: MaskedInput) -> None:
        self._check_incoming("MaskedInput", 3, msg.round_id, msg.sender, self._ciphertexts, self._masked_senders)
        expected = np.dtype(self.config.quantization.dtype)
        if msg.masked.shape != (self.config.vector_length,) or msg.masked.dtype != expected:
            raise SecAggError(f"MaskedInput from client {msg.sender} is {msg.masked.dtype} {msg.masked.shape}, "
                              f"expected {expected} ({self.config.vector_length},); rejected")
        np.add(self._total, msg.masked, out=self._total)  # wraps mod 2^b: the ring sum
        self._masked_senders.add(msg.sender)

    def unmask_requests(self) -> dict[int, UnmaskRequest]:
        """Close stage 3: ask each client in U3 for b_v of surviving and s_sk_v of dropped neighbours."""
        self._advance(4)
        if not self._masked_senders:
            raise SecAggError("round cannot be unmasked: no client sent a masked input")
        for u in self._masked_senders:
            vs = self.config.neighbours[u]
            self._requests[u] = UnmaskRequest(
                self.config.round_id, u, [v for v in vs if v in self._masked_senders],
                [v for v in vs if v in self._ciphertexts and v not in self._masked_senders])
        return dict(self._requests)

    def receive_unmask(self, msg: UnmaskShares) -> None:
        self._check_incoming("UnmaskShares", 4, msg.round_id, msg.sender, self._requests, self._unmask_senders)
        request = self._requests[msg.sender]
        answered = msg.seed_owners + msg.key_owners + msg.undecryptable
        if sorted(answered) != sorted(request.survivors + request.dropped) \
                or not set(msg.seed_owners) <= set(request.survivors) \
                or not set(msg.key_owners) <= set(request.dropped):
            raise SecAggError(f"UnmaskShares from client {msg.sender} do not answer its request: it must send the "
                              f"self-mask seed share of each survivor {request.survivors} and the masking-key share "
                              f"of each dropped neighbour {request.dropped}, or list it as undecryptable; rejected")
        for owner, wire in zip(msg.seed_owners, msg.seed_shares):
            self._seed_shares.setdefault(owner, {})[msg.sender] = unpack_share(wire)
        for owner, wire in zip(msg.key_owners, msg.key_shares):
            self._key_shares.setdefault(owner, {})[msg.sender] = unpack_share(wire)
        self.undecryptable += [(owner, msg.sender) for owner in msg.undecryptable]
        self._unmask_senders.add(msg.sender)

    def aggregate(self) -> np.ndarray:
        """Close stage 4: sum_{u in U3} x_u mod 2^b, exactly; SecAggError if a needed secret cannot be rebuilt."""
        self._advance(5)
        total, round_id = self._total, self.config.round_id
        for u in sorted(self._masked_senders):
            seed = self._rebuild(u, self._seed_shares, "self-mask seed b_u")
            masks.add_mask(total, seed, -1)
        dropped = set(self._ciphertexts) - self._masked_senders
        for v in sorted(dropped):
            partners = [u for u in self.config.neighbours[v] if u in self._masked_senders]
            if not partners:
                continue  # no survivor paired a mask with v: nothing to remove, and s_sk_v stays secret
            private = X25519PrivateKey.from_private_bytes(self._rebuild(v, self._key_shares, "masking key s_sk"))
            if keys.public_bytes(private) != self._public_keys[v].masking_key:
                raise SecAggError(f"round cannot be unmasked: the shares of client {v}'s masking key rebuild a key "
                                  "that does not match its public key; a neighbour sent a wrong share")
            for u in partners:
                seed = keys.pairwise_seed(private, self._public_keys[u].masking_key, round_id)
                masks.remove_pairwise_mask(total, seed, owner=u, peer=v)
        return total

    def _rebuild(self, owner: int, shares_by_owner: dict[int, dict[int, tuple[int, bytes]]], what: str) -> bytes:
        shares = shares_by_owner.get(owner, {})
        if len(shares) < self.config.threshold:
            vs = self.config.neighbours[owner]
            gone = [v for v in vs if v not in self._requests]
            silent = [v for v in vs if v in self._requests and v not in self._unmask_senders]
            bad = sorted(r for s, r in self.undecryptable if s == owner)
            raise SecAggError(
                f"round cannot be unmasked: only {len(shares)} of the {self.config.threshold} shares needed for "
                f"client {owner}'s {what} arrived (from clients {sorted(shares)}); of its neighbours, {gone} dropped "
                f"before stage 4, {silent} did not answer it, {bad} could not decrypt their share")
        try:
            return shamir.combine(list(shares.values()))
        except ValueError as err:
            raise SecAggError(f"round cannot be unmasked: the shares of client {owner}'s {what} are "
                              f"inconsistent ({err})") from err
