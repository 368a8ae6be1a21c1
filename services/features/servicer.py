"""FeaturesService over gRPC: decode, call the core, encode."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc
import numpy as np
from styleblend.internal.v1 import features_pb2, features_pb2_grpc

from services.common import images, wire
from services.common.config import IMAGE_STORE_BYTES
from services.common.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from services.common.faststyliser import FastStyliser
from services.common.metrics import ServiceMetrics
from services.common.server import Servicer
from services.common.store import MEMORY, ImageStore, Stores
from services.common.stylemix import Region, StyleSource
from services.features.core import FeatureExtractor
from services.features.fast import FastModels
from services.features.universal import (
    ContentSource,
    UniversalStyle,
    UniversalStyliser,
    brings_style,
    content_pixels,
    prepare_style,
)

_COLOR_TRANSFORMS = {
    features_pb2.COLOR_TRANSFORM_UNSPECIFIED: "",
    features_pb2.COLOR_TRANSFORM_LUMINANCE: "luminance",
    features_pb2.COLOR_TRANSFORM_MATCH: "match",
}


class FeaturesServicer(features_pb2_grpc.FeaturesServiceServicer):
    def __init__(
        self,
        extractor: FeatureExtractor,
        fast: FastModels | None = None,
        metrics: ServiceMetrics | None = None,
        image_store_bytes: int = IMAGE_STORE_BYTES,
        holder: str = "",
        universal: UniversalStyliser | None = None,
        stores: Stores = MEMORY,
    ) -> None:
        self.extractor = extractor
        self.universal = universal
        self.holder = holder  # where blending fetches what this replica keeps; "": anywhere
        self.fast = fast
        self.images = ImageStore(image_store_bytes, "features", stores)
        metrics = metrics or ServiceMetrics("features")
        self.cache_lookups = metrics.counter(
            "styleblend_features_cache_lookups",
            "Extract calls by whether the cache held everything they asked for",
            ("result",),
        )
        metrics.gauge_from(
            "styleblend_features_cache_bytes",
            "bytes of Gram matrices and feature maps the cache holds",
            lambda: extractor.cache_bytes,
        )
        metrics.gauge_from(
            "styleblend_features_cache_budget_bytes",
            "the cache's memory budget",
            lambda: extractor.cache_budget_bytes,
        )

    def Extract(
        self, request: features_pb2.ExtractRequest, context: grpc.ServicerContext
    ) -> features_pb2.ExtractResponse:
        image = self.images.resolve(request.image, request.image_sha256, "image")
        reference = self.images.resolve(
            request.color_reference, request.color_reference_sha256, "color_reference"
        )
        extraction = self.extractor.extract(
            image,
            request.width_px,
            request.height_px,
            list(request.gram_layers),
            list(request.feature_layers),
            _COLOR_TRANSFORMS.get(request.color, "?"),
            reference,
        )
        self.cache_lookups.labels("hit" if extraction.cached else "miss").inc()
        self.images.keep(request.image, request.color_reference)
        if request.by_reference:
            if not extraction.kept:
                raise ResourceExhausted(
                    f"the tensors of a {request.width_px}×{request.height_px} extraction do not "
                    "fit the feature cache, so they cannot be kept for blending; raise "
                    "STYLEBLEND_CACHE_BYTES"
                )
            return features_pb2.ExtractResponse(
                gram_keys=extraction.gram_keys,
                feature_keys=extraction.feature_keys,
                cached=extraction.cached,
                holder=self.holder,
            )
        return features_pb2.ExtractResponse(
            grams=wire.to_layer_tensors(extraction.grams),
            features=wire.to_layer_tensors(extraction.features),
            cached=extraction.cached,
        )

    def FetchTensors(
        self, request: features_pb2.FetchTensorsRequest, context: grpc.ServicerContext
    ) -> features_pb2.FetchTensorsResponse:
        tensors = self.extractor.tensors(list(request.keys))
        return features_pb2.FetchTensorsResponse(
            tensors={key: wire.to_tensor(array) for key, array in tensors.items()}
        )

    def GetModel(
        self, request: features_pb2.GetModelRequest, context: grpc.ServicerContext
    ) -> features_pb2.GetModelResponse:
        return features_pb2.GetModelResponse(
            manifest_json=self.extractor.manifest.to_json(),
            execution_providers=self.extractor.providers,
            fast_manifests_json=[model.manifest.to_json() for model in self._fast_models()],
            universal_manifest_json=self.universal.universal.to_json() if self.universal else "",
        )

    def Stylise(
        self, request: features_pb2.StyliseRequest, context: grpc.ServicerContext
    ) -> features_pb2.StyliseResponse:
        if self.fast is None:
            raise FailedPrecondition("this features service has no fast models")
        image = self.images.resolve(request.image, request.image_sha256, "image")
        mix = (
            self._style_mix(request)
            if request.HasField("style_mix")
            else wire.from_tensor(request.mix, "mix")
        )
        pixels, milliseconds = self.fast.stylise(
            request.model,
            image,
            request.width_px,
            request.height_px,
            mix,
            request.keep_chrominance,
        )
        mix_of = request.style_mix
        self.images.keep(
            request.image,
            *(source.style_map for source in mix_of.sources),
            *(region.mask for region in mix_of.regions),
        )
        return features_pb2.StyliseResponse(image=pixels, milliseconds=milliseconds)

    def _style_mix(self, request: features_pb2.StyliseRequest) -> np.ndarray:
        """The mix the request's weights and maps make, at its output size."""
        assert self.fast is not None
        width, height, given = request.width_px, request.height_px, request.style_mix
        self.fast.check_size(width, height)  # before any map is decoded at that size
        sources = [
            StyleSource(
                style=source.style,
                style_weight=source.style_weight,
                style_map=self._mask(source.style_map, source.style_map_sha256, width, height,
                                     f"style_mix.sources[{i}].style_map"),
            )
            for i, source in enumerate(given.sources)
        ]  # fmt: skip
        regions = self._regions(given.regions, width, height, "style_mix.")
        return self.fast.style_mix(request.model, width, height, sources, regions, given.strength)

    def Universal(
        self, request: features_pb2.UniversalRequest, context: grpc.ServicerContext
    ) -> features_pb2.UniversalResponse:
        if self.universal is None:
            raise FailedPrecondition(
                "this features service has no universal decoders; train them with "
                "`make universal-model` (STYLEBLEND_UNIVERSAL_DIR names their folder)"
            )
        styliser, width, height = self.universal, request.width_px, request.height_px
        styliser.check_size(width, height, "width_px × height_px")  # before anything is decoded
        if not request.sources:
            raise InvalidArgument("sources: at least one source is needed")
        preserve = _COLOR_TRANSFORMS.get(request.color, "?")
        regions = self._regions(request.regions, width, height)
        contents = [
            ContentSource(
                images.to_canvas(self._image(s, i), width, height, f"sources[{i}].image"),
                s.content_weight,
                self._mask(s.content_map, s.content_map_sha256, width, height,
                           f"sources[{i}].content_map"),
            )
            for i, s in enumerate(request.sources) if s.content_weight > 0
        ]  # fmt: skip
        if not contents:
            raise InvalidArgument("sources: at least one needs a content_weight > 0")
        reference = content_pixels(contents)
        styles, taken = [], {}
        for i, source in enumerate(request.sources):
            statistics = {}
            if brings_style(i, source.style_weight, regions):
                w, h = source.style_width_px, source.style_height_px
                styliser.check_size(w, h, f"sources[{i}].style_width_px × style_height_px")
                image = self._image(source, i)
                key = f"{source.image_sha256 or images.sha256(image)}:{w}x{h}:{preserve}"
                if preserve == "match":  # its colours depend on the content's
                    key += f":{images.sha256(reference.tobytes())}"
                # A slider move finds the painting's statistics: no decoding, no encoder run.
                kept = styliser.kept(key)
                if kept is None:
                    pixels = images.to_canvas(image, w, h, f"sources[{i}].image")
                    kept = taken[key] = styliser.statistics(
                        prepare_style(pixels, reference, preserve)
                    )
                statistics = kept
            style_map = self._mask(
                source.style_map, source.style_map_sha256, width, height, f"sources[{i}].style_map"
            )
            styles.append(UniversalStyle(statistics, source.style_weight, style_map))
        made = styliser.stylise(
            contents, styles, regions, request.strength, preserve, list(request.levels) or None
        )
        for key, statistics in taken.items():  # only now: a refused request keeps nothing
            styliser.keep(key, statistics)
        self.images.keep(
            *(s.image for s in request.sources),
            *(s.style_map for s in request.sources),
            *(s.content_map for s in request.sources),
            *(r.mask for r in request.regions),
        )
        return features_pb2.UniversalResponse(
            image=images.encode(made.pixels), milliseconds=1000 * sum(made.seconds.values())
        )

    def _image(self, source: features_pb2.UniversalSource, index: int) -> bytes:
        return self.images.resolve(source.image, source.image_sha256, f"sources[{index}].image")

    def _mask(
        self, data: bytes, sha256: str, width: int, height: int, what: str
    ) -> np.ndarray | None:
        encoded = self.images.resolve(data, sha256, what)
        return images.to_mask(encoded, width, height, what) if encoded else None

    def _regions(
        self, given: Sequence[Any], width: int, height: int, prefix: str = ""
    ) -> list[Region]:
        """The guidance channels' masks at width × height; a region without one is refused."""
        regions = []
        for k, region in enumerate(given):
            what = f"{prefix}regions[{k}].mask"
            found = self._mask(region.mask, region.mask_sha256, width, height, what)
            if found is None:
                raise InvalidArgument(f"{what} is missing")
            regions.append(Region(mask=found, style_weights=list(region.style_weights)))
        return regions

    def _fast_models(self) -> list[FastStyliser]:
        return list(self.fast.models.values()) if self.fast else []


def features_servicer(
    extractor: FeatureExtractor,
    fast: FastModels | None = None,
    metrics: ServiceMetrics | None = None,
    image_store_bytes: int = IMAGE_STORE_BYTES,
    holder: str = "",
    universal: UniversalStyliser | None = None,
    stores: Stores = MEMORY,
) -> Servicer:
    return Servicer(
        features_pb2.DESCRIPTOR.services_by_name["FeaturesService"].full_name,
        FeaturesServicer(extractor, fast, metrics, image_store_bytes, holder, universal, stores),
        features_pb2_grpc.add_FeaturesServiceServicer_to_server,
    )
