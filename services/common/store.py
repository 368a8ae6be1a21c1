"""What a service keeps for references: content-addressed, bounded by bytes, least recently used
out first. A key names its content (a sha256), so a key found always gives the right value, and
a key evicted is said in words (NotHeld), never answered with something else."""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

from cachetools import LRUCache

from services.common import images
from services.common.errors import InvalidArgument, NotHeld

V = TypeVar("V")


def content_key(*parts: object) -> str:
    """The sha256 of `parts` written as JSON: the same parts, the same key, on any machine."""
    text = json.dumps(parts, separators=(",", ":"), sort_keys=True, ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


class Store(Generic[V]):
    """Values by key within a byte budget; a value larger than the whole budget is not kept."""

    def __init__(self, budget_bytes: int, size_of: Callable[[V], int]) -> None:
        # (value, its size): measured once, at put (a message's ByteSize walks all of it)
        self._values: LRUCache[str, tuple[V, int]] = LRUCache(
            maxsize=budget_bytes, getsizeof=lambda held: held[1]
        )
        self._size_of = size_of
        self._lock = threading.Lock()

    def put(self, key: str, value: V) -> bool:
        """Keep `value`; False when it is too large for the budget (and so not kept)."""
        size = self._size_of(value)
        if size > self._values.maxsize:
            return False
        with self._lock:
            self._values[key] = (value, size)
        return True

    def get(self, key: str) -> V | None:
        with self._lock:
            held = self._values.get(key)
        return held[0] if held is not None else None

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._values

    def clear(self) -> None:
        """Drop everything, as a restarted service holds nothing."""
        with self._lock:
            self._values.clear()

    @property
    def nbytes(self) -> int:
        return int(self._values.currsize)

    @property
    def budget_bytes(self) -> int:
        return int(self._values.maxsize)


class ImageStore:
    """Encoded images by sha256: a caller sends an image's bytes once, its sha256 after that."""

    def __init__(self, budget_bytes: int, service: str) -> None:
        self._images: Store[bytes] = Store(budget_bytes, len)
        self.service = service

    def resolve(self, data: bytes, sha256: str, what: str) -> bytes:
        """The image a request means: its bytes, or the ones its sha256 names; b"" when it
        gives neither. Bytes are kept only by `keep`, once the request has succeeded, so a
        refused request leaves the store as it was."""
        if data:
            own = images.sha256(data)
            if sha256 and sha256 != own:
                raise InvalidArgument(
                    f"{what}: the bytes' sha256 is {own[:12]}…, the request says {sha256[:12]}…"
                )
            return data
        if not sha256:
            return b""
        held = self._images.get(sha256)
        if held is None:
            raise NotHeld(
                "image",
                f"{what}: image {sha256[:12]}… is not held by the {self.service} service "
                "(evicted, or never sent here); send its bytes",
            )
        return held

    def keep(self, *sent: bytes) -> None:
        """Keep the bytes a successful request brought, for next time by sha256."""
        for data in sent:
            if data:
                self._images.put(images.sha256(data), data)

    def clear(self) -> None:
        self._images.clear()

    @property
    def nbytes(self) -> int:
        return self._images.nbytes
