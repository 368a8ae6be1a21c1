"""Gram matrices and feature maps of images, from the ONNX export on ONNX Runtime."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx.utils
import onnxruntime as ort
from cachetools import LRUCache

from services.common import colour, images
from services.common.config import EXTRACT_PIXELS, EXTRACT_SIDE_PX, CpuArena
from services.common.errors import (
    InvalidArgument,
    NotHeld,
    ResourceExhausted,
)
from services.common.heap import malloc_trim
from services.common.manifest import MIN_SIDE_PX, Manifest
from services.common.providers import (
    DEFAULT_TENSORRT,
    TensorRTSettings,
    choose_providers,
    session_providers,
)
from services.common.store import ARRAYS, MEMORY, Held, Stores, content_key

log = logging.getLogger(__name__)

SESSIONS = 4  # sets of taps kept ready: style, content, both, and one more


def gram(features: np.ndarray) -> np.ndarray:
    """G = F Fᵀ / (H W) for a C×H×W feature map."""
    channels = features.shape[0]
    flat = features.reshape(channels, -1)
    return (flat @ flat.T) / flat.shape[1]


def cut_to(model: onnx.ModelProto, input_name: str, taps: Sequence[str]) -> onnx.ModelProto:
    """The part of `model` that computes `taps` from its input, with only them as outputs."""
    return onnx.utils.Extractor(model).extract_model([input_name], list(taps))


COLOR_TRANSFORMS = ("", "luminance", "match")


@dataclass(frozen=True)
class Extraction:
    grams: dict[str, np.ndarray]
    features: dict[str, np.ndarray]
    cached: bool  # True when nothing had to be run
    gram_keys: dict[str, str]  # layer -> the key `tensors` finds its Gram matrix by
    feature_keys: dict[str, str]
    kept: bool  # every tensor is in the cache (false when one is larger than its budget)


def check_run_size(width: int, height: int, max_side_px: int, max_pixels: int) -> None:
    """The largest run a network may be asked for: its memory and time grow with its pixels."""
    if max(width, height) > max_side_px:
        raise ResourceExhausted(
            f"size {width}×{height}: the longest side allowed is {max_side_px} px "
            "(STYLEBLEND_MAX_EXTRACT_SIDE_PX)"
        )
    if width * height > max_pixels:
        raise ResourceExhausted(
            f"size {width}×{height} = {width * height:,} pixels is over the limit of "
            f"{max_pixels:,} (STYLEBLEND_MAX_EXTRACT_PIXELS)"
        )


class FeatureExtractor:
    """One ONNX Runtime session over an export, and a cache keyed by image content and size."""

    def __init__(
        self,
        model_dir: Path,
        providers: Sequence[str],
        cache_bytes: int,
        intra_op_threads: int = 0,
        tensorrt: TensorRTSettings = DEFAULT_TENSORRT,
        *,
        max_side_px: int = EXTRACT_SIDE_PX,
        max_pixels: int = EXTRACT_PIXELS,
        cpu_arena: CpuArena = "off",
        stores: Stores = MEMORY,
    ) -> None:
        self.manifest = Manifest.load(model_dir)
        self.max_side_px, self.max_pixels = max_side_px, max_pixels
        self.model_path = model_dir / self.manifest.onnx_file
        self._options = ort.SessionOptions()
        self._options.intra_op_num_threads = intra_op_threads
        # ONNX Runtime's CPU arena keeps the high-water mark of every size it has run: a
        # features service grew from 1.4 to 5.6 GB over varied sizes. "off" gives each run's
        # memory back, for the page faults of taking it again: +6% at 512 px, measured with
        # the other settings by bench/features_memory.py.
        self.cpu_arena = cpu_arena
        self._options.enable_cpu_mem_arena = cpu_arena != "off"
        self._run_options = ort.RunOptions()
        if cpu_arena == "shrink":
            self._run_options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
        name = self.manifest.input_name
        self._providers = session_providers(
            choose_providers(providers, ort.get_available_providers()),
            tensorrt,
            lambda side: {name: (1, 3, side, side)},
        )
        # ONNX Runtime runs every node of a graph whatever the outputs asked for, so each set
        # of taps gets a session over the graph cut to them: the default style and content
        # layers skip relu5_2 to relu5_4 and the reorders of ten unused outputs.
        self._sessions: LRUCache[tuple[str, ...], ort.InferenceSession] = LRUCache(maxsize=SESSIONS)
        self._sessions_lock = threading.Lock()
        defaults = self.manifest.default_style_layers + self.manifest.default_content_layers
        self.providers: list[str] = self.session_for(defaults).get_providers()
        log.info("model %s on ONNX Runtime, providers %s", self.manifest.model, self.providers)
        self.forward_passes = 0  # runs of the model, for tests and the benchmark
        # content_key(model, weights, image sha256, width, height, colour transform, "gram" |
        # "features", layer) -> array: the key is also the tensor's name for `tensors`. With a
        # shared store, what one replica extracted is found by every other.
        self._cache: Held[np.ndarray] = stores.make(
            "tensors", cache_bytes, lambda array: array.nbytes, ARRAYS
        )
        self._lock = threading.Lock()

    def session_for(self, layers: Sequence[str]) -> ort.InferenceSession:
        """A session whose only outputs are `layers`, in sorted order."""
        taps = tuple(sorted(set(layers)))
        with self._sessions_lock:
            session = self._sessions.get(taps)
            if session is None:
                cut = cut_to(onnx.load(str(self.model_path)), self.manifest.input_name, taps)
                session = ort.InferenceSession(
                    cut.SerializeToString(), sess_options=self._options, providers=self._providers
                )
                self._sessions[taps] = session
        return session

    @property
    def cache_bytes(self) -> int:
        return self._cache.nbytes

    @property
    def cache_budget_bytes(self) -> int:
        return self._cache.budget_bytes

    def check_layers(self, layers: Sequence[str], field: str) -> None:
        known = self.manifest.layer_names
        unknown = [name for name in layers if name not in known]
        if unknown:
            raise InvalidArgument(
                f"{field}: unknown layer(s) {', '.join(unknown)}; "
                f"{self.manifest.model} has {', '.join(known)}"
            )

    def check_size(self, width: int, height: int) -> None:
        """What the model may run on: the memory and time of a run grow with its pixels."""
        if min(width, height) < MIN_SIDE_PX:
            raise InvalidArgument(
                f"size {width}×{height}: each side must be at least {MIN_SIDE_PX}"
            )
        check_run_size(width, height, self.max_side_px, self.max_pixels)

    def extract(
        self,
        image: bytes,
        width: int,
        height: int,
        gram_layers: Sequence[str],
        feature_layers: Sequence[str],
        color: str = "",
        color_reference: bytes = b"",
    ) -> Extraction:
        """`color` ("luminance" or "match") first transforms the image against the reference."""
        if color not in COLOR_TRANSFORMS:
            raise InvalidArgument(f"color: {color!r} is not one of {COLOR_TRANSFORMS[1:]}")
        if color and not color_reference:
            raise InvalidArgument(f"color {color} needs color_reference, the content image")
        self.check_layers(gram_layers, "gram_layers")
        self.check_layers(feature_layers, "feature_layers")
        self.check_size(width, height)
        made = (
            self.manifest.model,
            self.manifest.weights_sha256,
            images.sha256(image),
            width,
            height,
            color and f"{color}:{images.sha256(color_reference)}",
        )
        wanted = [("gram", name) for name in gram_layers]
        wanted += [("features", name) for name in feature_layers]
        keys = {(kind, name): content_key(*made, kind, name) for kind, name in wanted}
        found = self._lookup(keys)
        missing = [(kind, name) for kind, name in wanted if (kind, name) not in found]
        if missing:
            pixels = images.to_canvas(image, width, height)
            if color:
                reference = images.to_canvas(color_reference, width, height, "color_reference")
                pixels = (
                    colour.luminance(pixels, reference)
                    if color == "luminance"
                    else colour.match_colour(pixels, reference)
                )
            ran, kept_all = self._run(pixels, {tensor: keys[tensor] for tensor in missing})
            found.update(ran)
        # What was found is kept; what was made is kept if it fit. One found may go (LRU) before
        # blending fetches it: then blending's fetch says so and the gateway extracts again.
        kept = not missing or kept_all
        return Extraction(
            grams={name: found[("gram", name)] for name in gram_layers},
            features={name: found[("features", name)] for name in feature_layers},
            cached=not missing,
            gram_keys={name: keys[("gram", name)] for name in gram_layers},
            feature_keys={name: keys[("features", name)] for name in feature_layers},
            kept=kept,
        )

    def clear_cache(self) -> None:
        """Drop every kept tensor, as a restarted service holds none."""
        self._cache.clear()

    def tensors(self, keys: Sequence[str]) -> dict[str, np.ndarray]:
        """The tensors an extraction named by these keys; NotHeld for one evicted since."""
        found = self._cache.get_many(keys)
        gone = [key for key in keys if key not in found]
        if gone:
            raise NotHeld(
                "tensor",
                f"{len(gone)} of {len(keys)} tensors (first {gone[0][:12]}…) are no longer "
                "held by the features service; extract them again",
            )
        return found

    def _lookup(self, keys: dict[tuple[str, str], str]) -> dict[tuple[str, str], np.ndarray]:
        found = self._cache.get_many(keys.values())
        return {tensor: found[key] for tensor, key in keys.items() if key in found}

    def _run(
        self, pixels: np.ndarray, keys: dict[tuple[str, str], str]
    ) -> tuple[dict[tuple[str, str], np.ndarray], bool]:
        """The tensors, and whether all of them were kept."""
        wanted = list(keys)
        batch = np.ascontiguousarray(pixels.transpose(2, 0, 1)[None])
        layers = sorted({name for _, name in wanted})
        session = self.session_for(layers)
        outputs = dict(
            zip(
                layers,
                session.run(layers, {self.manifest.input_name: batch}, self._run_options),
                strict=True,
            )
        )
        results = {
            (kind, name): gram(outputs[name][0]) if kind == "gram" else outputs[name][0]
            for kind, name in wanted
        }
        del outputs
        if self.cpu_arena == "off":  # or a 1024 px run's activations stay in the RSS
            malloc_trim()
        with self._lock:
            self.forward_passes += 1
        kept = [self._cache.put(keys[tensor], array) for tensor, array in results.items()]
        return results, all(kept)
