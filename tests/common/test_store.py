"""The stores behind references: the memory one and the shared Redis one answer alike; with Redis,
what one replica kept (an upload, a painting's tensors) is found by another."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from styleblend.internal.v1 import blending_pb2

from services.common import images
from services.common.config import FeaturesConfig, GatewayConfig
from services.common.errors import NotHeld, Unavailable
from services.common.store import ARRAYS, BYTES, Codec, Held, ImageStore, Stores, messages
from services.features.core import FeatureExtractor
from services.gateway.core import Gateway
from services.gateway.upstream import Upstreams
from tests.conftest import free_port, sample

MiB = 1024 * 1024


@pytest.fixture(params=["memory", "redis"])
def stores(request: pytest.FixtureRequest) -> Stores:
    if request.param == "memory":
        return Stores()
    url = request.getfixturevalue("redis_url")
    shared = Stores(url, ttl_s=60)
    for namespace in ("test-bytes", "test-arrays"):  # each test starts from an empty namespace
        shared.make(namespace, MiB, len, BYTES).clear()
    return shared


def test_every_store_gives_back_exactly_what_it_kept(stores: Stores) -> None:
    kept: Held[bytes] = stores.make("test-bytes", MiB, len, BYTES)
    assert kept.put("a", b"\x00painting\xff") and kept.get("a") == b"\x00painting\xff"
    assert "a" in kept and "b" not in kept and kept.get("b") is None
    assert kept.get_many(["b", "a"]) == {"a": b"\x00painting\xff"}
    assert not kept.put("big", bytes(MiB + 1))  # over the budget (in Redis: the largest value)
    assert kept.get("big") is None
    kept.clear()
    assert kept.get("a") is None


def test_arrays_keep_their_dtype_shape_and_bits(stores: Stores) -> None:
    arrays: Held[np.ndarray] = stores.make("test-arrays", MiB, lambda a: a.nbytes, ARRAYS)
    gram = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    gram[0, 0] = np.float32(np.nextafter(np.float32(1), np.float32(2)))  # one ulp over 1
    arrays.put("g", gram)
    back = arrays.get("g")
    assert back is not None and back.dtype == np.float32 and back.shape == (64, 64)
    assert np.array_equal(back, gram)


def test_messages_round_trip() -> None:
    codec: Codec[blending_pb2.FetchTargetsResponse] = messages(blending_pb2.FetchTargetsResponse)
    message = blending_pb2.FetchTargetsResponse()
    assert codec.decode(codec.encode(message)) == message


def test_a_value_in_redis_lives_its_ttl_from_its_last_use(redis_url: str) -> None:
    kept = Stores(redis_url, ttl_s=0.6).make("test-ttl", MiB, len, BYTES)
    kept.put("short", b"x")
    time.sleep(0.4)
    assert kept.get("short") == b"x"  # used: another 0.6 s from now
    time.sleep(0.4)
    assert kept.get("short") == b"x"
    time.sleep(0.8)
    assert kept.get("short") is None


def test_a_wrong_store_address_fails_at_start_in_words() -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    with pytest.raises(Unavailable) as caught:
        Stores(url)
    assert str(caught.value).startswith(f"the shared store at {url} (STYLEBLEND_STORE) cannot")
    with pytest.raises(ValueError, match="neither `memory` nor a Redis URL"):
        GatewayConfig(store="memcached://x")


def test_an_image_sent_to_one_replica_is_found_by_another(redis_url: str) -> None:
    one = ImageStore(MiB, "features", Stores(redis_url))
    other = ImageStore(MiB, "features", Stores(redis_url))
    data = sample("style/the_scream.jpg")
    digest = images.sha256(data)
    one.keep(data)
    assert other.resolve(b"", digest, "sources[0]") == data
    with pytest.raises(NotHeld, match="is not held by the features service"):
        other.resolve(b"", "0" * 64, "sources[1]")


def test_a_painting_extracted_by_one_features_replica_is_a_hit_on_another(
    redis_url: str, vgg19_dir: Path
) -> None:
    def replica() -> FeatureExtractor:
        shared = Stores(redis_url)
        return FeatureExtractor(vgg19_dir, ["CPUExecutionProvider"], 64 * MiB, 1, stores=shared)

    first, second = replica(), replica()
    first.clear_cache()
    painting = sample("style/starry_night.jpg")
    made = first.extract(painting, 64, 48, ["relu1_1", "relu3_1"], ["relu4_2"])
    found = second.extract(painting, 64, 48, ["relu1_1", "relu3_1"], ["relu4_2"])
    assert not made.cached and found.cached and found.kept
    assert (first.forward_passes, second.forward_passes) == (1, 0)  # no ONNX Runtime run
    for layer in ("relu1_1", "relu3_1"):
        assert np.array_equal(found.grams[layer], made.grams[layer])
    assert np.array_equal(found.features["relu4_2"], made.features["relu4_2"])
    fetched = second.tensors(list(made.gram_keys.values()))  # blending's fetch, any replica
    assert np.array_equal(fetched[made.gram_keys["relu3_1"]], made.grams["relu3_1"])
    first.clear_cache()  # Redis restarted, or evicted them: said in words, never wrong tensors
    with pytest.raises(NotHeld, match="no longer held by the features service"):
        second.tensors(list(made.gram_keys.values()))
    assert FeaturesConfig(store=redis_url).store == redis_url


def two_gateways(redis_url: str, **limits: int) -> tuple[Gateway, Gateway]:
    config = GatewayConfig(store=redis_url, **limits)  # type: ignore[arg-type]
    return Gateway(config, Upstreams(config)), Gateway(config, Upstreams(config))


def noise_png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    return images.encode(pixels, "PNG", compress_level=0)


def test_an_upload_through_one_gateway_replica_is_found_by_another(redis_url: str) -> None:
    one, other = two_gateways(redis_url)
    data = noise_png(1)
    upload = one.upload(data, "alice")
    assert other.uploaded(upload.upload_id) == data
    assert other.uploaded(images.sha256(noise_png(2))) is None


def test_a_shared_upload_goes_only_once_no_replica_holds_it(redis_url: str) -> None:
    size = len(noise_png(0))
    one, other = two_gateways(redis_url, upload_bytes_per_client=2 * size)
    shared = one.upload(noise_png(10), "alice").upload_id
    assert other.upload(noise_png(10), "bob").upload_id == shared
    for k in range(2):  # alice's quota on `one` lets her oldest go: bob, on `other`, holds it
        one.upload(noise_png(20 + k), "alice")
    assert one.uploaded(shared) == noise_png(10)
    for k in range(2):  # now bob lets it go too
        other.upload(noise_png(30 + k), "bob")
    assert one.uploaded(shared) is None and other.uploaded(shared) is None


def test_an_upload_the_store_cannot_keep_is_refused_and_changes_nothing(redis_url: str) -> None:
    import redis

    from services.gateway.uploads import RedisUploadBytes, UploadStore

    url = f"redis://127.0.0.1:{free_port()}/0"  # the store went away after the gateway started
    store = UploadStore(10 * MiB, MiB, RedisUploadBytes(redis.Redis.from_url(url), url, 60))
    with pytest.raises(Unavailable, match="cannot be reached"):
        store.put(images.sha256(noise_png(3)), noise_png(3), "alice")
    assert store.held_bytes == 0 and store.used_by("alice") == 0


def test_a_store_that_fails_while_making_room_keeps_the_accounting_whole(redis_url: str) -> None:
    import redis

    from services.gateway.uploads import RedisUploadBytes, UploadStore

    admin = redis.Redis.from_url(redis_url)
    # A user that may store but not run scripts: letting an image go fails as an outage would.
    admin.acl_setuser("no-scripts", enabled=True, passwords=["+pw"], keys=["*"],
                      commands=["+@all", "-@scripting"])  # fmt: skip
    url = redis_url.replace("redis://", "redis://no-scripts:pw@")
    size = len(noise_png(0))
    store = UploadStore(10 * MiB, 2 * size, RedisUploadBytes(redis.Redis.from_url(url), url, 60))
    kept = [images.sha256(noise_png(k)) for k in (40, 41)]
    for k, digest in zip((40, 41), kept, strict=True):
        store.put(digest, noise_png(k), "alice")
    with pytest.raises(Unavailable):  # the oldest must go to make room, and cannot
        store.put(images.sha256(noise_png(42)), noise_png(42), "alice")
    assert store.held_bytes == 2 * size and store.used_by("alice") == 2 * size
    assert [store.get(digest) for digest in kept] == [noise_png(40), noise_png(41)]
    admin.acl_setuser("no-scripts", commands=["+@scripting"])  # back: room is made as usual
    store.put(images.sha256(noise_png(42)), noise_png(42), "alice")
    assert store.get(kept[0]) is None and store.get(kept[1]) == noise_png(41)
    assert store.held_bytes == 2 * size and store.used_by("alice") == 2 * size
