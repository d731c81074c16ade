"""The PRG that expands 32-byte seeds into masks over Z_{2^b}, and the sign rule for pairwise masks.

The PRG is the ChaCha20 keystream (RFC 8439 cipher, via ``cryptography``/OpenSSL) under the seed as key:
encrypting zeros yields the keystream, read as little-endian uint32/uint64 ring elements. Each seed keys
exactly one stream, so a fixed nonce is safe.

Masks are added in place through one reused keystream buffer per thread (``update_into``) over one shared
buffer of zeros: a fresh multi-megabyte allocation per mask costs page faults that, on a loaded machine,
took 10x longer than the cipher itself (bench/secagg.py, docs/secagg-bench.md).
"""

from __future__ import annotations

import threading

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

_NONCE = bytes(16)  # cryptography's ChaCha20 nonce: 4-byte block counter (starting at 0) | 12-byte nonce
_SLACK = 63  # update_into wants len(data) + block_size - 1 bytes of room
_zeros = b""  # grows to the largest mask so far; immutable, so threads may share it
_scratch = threading.local()  # .buffer: this thread's keystream bytearray


def _keystream(seed: bytes, nbytes: int) -> memoryview:
    """PRG(seed)'s first ``nbytes`` in this thread's scratch buffer: valid until the thread's next call."""
    global _zeros
    if len(seed) != 32:
        raise ValueError(f"mask seeds are 32 bytes (256-bit ChaCha20 keys), got {len(seed)}")
    if len(_zeros) < nbytes:
        _zeros = bytes(nbytes)
    buffer = getattr(_scratch, "buffer", None)
    if buffer is None or len(buffer) < nbytes + _SLACK:
        buffer = _scratch.buffer = bytearray(nbytes + _SLACK)
    encryptor = Cipher(algorithms.ChaCha20(seed, _NONCE), mode=None).encryptor()
    written = encryptor.update_into(memoryview(_zeros)[:nbytes], buffer)
    return memoryview(buffer)[:written]


def _ring(dtype: type[np.unsignedinteger]) -> np.dtype:
    return np.dtype(dtype).newbyteorder("<")


def expand(seed: bytes, length: int, dtype: type[np.unsignedinteger]) -> np.ndarray:
    """PRG(seed): (length,) uniform ring elements of ``dtype`` (uint32 or uint64), a new array."""
    item = _ring(dtype)
    return np.frombuffer(_keystream(seed, length * item.itemsize), dtype=item).copy()


def add_mask(vector: np.ndarray, seed: bytes, sign: int = 1) -> None:
    """In place: vector += PRG(seed) (sign = -1: -=), mod 2^b."""
    item = _ring(vector.dtype.type)
    mask = np.frombuffer(_keystream(seed, vector.size * item.itemsize), dtype=item)
    (np.add if sign > 0 else np.subtract)(vector, mask, out=vector)


def add_pairwise_mask(vector: np.ndarray, seed: bytes, owner: int, peer: int) -> None:
    """In place: vector += PRG(s_uv) if peer > owner else -= (Bonawitz et al. 2017, §3: masks cancel in the sum)."""
    add_mask(vector, seed, 1 if peer > owner else -1)


def remove_pairwise_mask(vector: np.ndarray, seed: bytes, owner: int, peer: int) -> None:
    """In place: undo ``add_pairwise_mask(vector, seed, owner, peer)`` (server, for a dropped peer)."""
    add_mask(vector, seed, -1 if peer > owner else 1)
