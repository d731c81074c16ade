"""Key agreement and share encryption: X25519 + HKDF-SHA256 + AES-GCM (Bonawitz et al. 2017, §4, Fig. 4).

Each client holds two X25519 key pairs per round: c (encrypts the shares it sends to a neighbour) and
s (agrees the pairwise mask seed s_uv with a neighbour). Keys are fresh every round, so a seed or share
key never outlives its round; the round id is still mixed into every derivation so that nothing from
one round can be replayed into another.
"""

from __future__ import annotations

import random

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16


def generate_private_key(rng: random.Random) -> X25519PrivateKey:
    """An X25519 key from 32 bytes of ``rng`` (SystemRandom in production; X25519 clamps the scalar)."""
    return X25519PrivateKey.from_private_bytes(rng.randbytes(KEY_BYTES))


def public_bytes(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)


def _agree(private: X25519PrivateKey, peer_public: bytes, info: bytes) -> bytes:
    try:
        shared = private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    except ValueError as err:  # wrong length, or a low-order point giving an all-zero secret
        raise ValueError(f"unusable X25519 public key: {err}") from err
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(shared)


def pairwise_seed(private: X25519PrivateKey, peer_public: bytes, round_id: int) -> bytes:
    """s_uv = HKDF(X25519(s_sk_u, s_pk_v)): the same 32 bytes at u and at v (Bonawitz et al., Fig. 4, Round 2)."""
    return _agree(private, peer_public, b"pollinate/secagg/pairwise-mask/" + round_id.to_bytes(8, "big"))


def _binding(round_id: int, sender: int, receiver: int) -> bytes:
    return round_id.to_bytes(8, "big") + sender.to_bytes(8, "big") + receiver.to_bytes(8, "big")


def encrypt_for(private: X25519PrivateKey, peer_public: bytes, round_id: int, sender: int, receiver: int,
                plaintext: bytes, rng: random.Random) -> bytes:
    """nonce | AES-GCM(plaintext), keyed per direction, with (round, sender, receiver) as associated data."""
    binding = _binding(round_id, sender, receiver)
    key = _agree(private, peer_public, b"pollinate/secagg/share-encryption/" + binding)
    nonce = rng.randbytes(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, binding)


def decrypt_from(private: X25519PrivateKey, peer_public: bytes, round_id: int, sender: int, receiver: int,
                 ciphertext: bytes) -> bytes | None:
    """The plaintext, or None if AES-GCM authentication fails (tampered, misrouted or replayed)."""
    binding = _binding(round_id, sender, receiver)
    key = _agree(private, peer_public, b"pollinate/secagg/share-encryption/" + binding)
    try:
        return AESGCM(key).decrypt(ciphertext[:NONCE_BYTES], ciphertext[NONCE_BYTES:], binding)
    except InvalidTag:
        return None
