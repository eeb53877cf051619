"""Resume tokens for many stream positions at once, compiled: keyed BLAKE2b (RFC 7693) in numba.

A resume token is URL-safe base64 of ``MAC ‖ id`` where MAC is keyed BLAKE2b with a 16-byte
digest of ``domain ‖ id`` (``RequestTokens``; the id as 8 bytes, big-endian). hashlib computes
one MAC per Python call, ≈0.5–1 µs each with the loop around it, which was a large share of a
replay's cost; here the same MACs (and their base64) come out of one compiled loop that
releases the GIL, ≈0.2–0.4 µs a token. The bytes are exactly hashlib's (a property test
compares them for random keys, domains and ids), so the token format does not change and every
token still resumes anywhere.

The key block is compressed once per call; each token then costs one compression of the block
holding ``domain ‖ id`` (the domain is at most ``MAX_DOMAIN_BYTES``, so it fits one block).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from numba import njit

MAC_BYTES = 16
TOKEN_BYTES = 32  # base64 of the 24 bytes MAC ‖ id: no padding
_BLOCK_BYTES = 128
_ID_BYTES = 8
MAX_DOMAIN_BYTES = _BLOCK_BYTES - _ID_BYTES
MAX_KEY_BYTES = 64

_IV = np.array(
    [
        0x6A09E667F3BCC908, 0xBB67AE8584CAA73B, 0x3C6EF372FE94F82B, 0xA54FF53A5F1D36F1,
        0x510E527FADE682D1, 0x9B05688C2B3E6C1F, 0x1F83D9ABFB41BD6B, 0x5BE0CD19137E2179,
    ],
    dtype=np.uint64,
)  # fmt: skip
# The message schedule: which message word each G step of a round takes (rounds 10 and 11 repeat
# rounds 0 and 1).
_SIGMA = np.array(
    [
        [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15],
        [14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3],
        [11, 8, 12, 0, 5, 2, 15, 13, 10, 14, 3, 6, 7, 1, 9, 4],
        [7, 9, 3, 1, 13, 12, 11, 14, 2, 6, 5, 10, 4, 0, 15, 8],
        [9, 0, 5, 7, 2, 4, 10, 15, 14, 1, 11, 12, 6, 8, 3, 13],
        [2, 12, 6, 10, 0, 11, 8, 3, 4, 13, 7, 5, 15, 14, 1, 9],
        [12, 5, 1, 15, 14, 13, 4, 10, 0, 7, 6, 3, 9, 2, 8, 11],
        [13, 11, 7, 14, 12, 1, 3, 9, 5, 0, 15, 4, 8, 6, 2, 10],
        [6, 15, 14, 9, 11, 3, 0, 8, 12, 2, 13, 7, 1, 4, 10, 5],
        [10, 2, 8, 4, 7, 6, 1, 5, 15, 11, 9, 14, 3, 12, 13, 0],
        [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15],
        [14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3],
    ],
    dtype=np.int64,
)
_BASE64URL = np.frombuffer(
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_", dtype=np.uint8
)

UInt8s = npt.NDArray[np.uint8]
UInt64s = npt.NDArray[np.uint64]
Int64s = npt.NDArray[np.int64]


@njit(inline="always")
def _rotr(x: np.uint64, n: int) -> np.uint64:
    return (x >> np.uint64(n)) | (x << np.uint64(64 - n))


@njit(inline="always")
def _g(
    a: np.uint64, b: np.uint64, c: np.uint64, d: np.uint64, x: np.uint64, y: np.uint64
) -> tuple[np.uint64, np.uint64, np.uint64, np.uint64]:
    a = a + b + x
    d = _rotr(d ^ a, 32)
    c = c + d
    b = _rotr(b ^ c, 24)
    a = a + b + y
    d = _rotr(d ^ a, 16)
    c = c + d
    b = _rotr(b ^ c, 63)
    return a, b, c, d


@njit(cache=True, nogil=True)
def _compress(h: UInt64s, m: UInt64s, counter: int, last: bool) -> None:
    """BLAKE2b's F: ``h`` updated with the 16 message words ``m``, ``counter`` bytes hashed so
    far (this block included; messages here stay far below 2^64 bytes)."""
    v0, v1, v2, v3, v4, v5, v6, v7 = h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7]
    v8, v9, v10, v11 = _IV[0], _IV[1], _IV[2], _IV[3]
    v12 = _IV[4] ^ np.uint64(counter)
    v13 = _IV[5]
    v14 = ~_IV[6] if last else _IV[6]
    v15 = _IV[7]
    for r in range(12):
        s = _SIGMA[r]
        v0, v4, v8, v12 = _g(v0, v4, v8, v12, m[s[0]], m[s[1]])
        v1, v5, v9, v13 = _g(v1, v5, v9, v13, m[s[2]], m[s[3]])
        v2, v6, v10, v14 = _g(v2, v6, v10, v14, m[s[4]], m[s[5]])
        v3, v7, v11, v15 = _g(v3, v7, v11, v15, m[s[6]], m[s[7]])
        v0, v5, v10, v15 = _g(v0, v5, v10, v15, m[s[8]], m[s[9]])
        v1, v6, v11, v12 = _g(v1, v6, v11, v12, m[s[10]], m[s[11]])
        v2, v7, v8, v13 = _g(v2, v7, v8, v13, m[s[12]], m[s[13]])
        v3, v4, v9, v14 = _g(v3, v4, v9, v14, m[s[14]], m[s[15]])
    h[0] ^= v0 ^ v8
    h[1] ^= v1 ^ v9
    h[2] ^= v2 ^ v10
    h[3] ^= v3 ^ v11
    h[4] ^= v4 ^ v12
    h[5] ^= v5 ^ v13
    h[6] ^= v6 ^ v14
    h[7] ^= v7 ^ v15


@njit(cache=True, nogil=True)
def _tokens(key: UInt8s, domain: UInt8s, ids: Int64s, out: UInt8s) -> None:
    """Row i of ``out`` (n × 32): the resume token of ``ids[i]`` as base64 characters."""
    # The parameter block for a keyed hash with a 16-byte digest, then the key's own block.
    keyed = _IV.copy()
    keyed[0] ^= np.uint64(0x01010000) ^ np.uint64(len(key) << 8) ^ np.uint64(MAC_BYTES)
    block = np.zeros(_BLOCK_BYTES, dtype=np.uint8)
    block[: len(key)] = key
    _compress(keyed, block.view(np.uint64), _BLOCK_BYTES, False)
    block[:] = 0
    block[: len(domain)] = domain
    words = block.view(np.uint64)  # little-endian, as BLAKE2b reads them
    length = _BLOCK_BYTES + len(domain) + _ID_BYTES
    at = len(domain)
    h = np.empty(8, dtype=np.uint64)
    raw = np.empty(MAC_BYTES + _ID_BYTES, dtype=np.uint8)
    for row in range(len(ids)):
        position = np.uint64(ids[row])
        for k in range(_ID_BYTES):
            byte = np.uint8((position >> np.uint64(8 * (_ID_BYTES - 1 - k))) & np.uint64(0xFF))
            block[at + k] = byte
            raw[MAC_BYTES + k] = byte
        h[:] = keyed
        _compress(h, words, length, True)
        raw[:MAC_BYTES] = h.view(np.uint8)[:MAC_BYTES]
        token = out[row]
        for group in range(8):  # 3 bytes become 4 characters
            triple = (
                (np.int64(raw[3 * group]) << 16)
                | (np.int64(raw[3 * group + 1]) << 8)
                | np.int64(raw[3 * group + 2])
            )
            token[4 * group] = _BASE64URL[(triple >> 18) & 63]
            token[4 * group + 1] = _BASE64URL[(triple >> 12) & 63]
            token[4 * group + 2] = _BASE64URL[(triple >> 6) & 63]
            token[4 * group + 3] = _BASE64URL[triple & 63]


def resume_tokens(key: bytes, domain: bytes, ids: Int64s) -> UInt8s:
    """The resume token of each id (non-negative) under ``key`` and ``domain``: an n × 32 array
    of base64 characters, row i the token of ``ids[i]``."""
    if not 0 < len(key) <= MAX_KEY_BYTES:
        raise ValueError(f"a BLAKE2b key has 1 to {MAX_KEY_BYTES} bytes")
    if len(domain) > MAX_DOMAIN_BYTES:
        raise ValueError(f"a resume-token domain has at most {MAX_DOMAIN_BYTES} bytes")
    out = np.empty((len(ids), TOKEN_BYTES), dtype=np.uint8)
    _tokens(
        np.frombuffer(key, dtype=np.uint8),
        np.frombuffer(domain, dtype=np.uint8),
        np.array(ids, dtype=np.int64),  # a copy: the kernel is compiled for writable arrays
        out,
    )
    return out
