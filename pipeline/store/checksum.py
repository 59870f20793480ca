"""Checksums of the objects a unit writes, recorded in its completion marker.

Why CRC32C: it is already here (``google-crc32c`` is a dependency of zarr 3, for zarr's own
``crc32c`` codec, so no new package), it runs at several GB/s in C, it is the checksum S3
and GCS compute for objects themselves (``x-amz-checksum-crc32c``, GCS ``crc32c``), and its
job is to catch storage faults (a truncated, bit-flipped, replaced or half-synced object),
not tampering: a store whose writer is hostile is out of scope, so a cryptographic hash
(SHA-256, ~4x slower here) buys nothing.

Why record at ``set`` time instead of reading back: :class:`RecordingStore` sees the exact
bytes zarr hands to the storage layer (the encoded shard or chunk), so the marker holds
what was written, without a second read of every shard (seconds per unit on object
storage). A chunk zarr did not write because every value is the fill value
(``write_empty_chunks`` is off, so zarr deletes such a chunk) is recorded as *empty*: its
absence is then expected, not a fault.
"""

from __future__ import annotations

import threading
from typing import Any

import google_crc32c
from zarr.abc.store import Store
from zarr.core.buffer import Buffer
from zarr.storage import WrapperStore

__all__ = ["CHECKSUM", "RecordingStore", "checksum"]

#: Name of the checksum recorded in markers (``"checksum": "crc32c"``) and its hex width.
CHECKSUM = "crc32c"


def checksum(data: bytes | bytearray | memoryview) -> str:
    """CRC32C of ``data`` as 8 hex digits (what markers store for every object)."""
    return f"{google_crc32c.value(bytes(data)):08x}"


class RecordingStore(WrapperStore[Store]):
    """A zarr store that passes everything through and records what was written.

    ``objects`` maps each key set through this store to ``{"size", "crc32c"}`` of the bytes
    as written; ``empty`` holds the keys zarr deleted (chunks that are all fill value). A
    key written and later deleted (or the reverse) keeps only its last state.
    """

    def __init__(self, store: Store) -> None:
        super().__init__(store)
        self._lock = threading.Lock()
        self.objects: dict[str, dict[str, Any]] = {}
        self.empty: set[str] = set()

    def _with_store(self, store: Store) -> RecordingStore:
        # zarr derives stores (read-only views); they must record into the same tables.
        out = RecordingStore(store)
        out._lock, out.objects, out.empty = self._lock, self.objects, self.empty
        return out

    async def set(self, key: str, value: Buffer) -> None:
        await self._store.set(key, value)
        raw = value.as_buffer_like()
        entry = {"size": len(memoryview(raw).cast("B")), CHECKSUM: checksum(raw)}
        with self._lock:
            self.objects[key] = entry
            self.empty.discard(key)

    async def delete(self, key: str) -> None:
        await self._store.delete(key)
        with self._lock:
            self.objects.pop(key, None)
            self.empty.add(key)

    def record(self) -> dict[str, Any]:
        """The marker fields: ``checksum`` (its name), ``objects`` and ``empty`` (sorted)."""
        with self._lock:
            return {
                "checksum": CHECKSUM,
                "objects": {k: dict(self.objects[k]) for k in sorted(self.objects)},
                "empty": sorted(self.empty),
            }
