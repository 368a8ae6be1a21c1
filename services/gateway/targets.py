"""What the gateway asks the services for a plan: the network's image, the keys of the
targets at every scale, and the reconstruction's job. Tensors stay with the services that make
them; only keys, weights and image sha256s pass through here (README, How it works)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Protocol, TypeVar

from styleblend.internal.v1 import blending_pb2, features_pb2, reconstruction_pb2

from services.common.errors import NotHeld
from services.common.manifest import Manifest
from services.gateway.plan import (
    OPTIMIZERS,
    PRESERVE_COLORS,
    Plan,
    PlannedImage,
    PlannedSource,
    Scale,
    proto_value,
)

T = TypeVar("T")


class ReconstructStream(Protocol):
    def __iter__(self) -> Iterator[reconstruction_pb2.ReconstructResponse]: ...
    def cancel(self) -> None: ...


class Upstreams(Protocol):
    """The three internal services, as the gateway needs them."""

    def get_model(self) -> features_pb2.GetModelResponse: ...
    def extract(self, request: features_pb2.ExtractRequest) -> features_pb2.ExtractResponse: ...
    def blend_targets(
        self, request: blending_pb2.BlendTargetsRequest
    ) -> blending_pb2.BlendTargetsResponse: ...
    def stylise(self, request: features_pb2.StyliseRequest) -> features_pb2.StyliseResponse: ...
    def universal(
        self, request: features_pb2.UniversalRequest
    ) -> features_pb2.UniversalResponse: ...
    def get_device(self) -> reconstruction_pb2.GetDeviceResponse: ...
    def reconstruct(
        self, requests: Iterator[reconstruction_pb2.ReconstructRequest]
    ) -> ReconstructStream: ...


class Targets:
    def __init__(self, upstreams: Upstreams, manifest: Manifest) -> None:
        self.upstreams = upstreams
        self.manifest = manifest
        self.strides = manifest.strides

    # --- the feed-forward network -------------------------------------------------------------
    def instant(self, plan: Plan) -> bytes:
        """The one-pass image for this plan: the trained network's, or the universal one."""
        return self.stylised(plan) if plan.fast is not None else self.universal(plan)

    def stylised(self, plan: Plan) -> bytes:
        """The network's image for this plan. Features makes the style mix from the weights
        and maps (by sha256) itself, so no N×H×W mix passes through here."""
        assert plan.fast is not None and plan.content_source is not None
        fast, canvas, content = plan.fast, plan.canvas, plan.content_source.image

        def request(inline: bool) -> features_pb2.StyliseRequest:
            sources = [
                features_pb2.StyleSource(
                    style=style,
                    style_weight=source.style_weight,
                    style_map=_bytes(source.style_map, inline),
                    style_map_sha256=_sha256(source.style_map),
                )
                for source, style in zip(plan.sources, fast.styles, strict=True)
            ]
            mix = features_pb2.StyleMix(
                sources=sources, regions=_regions(plan, inline), strength=fast.strength
            )
            return features_pb2.StyliseRequest(
                model=fast.model.name,
                image=_bytes(content, inline),
                image_sha256=content.sha256,
                width_px=canvas.width,
                height_px=canvas.height,
                style_mix=mix,
                keep_chrominance=plan.preserve_color == "luminance",
            )

        return sent_once(lambda inline: self.upstreams.stylise(request(inline))).image

    def universal(self, plan: Plan) -> bytes:
        """The universal decoders' image: features takes every source's statistics and blends
        them with the weights and maps (by sha256) itself, as blending does for the targets."""
        assert plan.universal is not None
        universal, canvas = plan.universal, plan.canvas
        color: int = features_pb2.COLOR_TRANSFORM_UNSPECIFIED
        if plan.preserve_color == "luminance":
            color = features_pb2.COLOR_TRANSFORM_LUMINANCE
        elif plan.preserve_color == "histogram":
            color = features_pb2.COLOR_TRANSFORM_MATCH

        def request(inline: bool) -> features_pb2.UniversalRequest:
            sources = []
            for source in plan.sources:
                width, height = plan.style_size(source, canvas)
                sources.append(
                    features_pb2.UniversalSource(
                        image=_bytes(source.image, inline),
                        image_sha256=source.image.sha256,
                        style_width_px=width,
                        style_height_px=height,
                        style_weight=source.style_weight,
                        content_weight=source.content_weight,
                        style_map=_bytes(source.style_map, inline),
                        style_map_sha256=_sha256(source.style_map),
                        content_map=_bytes(source.content_map, inline),
                        content_map_sha256=_sha256(source.content_map),
                    )
                )
            return features_pb2.UniversalRequest(
                sources=sources,
                regions=_regions(plan, inline),
                width_px=canvas.width,
                height_px=canvas.height,
                strength=universal.strength,
                color=color,  # type: ignore[arg-type]
                levels=universal.levels,
            )

        return sent_once(lambda inline: self.upstreams.universal(request(inline))).image

    # --- targets, by reference ----------------------------------------------------------------
    def scales(self, plan: Plan) -> list[reconstruction_pb2.ScaleTargets]:
        return [self._targets_at(plan, scale) for scale in plan.scales]

    def _targets_at(self, plan: Plan, scale: Scale) -> reconstruction_pb2.ScaleTargets:
        """The key blending keeps this scale's targets under: features keeps the sources'
        tensors and blending fetches them itself, so only keys and weights pass through here.
        A tensor evicted in between is extracted again, once."""
        try:
            blended = self._blended(plan, scale)
        except NotHeld as error:
            if error.kind != "tensor":
                raise
            blended = self._blended(plan, scale)
        return reconstruction_pb2.ScaleTargets(
            width_px=scale.width,
            height_px=scale.height,
            iterations=scale.iterations,
            targets_key=blended.key,
            targets_holder=blended.holder,
        )

    def _blended(self, plan: Plan, scale: Scale) -> blending_pb2.BlendTargetsResponse:
        keyed = [self._features(plan, source, scale) for source in plan.sources]

        def request(inline: bool) -> blending_pb2.BlendTargetsRequest:
            sources = []
            for source, keys in zip(plan.sources, keyed, strict=True):
                message = blending_pb2.SourceFeatures()
                message.CopyFrom(keys)
                message.style_map = _bytes(source.style_map, inline)
                message.style_map_sha256 = _sha256(source.style_map)
                message.content_map = _bytes(source.content_map, inline)
                message.content_map_sha256 = _sha256(source.content_map)
                sources.append(message)
            return blending_pb2.BlendTargetsRequest(
                sources=sources,
                regions=_regions(plan, inline),
                width_px=scale.width,
                height_px=scale.height,
                layer_strides={name: self.strides[name] for name in plan.content_layers},
                by_reference=True,
            )

        return sent_once(lambda inline: self.upstreams.blend_targets(request(inline)))

    def _features(
        self, plan: Plan, source: PlannedSource, scale: Scale
    ) -> blending_pb2.SourceFeatures:
        """A source's weights and the keys of its tensors at the features service."""
        features = blending_pb2.SourceFeatures(
            style_weight=source.style_weight, content_weight=source.content_weight
        )
        content = plan.content_source.image if plan.content_source else None
        if self._styled(plan, source):
            width, height = plan.style_size(source, scale)
            color: int = features_pb2.COLOR_TRANSFORM_UNSPECIFIED
            if plan.preserve_color == "luminance":
                color = features_pb2.COLOR_TRANSFORM_LUMINANCE
            elif plan.preserve_color == "histogram":
                color = features_pb2.COLOR_TRANSFORM_MATCH
            extracted = self._extract(source, width, height, plan.style_layers, [], color, content)
            features.gram_keys.update(extracted.gram_keys)
            features.grams_holder = extracted.holder
        if source.content_weight > 0:
            # Luminance mode optimises a grey image: its content is the source's own luminance.
            luminance = plan.preserve_color == "luminance"
            color = (
                features_pb2.COLOR_TRANSFORM_LUMINANCE
                if luminance
                else features_pb2.COLOR_TRANSFORM_UNSPECIFIED
            )
            own = source.image if luminance else None
            extracted = self._extract(
                source, scale.width, scale.height, [], plan.content_layers, color, own
            )
            features.feature_keys.update(extracted.feature_keys)
            features.features_holder = extracted.holder
        return features

    def _styled(self, plan: Plan, source: PlannedSource) -> bool:
        index = plan.sources.index(source)
        return source.style_weight > 0 or any(r.style_weights[index] > 0 for r in plan.regions)

    def _extract(
        self,
        source: PlannedSource,
        width: int,
        height: int,
        gram_layers: tuple[str, ...] | list[str],
        feature_layers: tuple[str, ...] | list[str],
        color: int,
        reference: PlannedImage | None,
    ) -> features_pb2.ExtractResponse:
        """The keys of a source's tensors; features runs the model only when it holds none."""
        reference = reference if color else None
        return sent_once(
            lambda inline: self.upstreams.extract(
                features_pb2.ExtractRequest(
                    image=_bytes(source.image, inline),
                    image_sha256=source.image.sha256,
                    width_px=width,
                    height_px=height,
                    gram_layers=gram_layers,
                    feature_layers=feature_layers,
                    color=color,  # type: ignore[arg-type]
                    color_reference=_bytes(reference, inline),
                    color_reference_sha256=_sha256(reference),
                    by_reference=True,
                )
            )
        )

    def job(
        self, plan: Plan, scales: list[reconstruction_pb2.ScaleTargets], init_image: bytes = b""
    ) -> reconstruction_pb2.ReconstructJob:
        """The start's job; `init_image`, when given (the network's image), overrides the
        plan's start."""
        if not init_image and plan.init_image is not None:
            init_image = plan.init_image.data
        elif not init_image and plan.init == "content" and plan.content_source:
            init_image = plan.content_source.image.data
        luminance = plan.preserve_color == "luminance"
        return reconstruction_pb2.ReconstructJob(
            model=self.manifest.model,
            weights_sha256=self.manifest.weights_sha256,
            scales=scales,
            optimizer=proto_value(OPTIMIZERS, plan.optimizer),  # type: ignore[arg-type]
            content_loss_weight=plan.content_loss_weight,
            style_loss_weight=plan.style_loss_weight,
            tv_loss_weight=plan.tv_loss_weight,
            init_image=init_image,
            seed=plan.seed,
            preview_every=plan.preview_every,
            learning_rate=plan.learning_rate,
            preserve_color=proto_value(PRESERVE_COLORS, plan.preserve_color),  # type: ignore[arg-type]
            color_image=plan.content_source.image.data
            if luminance and plan.content_source
            else b"",
        )


def sent_once(send: Callable[[bool], T]) -> T:
    """`send(inline)`: images go by their sha256; a service that does not hold one (a new
    replica, or one that evicted it) gets their bytes, once."""
    try:
        return send(False)
    except NotHeld as error:
        if error.kind != "image":
            raise
        return send(True)


def _bytes(image: PlannedImage | None, inline: bool) -> bytes:
    return image.data if image is not None and inline else b""


def _sha256(image: PlannedImage | None) -> str:
    return image.sha256 if image is not None else ""


def _regions(plan: Plan, inline: bool) -> list[blending_pb2.RegionWeights]:
    return [
        blending_pb2.RegionWeights(
            mask=_bytes(region.mask, inline),
            mask_sha256=region.mask.sha256,
            style_weights=region.style_weights,
        )
        for region in plan.regions
    ]
