"""Hypothesis strategies for bad input: image bytes, and public requests built from the proto
descriptors, every field of every message filled from a strategy for its type (or a
field-specific one that is mostly valid, so the fuzzer also gets past the first check).
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from hypothesis import strategies as st
from PIL import Image
from styleblend.v1 import styleblend_pb2 as pb

from tests.conftest import sample

SAMPLES = (
    "content/chelsea.jpg",
    "content/coffee.jpg",
    "style/starry_night.jpg",
    "style/the_scream.jpg",
    "style/woman-with-hat-matisse.jpg",
)
# What the request fuzzer's gateway allows: within them, a request is cheap to run.
MAX_SOURCES = 4

# --- images ----------------------------------------------------------------------------------
FORMAT_MODES = {
    "PNG": ("1", "L", "LA", "P", "RGB", "RGBA", "I;16"),
    "JPEG": ("L", "RGB", "CMYK"),
    "WEBP": ("RGB", "RGBA"),
    "BMP": ("1", "L", "P", "RGB"),
    "GIF": ("L", "P"),
    "TIFF": ("1", "L", "RGB", "RGBA", "CMYK", "I;16", "F"),
    # Pillow reads these, the services refuse them by name.
    "PPM": ("L", "RGB"),
    "ICO": ("RGBA",),
    "TGA": ("L", "RGB"),
}


def floats(*bounds: float | None, **options: bool) -> st.SearchStrategy[float]:
    """Floats without subnormals: the reconstruction flushes denormals to zero (a CPU state
    of the thread that runs it, the test process's main thread included), where hypothesis
    cannot draw them."""
    return st.floats(*bounds, allow_subnormal=False, **options)  # type: ignore[arg-type]


@st.composite
def encoded_images(draw: st.DrawFn) -> bytes:
    """A small image, well formed, in one of many formats and modes, maybe EXIF-rotated."""
    fmt = draw(st.sampled_from(sorted(FORMAT_MODES)))
    mode = draw(st.sampled_from(FORMAT_MODES[fmt]))
    width, height = draw(st.integers(1, 80)), draw(st.integers(1, 80))
    seed = draw(st.integers(0, 2**32 - 1))
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    image = Image.fromarray(pixels, "RGB").convert(mode)
    options: dict[str, Any] = {}
    if fmt in ("JPEG", "WEBP", "PNG", "TIFF") and draw(st.booleans()):
        exif = Image.Exif()
        exif[0x0112] = draw(st.integers(0, 9))  # orientation, 0 and 9 out of range
        options["exif"] = exif.tobytes()
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def png_header(width: int, height: int, body: bytes = b"") -> bytes:
    """A PNG that claims `width`×`height`: a decompression bomb's header, or a lie."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


@st.composite
def mutated(draw: st.DrawFn, images: st.SearchStrategy[bytes]) -> bytes:
    """A well-formed image, then truncated, overwritten in places, or spliced with junk."""
    data = bytearray(draw(images))
    for _ in range(draw(st.integers(1, 4))):
        action = draw(st.sampled_from(("truncate", "flip", "insert", "zero-run")))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if action == "truncate":
            data = data[: max(1, at)]
        elif action == "flip":
            data[at] ^= draw(st.integers(1, 255))
        elif action == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        else:
            data[at : at + draw(st.integers(1, 64))] = b"\0" * 8
    return bytes(data)


def image_bytes() -> st.SearchStrategy[bytes]:
    """Anything a client could put where an image goes."""
    return st.one_of(
        encoded_images(),
        mutated(encoded_images()),
        st.builds(
            png_header,
            st.integers(0, 2**31 - 1),
            st.integers(0, 2**31 - 1),
            st.binary(max_size=64),
        ),
        st.binary(max_size=256),
        st.just(b""),
    )


def request_images(uploads: tuple[str, ...]) -> st.SearchStrategy[bytes]:
    """For requests: mostly the bundled photos and small images, so runs get under way."""
    photos = st.sampled_from(SAMPLES).map(sample)
    return mostly(photos, st.one_of(encoded_images(), image_bytes()))


# --- requests from descriptors ---------------------------------------------------------------
def mostly(usual: st.SearchStrategy[Any], rare: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """`usual` four times in five, `rare` otherwise (one_of would merge repeated branches)."""
    return st.integers(0, 4).flatmap(lambda n: rare if n == 4 else usual)


Overrides = Mapping[str, st.SearchStrategy[Any]]

_UINT32 = st.one_of(st.integers(0, 8), st.integers(0, 600), st.sampled_from([2**31 - 1, 2**32 - 1]))
_UINT64 = st.one_of(st.integers(0, 100), st.sampled_from([2**63 - 1, 2**64 - 1]))
_INT32 = st.one_of(st.integers(-3, 10), st.sampled_from([-(2**31), 2**31 - 1]))
_DOUBLE = st.one_of(
    floats(0, 10),
    st.sampled_from([0.0, -0.0, 1.0, -1.0, 1e-300, 1e308, float("inf"), float("-inf")]),
    st.just(float("nan")),
    floats(allow_nan=True, allow_infinity=True),
)
_SOMETIMES = st.integers(0, 3).map(lambda n: n == 0)  # a field is set one time in four
_SCALARS: dict[int, st.SearchStrategy[Any]] = {
    FieldDescriptor.TYPE_DOUBLE: _DOUBLE,
    FieldDescriptor.TYPE_FLOAT: _DOUBLE.map(lambda x: float(np.float32(x))),
    FieldDescriptor.TYPE_UINT32: _UINT32,
    FieldDescriptor.TYPE_UINT64: _UINT64,
    FieldDescriptor.TYPE_INT32: _INT32,
    FieldDescriptor.TYPE_INT64: _INT32,
    FieldDescriptor.TYPE_BOOL: st.booleans(),
    FieldDescriptor.TYPE_STRING: st.text(max_size=40),
    FieldDescriptor.TYPE_BYTES: st.binary(max_size=64),
    FieldDescriptor.TYPE_ENUM: _INT32,  # proto3 enums are open: unknown numbers arrive too
}


def _is_repeated(field: FieldDescriptor) -> bool:
    return bool(field.is_repeated)


def _value(field: FieldDescriptor, overrides: Overrides, depth: int) -> st.SearchStrategy[Any]:
    if field.full_name in overrides:
        return overrides[field.full_name]
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        assert field.message_type is not None
        return messages(field.message_type, overrides, depth + 1)
    return _SCALARS[field.type]


def messages(
    descriptor: Descriptor, overrides: Overrides, depth: int = 0
) -> st.SearchStrategy[Message]:
    """Messages of this type: each field set or left unset, one member of each oneof."""
    from google.protobuf import message_factory

    cls = message_factory.GetMessageClass(descriptor)

    @st.composite
    def build(draw: st.DrawFn) -> Message:
        message = cls()
        for field in descriptor.fields:
            if depth > 4:
                break
            # Unset fields are the common case: defaults must work too.
            if not draw(overrides.get(f"{field.full_name}#set", _SOMETIMES)):
                continue
            if field.containing_oneof is not None:
                siblings = field.containing_oneof.fields
                if any(_has(message, other) for other in siblings if other is not field):
                    continue
            _assign(message, field, draw, overrides, depth)
        return message

    return build()


def _has(message: Message, field: FieldDescriptor) -> bool:
    if _is_repeated(field):
        return bool(len(getattr(message, field.name)))
    if field.has_presence:
        return message.HasField(field.name)
    return bool(getattr(message, field.name))


def _assign(
    message: Message, field: FieldDescriptor, draw: st.DrawFn, overrides: Overrides, depth: int
) -> None:
    if _is_repeated(field):
        count_strategy = overrides.get(f"{field.full_name}#count", st.integers(0, 3))
        items = [draw(_value(field, overrides, depth)) for _ in range(draw(count_strategy))]
        target = getattr(message, field.name)
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            for item in items:
                target.add().CopyFrom(item)
        else:
            target.extend(items)
        return
    value = draw(_value(field, overrides, depth))
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        getattr(message, field.name).CopyFrom(value)
    else:
        setattr(message, field.name, value)


def public_overrides(
    layers: tuple[str, ...], uploads: tuple[str, ...], fast_models: tuple[str, ...]
) -> dict[str, st.SearchStrategy[Any]]:
    """Field strategies that are mostly valid: real images, weights, layers and ids."""
    weight = mostly(st.one_of(floats(0, 2), st.sampled_from([0.0, 1.0])), _DOUBLE)
    images = request_images(uploads)
    upload_ids = st.one_of(st.sampled_from(uploads), st.text(max_size=70))
    layer_names = st.one_of(st.sampled_from(layers), st.text(max_size=12))
    v1 = "styleblend.v1"

    @st.composite
    def plausible_sources(draw: st.DrawFn) -> pb.Source:
        source = pb.Source(
            data=draw(images), style_weight=draw(weight), content_weight=draw(weight)
        )
        for name in ("style_map", "content_map"):
            if draw(st.integers(0, 3)) == 0:
                getattr(source, name).data = draw(images)
        return source

    sources = mostly(
        plausible_sources(), messages(pb.Source.DESCRIPTOR, {f"{v1}.Source.data": images})
    )
    return {
        f"{v1}.BlendRequest.sources": sources,
        f"{v1}.Source.data": images,
        f"{v1}.Source.upload_id": upload_ids,
        f"{v1}.InfluenceMap.data": images,
        f"{v1}.InfluenceMap.upload_id": upload_ids,
        f"{v1}.Source.style_weight": weight,
        f"{v1}.Source.content_weight": weight,
        f"{v1}.Region.style_weights": weight,
        f"{v1}.Region.style_weights#count": st.integers(0, MAX_SOURCES + 1),
        f"{v1}.BlendRequest.sources#count": mostly(
            st.integers(1, 3), st.integers(0, MAX_SOURCES + 1)
        ),
        f"{v1}.BlendRequest.sources#set": st.integers(0, 9).map(bool),
        f"{v1}.SessionRequest.start#set": st.integers(0, 9).map(bool),
        f"{v1}.UploadImageRequest.data#set": st.integers(0, 9).map(bool),
        f"{v1}.BlendRequest.max_side_px": st.one_of(st.integers(30, 140), _UINT32),
        f"{v1}.BlendRequest.iterations": st.one_of(st.integers(0, 12), _UINT32),
        f"{v1}.BlendRequest.iterations_per_scale": st.one_of(st.integers(0, 6), _UINT32),
        f"{v1}.BlendRequest.style_layers": layer_names,
        f"{v1}.BlendRequest.content_layers": layer_names,
        f"{v1}.BlendRequest.init_image": images,
        f"{v1}.BlendRequest.style_scale": st.one_of(floats(0.2, 4.5), _DOUBLE),
        f"{v1}.BlendRequest.learning_rate": st.one_of(floats(0, 0.2), _DOUBLE),
        f"{v1}.BlendRequest.scales": st.integers(0, 5),
        f"{v1}.BlendRequest.optimizer": st.integers(-1, 3),
        f"{v1}.BlendRequest.init": st.integers(-1, 4),
        f"{v1}.BlendRequest.preserve_color": st.integers(-1, 3),
        f"{v1}.FastOptions.model": st.one_of(st.sampled_from(fast_models or ("none",)), st.text()),
        f"{v1}.FastOptions.strength": st.one_of(floats(0, 1), _DOUBLE),
        f"{v1}.SourceUpdate.index": st.one_of(st.integers(0, MAX_SOURCES + 1), _UINT32),
        f"{v1}.SourceUpdate.style_weight": weight,
        f"{v1}.SourceUpdate.content_weight": weight,
        f"{v1}.SessionUpdate.update_id": st.integers(0, 4),
        f"{v1}.SessionUpdate.at_iteration": st.integers(0, 6),
        f"{v1}.SessionUpdate.fast_strength": st.one_of(floats(0, 1), _DOUBLE),
        f"{v1}.UploadImageRequest.data": images,
    }


def base_request() -> pb.BlendRequest:
    """A good, cheap request: the single-field mutations below start from it."""
    return pb.BlendRequest(
        sources=[
            pb.Source(data=sample(SAMPLES[0]), style_weight=0.0, content_weight=1.0),
            pb.Source(data=sample(SAMPLES[2]), style_weight=1.0, content_weight=0.0),
        ],
        max_side_px=48,
        iterations=2,
    )


@st.composite
def _one_field_changed(draw: st.DrawFn, overrides: Overrides) -> pb.BlendRequest:
    """The good request with one field replaced by a fuzzed one (or cleared)."""
    fuzzed = draw(messages(pb.BlendRequest.DESCRIPTOR, overrides))
    request: Message = base_request()
    field = draw(st.sampled_from(tuple(pb.BlendRequest.DESCRIPTOR.fields)))
    request.ClearField(field.name)
    if _is_repeated(field):
        getattr(request, field.name).extend(getattr(fuzzed, field.name))
    elif not field.has_presence or fuzzed.HasField(field.name):
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            getattr(request, field.name).CopyFrom(getattr(fuzzed, field.name))
        else:
            setattr(request, field.name, getattr(fuzzed, field.name))
    assert isinstance(request, pb.BlendRequest)
    return request


def blend_requests(overrides: Overrides) -> st.SearchStrategy[pb.BlendRequest]:
    """Whole requests fuzzed field by field, and good ones with one field fuzzed."""
    return st.one_of(
        messages(pb.BlendRequest.DESCRIPTOR, overrides).map(_as(pb.BlendRequest)),
        _one_field_changed(overrides),
    )


def session_updates(overrides: Overrides) -> st.SearchStrategy[pb.SessionUpdate]:
    return messages(pb.SessionUpdate.DESCRIPTOR, overrides).map(_as(pb.SessionUpdate))


def session_requests(overrides: Overrides) -> st.SearchStrategy[pb.SessionRequest]:
    return messages(pb.SessionRequest.DESCRIPTOR, overrides).map(_as(pb.SessionRequest))


def upload_requests(overrides: Overrides) -> st.SearchStrategy[pb.UploadImageRequest]:
    return messages(pb.UploadImageRequest.DESCRIPTOR, overrides).map(_as(pb.UploadImageRequest))


def _as(cls: type[Message]) -> Callable[[Message], Any]:
    def convert(message: Message) -> Any:
        return cls.FromString(message.SerializeToString())

    return convert
