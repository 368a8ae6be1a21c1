"""What a service keeps for references: content-addressed, bounded by bytes, least recently used
out first. A key names its content (a sha256), so a key found always gives the right value, and
a key evicted is said in words (NotHeld), never answered with something else.

Two kinds of store keep it: this process's memory (the default), or a Redis shared by every
replica (`STYLEBLEND_STORE=redis://HOST:PORT/DB`), where each value lives `STYLEBLEND_STORE_TTL_S`
from its last use and Redis's own `maxmemory` with `allkeys-lru` bounds the whole.
"""

from __future__ import annotations

import hashlib
import io
import json
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

import numpy as np
from cachetools import LRUCache
from google.protobuf.message import Message

from services.common import images
from services.common.errors import InvalidArgument, NotHeld, Unavailable

if TYPE_CHECKING:
    import redis

V = TypeVar("V")
M = TypeVar("M", bound=Message)
KEY_PREFIX = "styleblend"


class Held(Protocol[V]):
    """What every store answers: the memory one and the shared one alike."""

    def put(self, key: str, value: V) -> bool: ...
    def get(self, key: str) -> V | None: ...
    def get_many(self, keys: Iterable[str]) -> dict[str, V]: ...
    def __contains__(self, key: str) -> bool: ...
    def clear(self) -> None: ...
    @property
    def nbytes(self) -> int: ...
    @property
    def budget_bytes(self) -> int: ...


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

    def get_many(self, keys: Iterable[str]) -> dict[str, V]:
        with self._lock:
            found = {key: self._values.get(key) for key in keys}
        return {key: held[0] for key, held in found.items() if held is not None}

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


@dataclass(frozen=True)
class Codec(Generic[V]):
    """How a value of one kind becomes bytes for a shared store, and back."""

    encode: Callable[[V], bytes]
    decode: Callable[[bytes], V]


def _encode_array(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _decode_array(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


BYTES: Codec[bytes] = Codec(bytes, bytes)
ARRAYS: Codec[np.ndarray] = Codec(_encode_array, _decode_array)  # .npy: dtype and shape kept


def messages(kind: type[M]) -> Codec[M]:
    return Codec(lambda message: message.SerializeToString(), kind.FromString)


def unreachable(url: str, error: Exception) -> Unavailable:
    return Unavailable(
        f"the shared store at {url} (STYLEBLEND_STORE) cannot be reached: {error}; "
        "send the request again once it is back"
    )


class RedisStore(Generic[V]):
    """Values by key in a Redis every replica shares. Each lives `ttl_s` from its last use;
    Redis's `maxmemory` with `allkeys-lru` bounds them all, so a value may go at any time and
    a caller recomputes it or says so (NotHeld), as with the memory store."""

    def __init__(
        self,
        client: redis.Redis,
        url: str,
        namespace: str,
        codec: Codec[V],
        ttl_s: float,
        max_value_bytes: int,
    ) -> None:
        self._client = client
        self.url = url
        self._prefix = f"{KEY_PREFIX}:{namespace}:"
        self._codec = codec
        self._ttl_ms = max(1, round(ttl_s * 1000))
        self._max_value_bytes = max_value_bytes

    def _call(self, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        import redis

        try:
            return method(*args, **kwargs)
        except redis.RedisError as error:
            raise unreachable(self.url, error) from error

    def put(self, key: str, value: V) -> bool:
        data = self._codec.encode(value)
        if len(data) > self._max_value_bytes:
            return False
        self._call(self._client.set, self._prefix + key, data, px=self._ttl_ms)
        return True

    def get(self, key: str) -> V | None:
        data = self._call(self._client.getex, self._prefix + key, px=self._ttl_ms)
        return None if data is None else self._codec.decode(data)

    def get_many(self, keys: Iterable[str]) -> dict[str, V]:
        keys = list(keys)
        if not keys:
            return {}
        pipe = self._client.pipeline(transaction=False)
        for key in keys:
            pipe.getex(self._prefix + key, px=self._ttl_ms)
        found = self._call(pipe.execute)
        return {
            key: self._codec.decode(data)
            for key, data in zip(keys, found, strict=True)
            if data is not None
        }

    def __contains__(self, key: str) -> bool:
        return bool(self._call(self._client.exists, self._prefix + key))

    def clear(self) -> None:
        """Drop this namespace's values (every replica's: they share them)."""
        for key in self._call(lambda: list(self._client.scan_iter(self._prefix + "*", 1000))):
            self._call(self._client.unlink, key)

    @property
    def nbytes(self) -> int:
        """The shared store's memory in use, all namespaces together."""
        return int(self._call(self._client.info, "memory")["used_memory"])

    @property
    def budget_bytes(self) -> int:
        """Redis's maxmemory; 0 where it has none (set one: nothing else bounds it)."""
        return int(self._call(self._client.info, "memory").get("maxmemory", 0))


def connect(url: str) -> redis.Redis:
    """A client for a shared store's URL, checked with a PING so a wrong address fails at start
    in words, not at the first request."""
    import redis

    try:
        client = redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5)
        client.ping()
    except (ValueError, redis.RedisError) as error:
        raise unreachable(url, error) from error
    return client


class Stores:
    """Makes each store a service keeps: in memory, or in the shared Redis of `url`."""

    def __init__(self, url: str = "memory", ttl_s: float = 3600.0) -> None:
        self.url, self.ttl_s = url, ttl_s
        self._client = None if url == "memory" else connect(url)

    @property
    def shared(self) -> bool:
        return self._client is not None

    def make(
        self, namespace: str, budget_bytes: int, size_of: Callable[[V], int], codec: Codec[V]
    ) -> Held[V]:
        """`budget_bytes`: the memory store's budget, and in Redis the largest single value."""
        if self._client is None:
            return Store(budget_bytes, size_of)
        return RedisStore(self._client, self.url, namespace, codec, self.ttl_s, budget_bytes)


MEMORY = Stores()


class ImageStore:
    """Encoded images by sha256: a caller sends an image's bytes once, its sha256 after that."""

    def __init__(self, budget_bytes: int, service: str, stores: Stores = MEMORY) -> None:
        # Content-addressed, so one namespace serves every service that keeps images.
        self._images: Held[bytes] = stores.make("images", budget_bytes, len, BYTES)
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
