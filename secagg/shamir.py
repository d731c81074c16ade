"""Shamir t-of-n secret sharing over GF(2^521 - 1), for 32-byte SecAgg seeds and X25519 private keys.

Written by hand because no library we keep does it: ``cryptography`` has no secret sharing, and the
PyPI packages that do are unmaintained or share over small fields. The field is the Mersenne prime
p = 2^521 - 1, larger than any 64-byte secret, so a secret is one field element (Shamir 1979).

A share is ``(x, payload)`` with x in 1..n and ``payload = threshold (2 bytes) | secret length (1) | y (66)``:
carrying t and the length lets ``combine`` refuse too few shares and detect a wrong one instead of
returning garbage.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

PRIME = 2**521 - 1
Y_BYTES = (PRIME.bit_length() + 7) // 8  # 66
SHARE_BYTES = 2 + 1 + Y_BYTES
MAX_SECRET_BYTES = 64  # < 2^512 < p: every secret is one field element


def split(secret: bytes, threshold: int, n: int, rng: random.Random) -> list[tuple[int, bytes]]:
    """n shares of ``secret``; any ``threshold`` of them recover it, fewer reveal nothing.

    ``rng`` draws the polynomial's coefficients: pass ``secrets.SystemRandom()`` in production; a seeded
    ``random.Random`` is only for reproducible tests (it is not a cryptographic generator).
    """
    if not 1 <= len(secret) <= MAX_SECRET_BYTES:
        raise ValueError(f"secret must be 1..{MAX_SECRET_BYTES} bytes, got {len(secret)}")
    if not 1 <= threshold <= n:
        raise ValueError(f"threshold must be in 1..n (n={n}), got {threshold}")
    if n >= 2**16:
        raise ValueError(f"at most 65535 shares, got n={n}")
    coefficients = [int.from_bytes(secret, "big")] + [rng.randrange(PRIME) for _ in range(threshold - 1)]
    header = threshold.to_bytes(2, "big") + len(secret).to_bytes(1, "big")
    return [(x, header + _evaluate(coefficients, x).to_bytes(Y_BYTES, "big")) for x in range(1, n + 1)]


def combine(shares: Sequence[tuple[int, bytes]]) -> bytes:
    """The secret from >= threshold distinct shares; ValueError if too few, duplicated, or inconsistent."""
    if not shares:
        raise ValueError("no shares to combine")
    lengths = {len(payload) for _, payload in shares}
    if lengths != {SHARE_BYTES}:
        raise ValueError(f"shares have payload lengths {sorted(lengths)}, expected all {SHARE_BYTES} bytes")
    headers = {payload[:3] for _, payload in shares}
    if len(headers) != 1:
        raise ValueError("shares disagree on threshold or secret length: they come from different splits")
    header = headers.pop()
    threshold, secret_len = int.from_bytes(header[:2], "big"), header[2]
    xs = [x for x, _ in shares]
    if len(set(xs)) != len(xs):
        raise ValueError(f"duplicate share x-coordinates {sorted(x for x in set(xs) if xs.count(x) > 1)}")
    if any(not 1 <= x < PRIME for x in xs):
        raise ValueError(f"share x-coordinates must be in 1..p-1, got {xs}")
    if len(shares) < threshold:
        raise ValueError(f"too few shares: {len(shares)} given, {threshold} needed")
    points = [(x, int.from_bytes(payload[3:], "big")) for x, payload in shares]
    if any(y >= PRIME for _, y in points):
        raise ValueError("a share's y value is not a field element")
    basis = points[:threshold]
    # Extra shares must lie on the same degree t-1 polynomial: a mismatch means a share is wrong.
    for x, y in points[threshold:]:
        if _interpolate(basis, x) != y:
            raise ValueError(f"share x={x} does not lie on the polynomial of the first {threshold}: a share is wrong")
    secret = _interpolate(basis, 0)
    if secret >= 256**secret_len:
        raise ValueError(f"shares interpolate to a value wider than {secret_len} bytes: a share is wrong")
    return secret.to_bytes(secret_len, "big")


def _evaluate(coefficients: list[int], x: int) -> int:
    y = 0
    for c in reversed(coefficients):  # Horner
        y = (y * x + c) % PRIME
    return y


def _interpolate(points: list[tuple[int, int]], at: int) -> int:
    """Lagrange interpolation mod p of the polynomial through ``points``, evaluated at ``at``."""
    total = 0
    for i, (xi, yi) in enumerate(points):
        num, den = 1, 1
        for j, (xj, _) in enumerate(points):
            if i != j:
                num = num * (at - xj) % PRIME
                den = den * (xi - xj) % PRIME
        total = (total + yi * num * pow(den, -1, PRIME)) % PRIME
    return total
