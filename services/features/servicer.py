"""FeaturesService over gRPC: decode, call the core, encode."""

from __future__ import annotations

import grpc
from styleblend.internal.v1 import features_pb2, features_pb2_grpc

from services.common import wire
from services.common.server import Servicer
from services.features.core import FeatureExtractor

_COLOR_TRANSFORMS = {
    features_pb2.COLOR_TRANSFORM_UNSPECIFIED: "",
    features_pb2.COLOR_TRANSFORM_LUMINANCE: "luminance",
    features_pb2.COLOR_TRANSFORM_MATCH: "match",
}


class FeaturesServicer(features_pb2_grpc.FeaturesServiceServicer):
    def __init__(self, extractor: FeatureExtractor) -> None:
        self.extractor = extractor

    def Extract(
        self, request: features_pb2.ExtractRequest, context: grpc.ServicerContext
    ) -> features_pb2.ExtractResponse:
        extraction = self.extractor.extract(
            request.image,
            request.width_px,
            request.height_px,
            list(request.gram_layers),
            list(request.feature_layers),
            _COLOR_TRANSFORMS.get(request.color, "?"),
            request.color_reference,
        )
        return features_pb2.ExtractResponse(
            grams=wire.to_layer_tensors(extraction.grams),
            features=wire.to_layer_tensors(extraction.features),
            cached=extraction.cached,
        )

    def GetModel(
        self, request: features_pb2.GetModelRequest, context: grpc.ServicerContext
    ) -> features_pb2.GetModelResponse:
        return features_pb2.GetModelResponse(
            manifest_json=self.extractor.manifest.to_json(),
            execution_providers=self.extractor.providers,
        )


def features_servicer(extractor: FeatureExtractor) -> Servicer:
    return Servicer(
        features_pb2.DESCRIPTOR.services_by_name["FeaturesService"].full_name,
        FeaturesServicer(extractor),
        features_pb2_grpc.add_FeaturesServiceServicer_to_server,
    )
