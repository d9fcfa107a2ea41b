"""Seeds, permutations and counter-based uniforms: stable across Python, NumPy and PyTorch versions.

Everything random in the data pipeline -- the order ``build_shards`` writes samples in, the order
a loader slot reads them in, every augmentation draw -- comes from these functions, so a data
stream is a pure function of its seeds on any machine. NumPy only: shard building imports this
without PyTorch.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

__all__ = ["counter_uniforms", "derive_seed", "permutation"]

_MASK64 = (1 << 64) - 1
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)  # splitmix64's increment


def derive_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from integers (blake2b), independent of ``PYTHONHASHSEED``.

    Args:
        *parts: integers (negative values allowed).

    Returns:
        An integer in [0, 2**63).
    """
    data = b"".join(int(p).to_bytes(8, "little", signed=True) for p in parts)
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") & ((1 << 63) - 1)


def _mix64(z: np.ndarray) -> np.ndarray:
    # splitmix64's output function (Steele, Lea & Flood 2014), on uint64 arrays (wrapping arithmetic).
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _splitmix64_sequence(seed: int, n: int) -> np.ndarray:
    """The first ``n`` outputs of splitmix64 seeded with ``seed``: ``mix(seed + k * gamma)``, k = 1..n."""
    return _mix64(np.uint64(seed & _MASK64) + np.arange(1, n + 1, dtype=np.uint64) * _GOLDEN)


def permutation(n: int, seed: int) -> list[int]:
    """A random permutation of ``range(n)`` (Fisher-Yates driven by splitmix64).

    About 0.7 us per element (1.1 s for ImageNet's 1.28 M samples).

    Args:
        n: length.
        seed: 64-bit seed.

    Returns:
        The permutation as a list.
    """
    perm = list(range(n))
    draws = _splitmix64_sequence(seed, max(n - 1, 0)).tolist()
    for r, i in zip(draws, range(n - 1, 0, -1)):
        j = (r * (i + 1)) >> 64  # multiply-shift: uniform enough for i << 2**64
        perm[i], perm[j] = perm[j], perm[i]
    return perm


def counter_uniforms(seed: int, counters: Sequence[int], n: int) -> np.ndarray:
    """``n`` uniforms in [0, 1) for each counter: a pure function of ``(seed, counter, column)``.

    Counter-based, so a batch's draws come from a few array operations instead of one generator
    per sample. Each counter gets the splitmix64 sequence ``x_k = mix(s + k * gamma)`` started at
    ``s = mix(seed ^ mix(counter))``; the top 53 bits of ``x_k`` make the double.

    Args:
        seed: 64-bit seed (e.g. from :func:`derive_seed`).
        counters: non-negative integers (sample positions).
        n: uniforms per counter.

    Returns:
        float64 array [len(counters), n].
    """
    c = np.asarray(counters, dtype=np.uint64)[:, None]
    start = _mix64(np.uint64(seed & _MASK64) ^ _mix64(c + _GOLDEN))
    x = _mix64(start + np.arange(1, n + 1, dtype=np.uint64)[None, :] * _GOLDEN)
    return (x >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))
