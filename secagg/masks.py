"""The PRG that expands 32-byte seeds into masks over Z_{2^b}, and the sign rule for pairwise masks.

The PRG is the ChaCha20 keystream (RFC 8439 cipher, via ``cryptography``/OpenSSL) under the seed as key:
encrypting zeros yields the keystream, read as little-endian uint32/uint64 ring elements. Each seed keys
exactly one stream, so a fixed nonce is safe. One call expands the whole vector (~1 GB/s).
"""

from __future__ import annotations

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

_NONCE = bytes(16)  # cryptography's ChaCha20 nonce: 4-byte block counter (starting at 0) | 12-byte nonce


def expand(seed: bytes, length: int, dtype: type[np.unsignedinteger]) -> np.ndarray:
    """PRG(seed): (length,) uniform ring elements of ``dtype`` (uint32 or uint64), read-only."""
    if len(seed) != 32:
        raise ValueError(f"mask seeds are 32 bytes (256-bit ChaCha20 keys), got {len(seed)}")
    encryptor = Cipher(algorithms.ChaCha20(seed, _NONCE), mode=None).encryptor()
    item = np.dtype(dtype).newbyteorder("<")
    return np.frombuffer(encryptor.update(bytes(length * item.itemsize)), dtype=item)


def add_pairwise_mask(vector: np.ndarray, seed: bytes, owner: int, peer: int) -> None:
    """In place: vector += PRG(s_uv) if peer > owner else -= (Bonawitz et al. 2017, §3: masks cancel in the sum)."""
    mask = expand(seed, vector.size, vector.dtype.type)
    (np.add if peer > owner else np.subtract)(vector, mask, out=vector)


def remove_pairwise_mask(vector: np.ndarray, seed: bytes, owner: int, peer: int) -> None:
    """In place: undo ``add_pairwise_mask(vector, seed, owner, peer)`` (server, for a dropped peer)."""
    mask = expand(seed, vector.size, vector.dtype.type)
    (np.subtract if peer > owner else np.add)(vector, mask, out=vector)
