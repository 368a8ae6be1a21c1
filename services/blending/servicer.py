"""BlendingService over gRPC: decode, call the core, encode.

By reference (what the gateway asks for): a source's tensors come as the features service's
keys and are fetched from it here, once (a cache keeps them for the next update); the targets
stay here under a key, the hash of the request, for the reconstruction service to fetch. Maps
come as bytes once, then as their sha256.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Protocol

import grpc
import numpy as np
from styleblend.internal.v1 import blending_pb2, blending_pb2_grpc, tensor_pb2

from services.blending.core import SourceFeatures, StyleChannel, blend_targets
from services.common import images, wire
from services.common.config import IMAGE_STORE_BYTES, SOURCE_CACHE_BYTES, TARGET_STORE_BYTES
from services.common.errors import FailedPrecondition, NotHeld, ResourceExhausted
from services.common.server import Servicer
from services.common.store import MEMORY, ImageStore, Store, Stores
from services.common.stylemix import Region


class TensorSource(Protocol):
    """Where tensors named by key come from: the features service (channels.FeatureTensors)."""

    def tensors(self, keys: Sequence[str], at: str = "") -> dict[str, np.ndarray]:
        """`at`: the replica that holds them; "": the service's own address."""
        ...


def channel_message(channel: StyleChannel) -> blending_pb2.StyleChannel:
    return blending_pb2.StyleChannel(
        mask=wire.to_tensor(channel.mask) if channel.mask is not None else None,
        grams=wire.to_layer_tensors(channel.grams),
        scale=channel.scale,
    )


def targets_key(request: blending_pb2.BlendTargetsRequest) -> str:
    """The hash of what makes the targets: sources (their tensors' keys), weights, maps (their
    sha256), regions, size and strides. The same request gives the same key."""
    keyed = blending_pb2.BlendTargetsRequest()
    keyed.CopyFrom(request)
    for source in keyed.sources:
        for name in ("style_map", "content_map"):
            if data := getattr(source, name):
                setattr(source, f"{name}_sha256", images.sha256(data))
                source.ClearField(name)
    for region in keyed.regions:
        if region.mask:
            region.mask_sha256 = images.sha256(region.mask)
            region.ClearField("mask")
    return hashlib.sha256(keyed.SerializeToString(deterministic=True)).hexdigest()


class BlendingServicer(blending_pb2_grpc.BlendingServiceServicer):
    def __init__(
        self,
        features: TensorSource | None = None,
        image_store_bytes: int = IMAGE_STORE_BYTES,
        target_store_bytes: int = TARGET_STORE_BYTES,
        source_cache_bytes: int = SOURCE_CACHE_BYTES,
        holder: str = "",
        stores: Stores = MEMORY,
    ) -> None:
        self.features = features
        self.holder = holder  # where reconstruction fetches what this replica keeps
        self.images = ImageStore(image_store_bytes, "blending", stores)
        self.targets: Store[blending_pb2.FetchTargetsResponse] = Store(
            target_store_bytes, lambda message: message.ByteSize()
        )
        self.fetched: Store[np.ndarray] = Store(source_cache_bytes, lambda array: array.nbytes)

    def BlendTargets(
        self, request: blending_pb2.BlendTargetsRequest, context: grpc.ServicerContext
    ) -> blending_pb2.BlendTargetsResponse:
        key = targets_key(request) if request.by_reference else ""
        if key and key in self.targets:  # the same blend again (an update that changed nothing)
            self._keep_maps(request)
            return blending_pb2.BlendTargetsResponse(key=key, holder=self.holder)
        fetched = self._fetch(request)
        sources = [
            SourceFeatures(
                grams=self._tensors(source.grams, source.gram_keys, fetched, f"sources[{i}].grams"),
                features=self._tensors(
                    source.features, source.feature_keys, fetched, f"sources[{i}].features"
                ),
                style_weight=source.style_weight,
                content_weight=source.content_weight,
                style_map=self._mask(
                    source.style_map, source.style_map_sha256, request, f"sources[{i}].style_map"
                ),
                content_map=self._mask(
                    source.content_map,
                    source.content_map_sha256,
                    request,
                    f"sources[{i}].content_map",
                ),
            )
            for i, source in enumerate(request.sources)
        ]
        targets = blend_targets(sources, self._regions(request), dict(request.layer_strides))
        response = blending_pb2.BlendTargetsResponse(
            channels=[channel_message(channel) for channel in targets.channels],
            features=wire.to_layer_tensors(targets.features),
            content_weights=wire.to_layer_tensors(targets.content_weights),
        )
        if not key:
            return response
        # Kept as FetchTargets answers it: made (and measured) once, sent as it is each fetch.
        kept = blending_pb2.FetchTargetsResponse(targets=response)
        if not self.targets.put(key, kept):
            raise ResourceExhausted(
                f"targets of {kept.ByteSize():,} bytes do not fit the target store of "
                f"{self.targets.budget_bytes:,} (STYLEBLEND_TARGET_STORE_BYTES)"
            )
        self._keep_maps(request)
        return blending_pb2.BlendTargetsResponse(key=key, holder=self.holder)

    def FetchTargets(
        self, request: blending_pb2.FetchTargetsRequest, context: grpc.ServicerContext
    ) -> blending_pb2.FetchTargetsResponse:
        targets = self.targets.get(request.key)
        if targets is None:
            raise NotHeld(
                "targets",
                f"targets {request.key[:12]}… are no longer held by the blending service "
                "(evicted, or never made here); blend them again",
            )
        return targets

    # --- references ----------------------------------------------------------------------------
    def _fetch(self, request: blending_pb2.BlendTargetsRequest) -> dict[str, np.ndarray]:
        """Every tensor the sources name by key: from the cache, the rest from the features
        replica that holds them, one call each."""
        holders: dict[str, str] = {}  # key -> the replica that holds it
        for source in request.sources:
            holders |= {key: source.grams_holder for key in source.gram_keys.values()}
            holders |= {key: source.features_holder for key in source.feature_keys.values()}
        found = {key: array for key in holders if (array := self.fetched.get(key)) is not None}
        missing: dict[str, list[str]] = {}
        for key in sorted(set(holders) - set(found)):
            missing.setdefault(holders[key], []).append(key)
        if missing and self.features is None:
            raise FailedPrecondition(
                "this blending service has no features service to fetch tensors from "
                "(STYLEBLEND_FEATURES_ADDRESS)"
            )
        for holder, keys in missing.items():
            assert self.features is not None
            for key, array in self.features.tensors(keys, at=holder).items():
                self.fetched.put(key, array)
                found[key] = array
        return found

    @staticmethod
    def _tensors(
        inline: tensor_pb2.LayerTensors,
        keys: Mapping[str, str],
        fetched: dict[str, np.ndarray],
        what: str,
    ) -> dict[str, np.ndarray]:
        tensors = wire.from_layer_tensors(inline, what)
        tensors.update({layer: fetched[key] for layer, key in keys.items()})
        return tensors

    def _mask(
        self, data: bytes, sha256: str, request: blending_pb2.BlendTargetsRequest, what: str
    ) -> np.ndarray | None:
        encoded = self.images.resolve(data, sha256, what)
        return (
            images.to_mask(encoded, request.width_px, request.height_px, what) if encoded else None
        )

    def _keep_maps(self, request: blending_pb2.BlendTargetsRequest) -> None:
        """The maps a successful request brought, for next time by sha256."""
        self.images.keep(
            *(source.style_map for source in request.sources),
            *(source.content_map for source in request.sources),
            *(region.mask for region in request.regions),
        )

    def _regions(self, request: blending_pb2.BlendTargetsRequest) -> list[Region]:
        regions = []
        for k, region in enumerate(request.regions):
            what = f"regions[{k}].mask"
            mask = self.images.resolve(region.mask, region.mask_sha256, what)
            regions.append(
                Region(
                    mask=images.to_mask(mask, request.width_px, request.height_px, what),
                    style_weights=list(region.style_weights),
                )
            )
        return regions


def blending_servicer(
    features: TensorSource | None = None,
    image_store_bytes: int = IMAGE_STORE_BYTES,
    target_store_bytes: int = TARGET_STORE_BYTES,
    source_cache_bytes: int = SOURCE_CACHE_BYTES,
    holder: str = "",
    stores: Stores = MEMORY,
) -> Servicer:
    return Servicer(
        blending_pb2.DESCRIPTOR.services_by_name["BlendingService"].full_name,
        BlendingServicer(
            features, image_store_bytes, target_store_bytes, source_cache_bytes, holder, stores
        ),
        blending_pb2_grpc.add_BlendingServiceServicer_to_server,
    )
