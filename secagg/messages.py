"""What crosses the network in a SecAgg+ round, one dataclass per direction and stage.

Fields are only ints, floats, str, bytes, lists of those and 1-D uint numpy arrays, so each message maps
one-to-one onto a Flower ConfigRecord (+ ArrayRecord for the masked vector). Construction checks the
shape of a message (types, key sizes, parallel lists, duplicate ids) and raises ``SecAggError``; the
sessions check what depends on the round (sender, round id, stage, vector length).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np

from pollinate.secagg.keys import KEY_BYTES, NONCE_BYTES, TAG_BYTES
from pollinate.secagg.quantize import RING_DTYPES, Quantization
from pollinate.secagg.shamir import SHARE_BYTES


class SecAggError(Exception):
    """A SecAgg message was rejected, or the round cannot be completed; the text says which and why."""


WIRE_SHARE_BYTES = 2 + SHARE_BYTES  # x-coordinate (2 bytes) | shamir payload
CIPHERTEXT_BYTES = NONCE_BYTES + 2 * WIRE_SHARE_BYTES + TAG_BYTES  # one pair (b_u, s_sk_u) of shares


def pack_share(share: tuple[int, bytes]) -> bytes:
    return share[0].to_bytes(2, "big") + share[1]


def unpack_share(wire: bytes) -> tuple[int, bytes]:
    return int.from_bytes(wire[:2], "big"), wire[2:]


class _Checked:
    """Structural validation shared by every message: each field's type and sizes, by its annotation."""

    def __post_init__(self) -> None:
        name = type(self).__name__
        for field in fields(self):  # type: ignore[arg-type]
            value, kind = getattr(self, field.name), field.type
            where = f"{name}.{field.name}"
            if kind == "int":
                _check_id(value, where)
            elif kind == "list[int]":
                if not isinstance(value, list):
                    raise SecAggError(f"{where} must be a list of ints, got {type(value).__name__}")
                for item in value:
                    _check_id(item, where)
                if len(set(value)) != len(value):
                    raise SecAggError(f"{where} lists a client twice: {value}")
            elif kind == "list[bytes]":
                if not isinstance(value, list) or not all(isinstance(v, bytes) for v in value):
                    raise SecAggError(f"{where} must be a list of bytes")
            elif kind == "bytes" and not isinstance(value, bytes):
                raise SecAggError(f"{where} must be bytes, got {type(value).__name__}")
            elif kind == "float" and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise SecAggError(f"{where} must be a float, got {type(value).__name__}")


def _check_id(value: object, where: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**64:
        raise SecAggError(f"{where} must be an int in [0, 2^64), got {value!r}")


def _check_parallel(msg: object, *names: str) -> None:
    lengths = {n: len(getattr(msg, n)) for n in names}
    if len(set(lengths.values())) > 1:
        raise SecAggError(f"{type(msg).__name__} has lists of different lengths {lengths}; they must pair up")


def _check_sizes(msg: object, name: str, size: int) -> None:
    for i, item in enumerate(getattr(msg, name)):
        if len(item) != size:
            raise SecAggError(f"{type(msg).__name__}.{name}[{i}] is {len(item)} bytes, expected {size}")


@dataclass(frozen=True)
class Setup(_Checked):
    """Stage 0, server -> client: the round's parameters and this client's neighbours."""

    round_id: int
    client_id: int
    n_clients: int
    neighbours: list[int]
    threshold: int
    vector_length: int
    modulus_bits: int
    clip: float
    levels: int

    @property
    def quantization(self) -> Quantization:
        return Quantization(clip=float(self.clip), levels=self.levels, modulus_bits=self.modulus_bits)


@dataclass(frozen=True)
class PublicKeys(_Checked):
    """Stage 1, client -> server: c_pk (share encryption) and s_pk (pairwise masks), raw X25519."""

    round_id: int
    sender: int
    encryption_key: bytes
    masking_key: bytes

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("encryption_key", "masking_key"):
            if len(getattr(self, name)) != KEY_BYTES:
                raise SecAggError(f"PublicKeys.{name} from client {self.sender} is "
                                  f"{len(getattr(self, name))} bytes, expected {KEY_BYTES} (raw X25519)")


@dataclass(frozen=True)
class NeighbourKeys(_Checked):
    """Stage 1, server -> client: the public keys of the neighbours that advertised theirs."""

    round_id: int
    receiver: int
    ids: list[int]
    encryption_keys: list[bytes]
    masking_keys: list[bytes]

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_parallel(self, "ids", "encryption_keys", "masking_keys")
        _check_sizes(self, "encryption_keys", KEY_BYTES)
        _check_sizes(self, "masking_keys", KEY_BYTES)


@dataclass(frozen=True)
class EncryptedShares(_Checked):
    """Stage 2, client -> server: for each neighbour, AES-GCM(share of b_u | share of s_sk_u)."""

    round_id: int
    sender: int
    receivers: list[int]
    ciphertexts: list[bytes]

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_parallel(self, "receivers", "ciphertexts")
        _check_sizes(self, "ciphertexts", CIPHERTEXT_BYTES)


@dataclass(frozen=True)
class ShareDelivery(_Checked):
    """Stage 2 -> 3, server -> client: the ciphertexts its neighbours addressed to it."""

    round_id: int
    receiver: int
    senders: list[int]
    ciphertexts: list[bytes]

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_parallel(self, "senders", "ciphertexts")
        _check_sizes(self, "ciphertexts", CIPHERTEXT_BYTES)


@dataclass(frozen=True)
class MaskedInput(_Checked):
    """Stage 3, client -> server: y_u = x_u + PRG(b_u) + sum of signed PRG(s_uv), mod 2^b."""

    round_id: int
    sender: int
    masked: np.ndarray

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.masked, np.ndarray) or self.masked.ndim != 1 or \
                self.masked.dtype.type not in RING_DTYPES.values():
            raise SecAggError(f"MaskedInput from client {self.sender} must be a 1-D uint32/uint64 array, got "
                              f"{getattr(self.masked, 'dtype', type(self.masked).__name__)} "
                              f"{getattr(self.masked, 'shape', '')}")


@dataclass(frozen=True)
class UnmaskRequest(_Checked):
    """Stage 4, server -> client: which neighbours survived (reveal b_v) and which dropped (reveal s_sk_v)."""

    round_id: int
    receiver: int
    survivors: list[int]
    dropped: list[int]


@dataclass(frozen=True)
class UnmaskShares(_Checked):
    """Stage 4, client -> server: shares of b_v for survivors, of s_sk_v for the dropped, never both.

    ``undecryptable`` lists requested peers whose stage-2 ciphertext failed AES-GCM authentication.
    """

    round_id: int
    sender: int
    seed_owners: list[int]
    seed_shares: list[bytes]
    key_owners: list[int]
    key_shares: list[bytes]
    undecryptable: list[int]

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_parallel(self, "seed_owners", "seed_shares")
        _check_parallel(self, "key_owners", "key_shares")
        _check_sizes(self, "seed_shares", WIRE_SHARE_BYTES)
        _check_sizes(self, "key_shares", WIRE_SHARE_BYTES)
        both = set(self.seed_owners) & set(self.key_owners)
        if both:
            raise SecAggError(f"client {self.sender} revealed both secrets of client(s) {sorted(both)}; "
                              "a client must reveal only one per peer")
