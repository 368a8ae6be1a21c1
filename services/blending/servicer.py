"""BlendingService over gRPC: decode, call the core, encode."""

from __future__ import annotations

import grpc
from styleblend.internal.v1 import blending_pb2, blending_pb2_grpc

from services.blending.core import SourceFeatures, blend_targets
from services.common import wire
from services.common.server import Servicer


class BlendingServicer(blending_pb2_grpc.BlendingServiceServicer):
    def BlendTargets(
        self, request: blending_pb2.BlendTargetsRequest, context: grpc.ServicerContext
    ) -> blending_pb2.BlendTargetsResponse:
        targets = blend_targets(
            [
                SourceFeatures(
                    grams=wire.from_layer_tensors(source.grams, f"sources[{i}].grams"),
                    features=wire.from_layer_tensors(source.features, f"sources[{i}].features"),
                    style_weight=source.style_weight,
                    content_weight=source.content_weight,
                )
                for i, source in enumerate(request.sources)
            ]
        )
        return blending_pb2.BlendTargetsResponse(
            grams=wire.to_layer_tensors(targets.grams),
            features=wire.to_layer_tensors(targets.features),
            style_scale=targets.style_scale,
            content_scale=targets.content_scale,
        )


def blending_servicer() -> Servicer:
    return Servicer(
        blending_pb2.DESCRIPTOR.services_by_name["BlendingService"].full_name,
        BlendingServicer(),
        blending_pb2_grpc.add_BlendingServiceServicer_to_server,
    )
