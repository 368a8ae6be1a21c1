"""Uploaded images by sha256, within a memory budget, each charged to the clients that uploaded
it, each client within its quota; the bytes in this process or in the shared store.

A client over its quota makes room by dropping its own oldest uploads, never another's; an
image larger than the quota is refused (RESOURCE_EXHAUSTED) and nothing changes. When the
store as a whole is full, room comes from the client holding the most bytes (its oldest
first): a client within its fair share keeps its uploads while others hold more.

With a shared store (STYLEBLEND_STORE=redis://…) the bytes live in Redis, so any gateway
replica finds an upload made through another. The accounting above stays each replica's own:
a client's quota holds per replica, and Redis's maxmemory and the TTL bound the whole. An
image in Redis names its owners (replica and client) and goes once the last lets it go, so a
client over its quota on one replica never drops what another replica's client holds.
"""

from __future__ import annotations

import contextlib
import secrets
import threading
from collections import Counter, OrderedDict
from typing import TYPE_CHECKING, Protocol

from services.common.config import GatewayConfig
from services.common.errors import ResourceExhausted, Unavailable
from services.common.store import KEY_PREFIX, connect, unreachable

if TYPE_CHECKING:
    import redis


class UploadBytes(Protocol):
    """Where the bytes of uploads live, each image until its last owner lets it go; the
    accounting (quotas, budget, which to let go) is UploadStore's."""

    def put(self, digest: str, data: bytes, owner: str) -> None: ...
    def get(self, digest: str) -> bytes | None: ...
    def release(self, digest: str, owner: str) -> None: ...


class MemoryUploadBytes:
    def __init__(self) -> None:
        self._images: dict[str, tuple[bytes, set[str]]] = {}

    def put(self, digest: str, data: bytes, owner: str) -> None:
        self._images.setdefault(digest, (data, set()))[1].add(owner)

    def get(self, digest: str) -> bytes | None:
        held = self._images.get(digest)
        return None if held is None else held[0]

    def release(self, digest: str, owner: str) -> None:
        held = self._images.get(digest)
        if held is not None:
            held[1].discard(owner)
            if not held[1]:
                del self._images[digest]


# SREM the owner; once no owner is left, the image goes with its owners' set.
_RELEASE = """
redis.call('SREM', KEYS[2], ARGV[1])
if redis.call('SCARD', KEYS[2]) == 0 then redis.call('DEL', KEYS[1], KEYS[2]) end
"""


class RedisUploadBytes:
    """Each image at styleblend:uploads:<sha256>, its owners (replica/client) in a set beside
    it; both live `ttl_s` from their last use."""

    def __init__(self, client: redis.Redis, url: str, ttl_s: float) -> None:
        self._client, self.url = client, url
        self._ttl_ms = max(1, round(ttl_s * 1000))
        self._replica = secrets.token_hex(8)  # owners name this replica's accounting
        self._release = client.register_script(_RELEASE)

    def _keys(self, digest: str) -> tuple[str, str]:
        image = f"{KEY_PREFIX}:uploads:{digest}"
        return image, f"{image}:owners"

    def _owner(self, client: str) -> str:
        return f"{self._replica}/{client}"

    def put(self, digest: str, data: bytes, owner: str) -> None:
        import redis

        image, owners = self._keys(digest)
        pipe = self._client.pipeline(transaction=True)
        pipe.set(image, data, px=self._ttl_ms)
        pipe.sadd(owners, self._owner(owner))
        pipe.pexpire(owners, self._ttl_ms)
        try:
            pipe.execute()
        except redis.RedisError as error:
            raise unreachable(self.url, error) from error

    def get(self, digest: str) -> bytes | None:
        import redis

        image, owners = self._keys(digest)
        pipe = self._client.pipeline(transaction=False)
        pipe.getex(image, px=self._ttl_ms)
        pipe.pexpire(owners, self._ttl_ms)
        try:
            data, _ = pipe.execute()
        except redis.RedisError as error:
            raise unreachable(self.url, error) from error
        return data

    def release(self, digest: str, owner: str) -> None:
        import redis

        try:
            self._release(keys=list(self._keys(digest)), args=[self._owner(owner)])
        except redis.RedisError as error:
            raise unreachable(self.url, error) from error


def upload_bytes(config: GatewayConfig) -> UploadBytes:
    if config.store == "memory":
        return MemoryUploadBytes()
    return RedisUploadBytes(connect(config.store), config.store, config.store_ttl_s)


class UploadStore:
    """See the module's docstring. `bytes_`: where the images' bytes are kept."""

    def __init__(
        self, budget_bytes: int, per_client_bytes: int, bytes_: UploadBytes | None = None
    ) -> None:
        self.budget_bytes = budget_bytes
        self.quota_bytes = min(per_client_bytes, budget_bytes)
        self._bytes = bytes_ or MemoryUploadBytes()
        self._sizes: OrderedDict[str, int] = OrderedDict()  # least recently used first
        self._owners: dict[str, set[str]] = {}
        self._used: Counter[str] = Counter()  # bytes charged to each client
        self._held = 0  # bytes held, each image once
        self._lock = threading.Lock()

    @property
    def held_bytes(self) -> int:
        with self._lock:
            return self._held

    def used_by(self, client: str) -> int:
        with self._lock:
            return self._used[client]

    def check(self, size: int) -> None:
        if size > self.quota_bytes:
            raise ResourceExhausted(
                f"the uploaded image: {size:,} bytes is over the upload quota of "
                f"{self.quota_bytes:,} bytes a client (STYLEBLEND_UPLOAD_BYTES_PER_CLIENT)"
            )

    def put(self, digest: str, data: bytes, client: str) -> None:
        size = len(data)
        self.check(size)
        with self._lock:
            # First, so a store that fails (Redis unreachable) refuses with nothing changed;
            # again for a client that holds it already: a shared copy may have expired.
            self._bytes.put(digest, data, client)
            owners = self._owners.get(digest)
            if owners is not None and client in owners:
                self._sizes.move_to_end(digest)
                return
            try:
                self._make_room(digest, size, client, is_new=owners is None)
            except Unavailable:
                # The store went away while older uploads were let go (those stay gone, each
                # accounted for): this one is not kept, so no bytes are left unaccounted.
                with contextlib.suppress(Unavailable):
                    self._bytes.release(digest, client)
                raise
            if owners is None:
                self._sizes[digest], self._owners[digest] = size, set()
                self._held += size
            self._sizes.move_to_end(digest)
            self._owners[digest].add(client)
            self._used[client] += size

    def _make_room(self, digest: str, size: int, client: str, is_new: bool) -> None:
        while self._used[client] + size > self.quota_bytes:
            self._release(self._oldest_of(client, digest), client)
        while is_new and self._held + size > self.budget_bytes:
            holder = max(self._used, key=lambda name: self._used[name])
            self._release(self._oldest_of(holder, digest), holder)

    def get(self, digest: str) -> bytes | None:
        """The upload's bytes, wherever it was made (with a shared store, through any replica)."""
        with self._lock:
            if digest in self._sizes:
                self._sizes.move_to_end(digest)
        return self._bytes.get(digest)

    def _oldest_of(self, client: str, keep: str) -> str:
        return next(d for d in self._sizes if d != keep and client in self._owners[d])

    def _release(self, digest: str, client: str) -> None:
        """`client` no longer holds `digest`; the image goes once nobody does. The store first,
        so one that fails leaves this accounting as it was."""
        self._bytes.release(digest, client)
        owners = self._owners[digest]
        owners.discard(client)
        size = self._sizes[digest]
        self._used[client] -= size
        if self._used[client] <= 0:
            del self._used[client]
        if not owners:
            del self._sizes[digest], self._owners[digest]
            self._held -= size
