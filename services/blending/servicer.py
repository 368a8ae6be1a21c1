"""BlendingService over gRPC: decode, call the core, encode."""

from __future__ import annotations

import grpc
import numpy as np
from styleblend.internal.v1 import blending_pb2, blending_pb2_grpc

from services.blending.core import (
    Region,
    SourceFeatures,
    StyleChannel,
    StyleSource,
    blend_targets,
    mix_styles,
)
from services.common import images, wire
from services.common.server import Servicer


def _mask(
    data: bytes,
    request: blending_pb2.BlendTargetsRequest | blending_pb2.MixStylesRequest,
    what: str,
) -> np.ndarray | None:
    return images.to_mask(data, request.width_px, request.height_px, what) if data else None


def channel_message(channel: StyleChannel) -> blending_pb2.StyleChannel:
    return blending_pb2.StyleChannel(
        mask=wire.to_tensor(channel.mask) if channel.mask is not None else None,
        grams=wire.to_layer_tensors(channel.grams),
        scale=channel.scale,
    )


class BlendingServicer(blending_pb2_grpc.BlendingServiceServicer):
    def BlendTargets(
        self, request: blending_pb2.BlendTargetsRequest, context: grpc.ServicerContext
    ) -> blending_pb2.BlendTargetsResponse:
        sources = [
            SourceFeatures(
                grams=wire.from_layer_tensors(source.grams, f"sources[{i}].grams"),
                features=wire.from_layer_tensors(source.features, f"sources[{i}].features"),
                style_weight=source.style_weight,
                content_weight=source.content_weight,
                style_map=_mask(source.style_map, request, f"sources[{i}].style_map"),
                content_map=_mask(source.content_map, request, f"sources[{i}].content_map"),
            )
            for i, source in enumerate(request.sources)
        ]
        targets = blend_targets(sources, _regions(request), dict(request.layer_strides))
        return blending_pb2.BlendTargetsResponse(
            channels=[channel_message(channel) for channel in targets.channels],
            features=wire.to_layer_tensors(targets.features),
            content_weights=wire.to_layer_tensors(targets.content_weights),
        )

    def MixStyles(
        self, request: blending_pb2.MixStylesRequest, context: grpc.ServicerContext
    ) -> blending_pb2.MixStylesResponse:
        sources = [
            StyleSource(
                style=source.style,
                style_weight=source.style_weight,
                style_map=_mask(source.style_map, request, f"sources[{i}].style_map"),
            )
            for i, source in enumerate(request.sources)
        ]
        mix = mix_styles(
            sources,
            _regions(request),
            styles=request.styles,
            identity=request.identity,
            strength=request.strength,
            size=(request.width_px, request.height_px),
        )
        return blending_pb2.MixStylesResponse(mix=wire.to_tensor(mix))


def _regions(
    request: blending_pb2.BlendTargetsRequest | blending_pb2.MixStylesRequest,
) -> list[Region]:
    return [
        Region(
            mask=images.to_mask(
                region.mask, request.width_px, request.height_px, f"regions[{k}].mask"
            ),
            style_weights=list(region.style_weights),
        )
        for k, region in enumerate(request.regions)
    ]


def blending_servicer() -> Servicer:
    return Servicer(
        blending_pb2.DESCRIPTOR.services_by_name["BlendingService"].full_name,
        BlendingServicer(),
        blending_pb2_grpc.add_BlendingServiceServicer_to_server,
    )
