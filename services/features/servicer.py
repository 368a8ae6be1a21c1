"""FeaturesService over gRPC: decode, call the core, encode."""

from __future__ import annotations

import grpc
from styleblend.internal.v1 import features_pb2, features_pb2_grpc

from services.common import wire
from services.common.config import IMAGE_STORE_BYTES
from services.common.errors import FailedPrecondition, ResourceExhausted
from services.common.faststyliser import FastStyliser
from services.common.metrics import ServiceMetrics
from services.common.server import Servicer
from services.common.store import ImageStore
from services.features.core import FeatureExtractor
from services.features.fast import FastModels

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
    ) -> None:
        self.extractor = extractor
        self.fast = fast
        self.images = ImageStore(image_store_bytes, "features")
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
        )

    def Stylise(
        self, request: features_pb2.StyliseRequest, context: grpc.ServicerContext
    ) -> features_pb2.StyliseResponse:
        if self.fast is None:
            raise FailedPrecondition("this features service has no fast models")
        image, milliseconds = self.fast.stylise(
            request.model,
            self.images.resolve(request.image, request.image_sha256, "image"),
            request.width_px,
            request.height_px,
            wire.from_tensor(request.mix, "mix"),
            request.keep_chrominance,
        )
        return features_pb2.StyliseResponse(image=image, milliseconds=milliseconds)

    def _fast_models(self) -> list[FastStyliser]:
        return list(self.fast.models.values()) if self.fast else []


def features_servicer(
    extractor: FeatureExtractor,
    fast: FastModels | None = None,
    metrics: ServiceMetrics | None = None,
    image_store_bytes: int = IMAGE_STORE_BYTES,
) -> Servicer:
    return Servicer(
        features_pb2.DESCRIPTOR.services_by_name["FeaturesService"].full_name,
        FeaturesServicer(extractor, fast, metrics, image_store_bytes),
        features_pb2_grpc.add_FeaturesServiceServicer_to_server,
    )
