"""One client's side of a SecAgg+ round (Bonawitz et al. 2017, Fig. 4; Bell et al. 2020), as a state machine.

    session = ClientSession(setup)                        # stage 0: the server's Setup
    keys = session.advertise_keys()                        # stage 1
    shares = session.share_keys(neighbour_keys)            # stage 2
    masked = session.mask_input(delivery, quantised)       # stage 3
    reply = session.unmask(request)                        # stage 4

Each method runs once, in order; a method that raised leaves the session finished (the client drops
out). Everything random comes from ``rng`` (``secrets.SystemRandom()`` by default); a seeded
``random.Random`` makes a session reproducible for tests but is not secure.
"""

from __future__ import annotations

import random
import secrets
from collections.abc import Mapping

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from pollinate.secagg import keys, masks, shamir
from pollinate.secagg.messages import (EncryptedShares, MaskedInput, NeighbourKeys, PublicKeys, SecAggError, Setup,
                             ShareDelivery, UnmaskRequest, UnmaskShares, pack_share)

STAGES = ("setup", "advertise_keys", "share_keys", "mask_input", "unmask")


class ClientSession:
    """A client's secrets and view of one round; answers each server message in turn."""

    def __init__(self, setup: Setup, rng: random.Random | None = None) -> None:
        if setup.client_id in setup.neighbours:
            raise SecAggError(f"setup for client {setup.client_id} lists the client as its own neighbour")
        k = len(setup.neighbours)
        if not k // 2 < setup.threshold <= k:
            # The client guards itself: with t <= k/2 a lying server could collect both of its secrets.
            raise SecAggError(f"setup threshold {setup.threshold} for client {setup.client_id} must be in "
                              f"{k // 2 + 1}..{k} (more than half of its {k} neighbours); rejected")
        self.setup = setup
        self._quantization = setup.quantization  # raises ValueError on a bad ring/quantisation config
        self.id = setup.client_id
        self._rng = rng or secrets.SystemRandom()
        self._stage = 0
        self._encryption_key = keys.generate_private_key(self._rng)  # c_sk_u
        self._masking_key = keys.generate_private_key(self._rng)  # s_sk_u
        self._self_seed = self._rng.randbytes(32)  # b_u
        self._peer_keys: dict[int, tuple[bytes, bytes]] = {}  # v -> (c_pk_v, s_pk_v)
        self._held: dict[int, tuple[bytes, bytes]] = {}  # v -> (wire share of b_v, of s_sk_v)
        self._delivered: set[int] = set()  # neighbours we paired masks with (they reached stage 2)
        self.undecryptable: list[int] = []
        """Neighbours whose share ciphertext failed AES-GCM authentication (tampered or misrouted)."""

    def snapshot(self) -> dict[str, int | bytes | list[int] | list[bytes]]:
        """Everything this session holds, as plain values: for the node's own storage between stages.

        A ClientApp may run each stage in a fresh process, so the session is kept in the node's Flower
        context between messages. It holds private keys: it must never be sent anywhere.
        """
        setup = {f"setup.{k}": v for k, v in vars(self.setup).items()}
        peers = sorted(self._peer_keys)
        held = sorted(self._held)
        return {**setup, "stage": self._stage,
                "encryption-key": self._encryption_key.private_bytes_raw(),
                "masking-key": self._masking_key.private_bytes_raw(), "self-seed": self._self_seed,
                "peer-ids": peers, "peer-encryption-keys": [self._peer_keys[v][0] for v in peers],
                "peer-masking-keys": [self._peer_keys[v][1] for v in peers],
                "held-ids": held, "held-seed-shares": [self._held[v][0] for v in held],
                "held-key-shares": [self._held[v][1] for v in held],
                "delivered": sorted(self._delivered), "undecryptable": list(self.undecryptable)}

    @classmethod
    def restore(cls, snapshot: Mapping[str, object], rng: random.Random | None = None) -> ClientSession:
        """The session ``snapshot()`` captured, ready for its next stage."""
        setup = Setup(**{k.removeprefix("setup."): v for k, v in snapshot.items()  # type: ignore[arg-type]
                         if k.startswith("setup.")})
        session = cls.__new__(cls)
        session.setup, session.id, session._quantization = setup, setup.client_id, setup.quantization
        session._rng = rng or secrets.SystemRandom()
        session._stage = int(snapshot["stage"])  # type: ignore[arg-type]
        session._encryption_key = X25519PrivateKey.from_private_bytes(snapshot["encryption-key"])  # type: ignore
        session._masking_key = X25519PrivateKey.from_private_bytes(snapshot["masking-key"])  # type: ignore
        session._self_seed = bytes(snapshot["self-seed"])  # type: ignore[arg-type]
        session._peer_keys = dict(zip(snapshot["peer-ids"], zip(snapshot["peer-encryption-keys"],  # type: ignore
                                                                 snapshot["peer-masking-keys"])))  # type: ignore
        session._held = dict(zip(snapshot["held-ids"], zip(snapshot["held-seed-shares"],  # type: ignore
                                                           snapshot["held-key-shares"])))  # type: ignore
        session._delivered = set(snapshot["delivered"])  # type: ignore[arg-type]
        session.undecryptable = list(snapshot["undecryptable"])  # type: ignore[arg-type]
        return session

    def _enter(self, stage: int) -> None:
        if self._stage != stage - 1:
            raise SecAggError(f"client {self.id} was asked for {STAGES[stage]} after {STAGES[self._stage]}; "
                              "each stage runs once, in order")
        self._stage = stage

    def _check_addressed(self, round_id: int, receiver: int, what: str) -> None:
        if round_id != self.setup.round_id:
            raise SecAggError(f"{what} for round {round_id} reached client {self.id} in round "
                              f"{self.setup.round_id} (a replay?); rejected")
        if receiver != self.id:
            raise SecAggError(f"{what} addressed to client {receiver} reached client {self.id}; rejected")

    def advertise_keys(self) -> PublicKeys:
        """Stage 1: the two public keys (c_pk_u, s_pk_u)."""
        self._enter(1)
        return PublicKeys(self.setup.round_id, self.id, keys.public_bytes(self._encryption_key),
                          keys.public_bytes(self._masking_key))

    def share_keys(self, received: NeighbourKeys) -> EncryptedShares:
        """Stage 2: t-of-k shares of b_u and s_sk_u, one encrypted pair per neighbour that has keys."""
        self._enter(2)
        self._check_addressed(received.round_id, received.receiver, "NeighbourKeys")
        strangers = set(received.ids) - set(self.setup.neighbours)
        if strangers:
            raise SecAggError(f"NeighbourKeys for client {self.id} include non-neighbours {sorted(strangers)}")
        all_keys = received.encryption_keys + received.masking_keys
        own = {keys.public_bytes(self._encryption_key), keys.public_bytes(self._masking_key)}
        if len(set(all_keys)) != len(all_keys) or own & set(all_keys):
            # Bonawitz et al., Fig. 4 Round 1: distinct keys, or a server could substitute one for another.
            raise SecAggError(f"NeighbourKeys for client {self.id} repeat a public key; rejected")
        if len(received.ids) < self.setup.threshold:
            raise SecAggError(f"client {self.id} has keys from only {len(received.ids)} neighbours, fewer than the "
                              f"threshold {self.setup.threshold}: too many neighbours dropped to share secrets")
        self._peer_keys = dict(zip(received.ids, zip(received.encryption_keys, received.masking_keys)))
        t, n = self.setup.threshold, len(received.ids)
        seed_shares = shamir.split(self._self_seed, t, n, self._rng)
        key_shares = shamir.split(self._masking_key.private_bytes_raw(), t, n, self._rng)
        ciphertexts = []
        for v, seed_share, key_share in zip(received.ids, seed_shares, key_shares):
            plaintext = pack_share(seed_share) + pack_share(key_share)
            try:
                ciphertexts.append(keys.encrypt_for(self._encryption_key, self._peer_keys[v][0], self.setup.round_id,
                                                    self.id, v, plaintext, self._rng))
            except ValueError as err:
                raise SecAggError(f"client {self.id} cannot encrypt to neighbour {v}: {err}") from err
        return EncryptedShares(self.setup.round_id, self.id, list(received.ids), ciphertexts)

    def mask_input(self, delivery: ShareDelivery, quantised: np.ndarray) -> MaskedInput:
        """Stage 3: keep the shares addressed to us, then y_u = x_u + PRG(b_u) +- PRG(s_uv) per neighbour."""
        self._enter(3)
        self._check_addressed(delivery.round_id, delivery.receiver, "ShareDelivery")
        unknown = set(delivery.senders) - set(self._peer_keys)
        if unknown:
            raise SecAggError(f"ShareDelivery for client {self.id} has shares from {sorted(unknown)}, "
                              "which are not neighbours that advertised keys; rejected")
        q = self._quantization
        if quantised.shape != (self.setup.vector_length,) or quantised.dtype != q.dtype:
            raise SecAggError(f"client {self.id}'s input is {quantised.dtype} {quantised.shape}, expected "
                              f"{np.dtype(q.dtype)} ({self.setup.vector_length},): quantise it with the setup's "
                              "Quantization first")
        if quantised.size and int(quantised.max()) >= q.levels:
            raise SecAggError(f"client {self.id}'s input has a value >= levels ({q.levels}); the sum could wrap")
        for v, ciphertext in zip(delivery.senders, delivery.ciphertexts):
            plaintext = keys.decrypt_from(self._encryption_key, self._peer_keys[v][0], self.setup.round_id,
                                          v, self.id, ciphertext)
            if plaintext is None:
                self.undecryptable.append(v)  # reported to the server in stage 4; the share counts as missing
            else:
                half = len(plaintext) // 2
                self._held[v] = (plaintext[:half], plaintext[half:])
        masked = quantised.copy()
        masks.add_mask(masked, self._self_seed)
        # Pair only with neighbours that reached stage 2: exactly those the server delivered shares from.
        for v in delivery.senders:
            seed = keys.pairwise_seed(self._masking_key, self._peer_keys[v][1], self.setup.round_id)
            masks.add_pairwise_mask(masked, seed, self.id, v)
        self._delivered = set(delivery.senders)
        return MaskedInput(self.setup.round_id, self.id, masked)

    def unmask(self, request: UnmaskRequest) -> UnmaskShares:
        """Stage 4: the share of b_v for each surviving neighbour, of s_sk_v for each dropped one, never both."""
        self._enter(4)
        self._check_addressed(request.round_id, request.receiver, "UnmaskRequest")
        both = set(request.survivors) & set(request.dropped)
        if both:
            raise SecAggError(f"UnmaskRequest asks client {self.id} for both secrets of {sorted(both)}; refused: "
                              "revealing both would unmask that client's input")
        strangers = (set(request.survivors) | set(request.dropped)) - self._delivered
        if strangers:
            raise SecAggError(f"UnmaskRequest asks client {self.id} about {sorted(strangers)}, "
                              "which sent it no shares in stage 2; rejected")
        undecryptable = [v for v in request.survivors + request.dropped if v in self.undecryptable]
        survivors = [v for v in request.survivors if v in self._held]
        dropped = [v for v in request.dropped if v in self._held]
        return UnmaskShares(self.setup.round_id, self.id,
                            survivors, [self._held[v][0] for v in survivors],
                            dropped, [self._held[v][1] for v in dropped], undecryptable)
