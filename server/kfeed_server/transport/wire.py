"""The pieces of the protobuf wire format that StreamSnapshots responses are joined from.

A length-delimited field is its tag, the varint length and the payload; a message is its fields
one after another. Tags are (field number << 3 | wire type): 2 length-delimited, 0 varint.
"""

from __future__ import annotations

TAG_RESUME_TOKEN = b"\x0a"  # StreamSnapshotsResponse.resume_token = 1
TAG_SNAPSHOT = b"\x12"  # StreamSnapshotsResponse.snapshot = 2
TAG_SNAPSHOT_BATCH = b"\x3a"  # StreamSnapshotsResponse.snapshot_batch = 7
TAG_UPDATES = b"\x0a"  # SnapshotBatch.updates = 1
TAG_UPDATE_SNAPSHOT = b"\x0a"  # SnapshotUpdate.snapshot = 1
TAG_COALESCED_COUNT = b"\x10"  # SnapshotUpdate.coalesced_count = 2 (varint)
TAG_UPDATE_TOKEN = b"\x1a"  # SnapshotUpdate.resume_token = 3


def varint(value: int) -> bytes:
    """``value`` (≥ 0) as a protobuf varint."""
    if value < 0x80:
        return bytes((value,))
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def length_delimited(tag: bytes, payload: bytes) -> bytes:
    return tag + varint(len(payload)) + payload
