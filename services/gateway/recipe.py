"""The recipe of a result: the fully resolved request, with every image named by its sha256.

Images appear as `upload_id`s (an upload's id is its sha256), so a client replays a recipe by
uploading the same files and sending the request as it stands.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from google.protobuf.json_format import MessageToDict
from styleblend.v1 import styleblend_pb2

from services.common.manifest import Manifest
from services.gateway.plan import (
    INITS,
    OPTIMIZERS,
    PRESERVE_COLORS,
    Plan,
    PlannedImage,
    PlannedRegion,
    Update,
    proto_value,
)

RECIPE_KEY = "styleblend:recipe"  # the PNG text chunk's keyword


def _map(image: PlannedImage | None) -> styleblend_pb2.InfluenceMap | None:
    return None if image is None else styleblend_pb2.InfluenceMap(upload_id=image.sha256)


def _regions(regions: Sequence[PlannedRegion]) -> list[styleblend_pb2.Region]:
    return [
        styleblend_pb2.Region(mask=_map(r.mask), style_weights=r.style_weights) for r in regions
    ]


def resolved_request(plan: Plan) -> styleblend_pb2.BlendRequest:
    """The request that makes this plan again on any gateway, whatever its defaults."""
    return styleblend_pb2.BlendRequest(
        sources=[
            styleblend_pb2.Source(
                upload_id=s.image.sha256,
                style_weight=s.style_weight,
                content_weight=s.content_weight,
                style_map=_map(s.style_map),
                content_map=_map(s.content_map),
            )
            for s in plan.sources
        ],
        regions=_regions(plan.regions),
        max_side_px=max(plan.canvas.width, plan.canvas.height),
        scales=len(plan.scales),
        iterations_per_scale=[scale.iterations for scale in plan.scales],
        optimizer=proto_value(OPTIMIZERS, plan.optimizer),  # type: ignore[arg-type]
        style_layers=plan.style_layers,
        content_layers=plan.content_layers,
        content_loss_weight=plan.content_loss_weight,
        style_loss_weight=plan.style_loss_weight,
        tv_loss_weight=plan.tv_loss_weight,
        init=proto_value(INITS, plan.init),  # type: ignore[arg-type]
        seed=plan.seed,
        preview_every=plan.preview_every,
        learning_rate=plan.learning_rate,
        preserve_color=proto_value(PRESERVE_COLORS, plan.preserve_color),  # type: ignore[arg-type]
        style_scale=plan.style_scale,
        fast=styleblend_pb2.FastOptions(
            model=plan.fast.model.name, strength=plan.fast.strength, refine=plan.fast.refine
        )
        if plan.fast
        else None,
        universal=styleblend_pb2.UniversalOptions(
            strength=plan.universal.strength,
            refine=plan.universal.refine,
            levels=plan.universal.levels,
        )
        if plan.universal
        else None,
    )


def update_request(update: Update) -> styleblend_pb2.SessionUpdate:
    """The message that makes this update again, every map named by its sha256."""
    changes = []
    for change in update.sources:
        message = styleblend_pb2.SourceUpdate(index=change.index)
        for name, value in change.changes.items():
            if isinstance(value, PlannedImage):
                getattr(message, name).CopyFrom(_map(value))
            elif value is None:
                setattr(message, f"clear_{name}", True)
            else:
                setattr(message, name, value)
        changes.append(message)
    return styleblend_pb2.SessionUpdate(
        update_id=update.update_id,
        at_iteration=update.at_iteration,
        sources=changes,
        regions=styleblend_pb2.Regions(regions=_regions(update.regions))
        if update.regions is not None
        else None,
        fast_strength=update.fast_strength,
        universal_strength=update.universal_strength,
        **update.loss_weights,
    )


def recipe_json(
    plan: Plan,
    first: Plan,
    manifest: Manifest,
    updates: Sequence[tuple[int, Update]],
) -> str:
    """`first` is the plan the run started with; `updates` are (iteration, update) as applied."""
    recipe = {
        "model": manifest.model,
        "weights_sha256": manifest.weights_sha256,
        "canvas": [plan.canvas.width, plan.canvas.height],
        "request": MessageToDict(resolved_request(first), preserving_proto_field_name=True),
        "init_image_sha256": first.init_image.sha256 if first.init_image else None,
        "updates": [
            {
                **MessageToDict(update_request(update), preserving_proto_field_name=True),
                "at_iteration": iteration,
            }
            for iteration, update in updates
        ],
    }
    return json.dumps(recipe, indent=2)


class Applied:
    """Where each update took effect, as the progress events report it: the recipe's history."""

    def __init__(self) -> None:
        self._points: list[tuple[int, int]] = []  # (update_id, iteration), in order

    def record(self, update_id: int, iteration: int) -> None:
        if update_id and (not self._points or self._points[-1] != (update_id, iteration)):
            self._points.append((update_id, iteration))

    def history(self, received: dict[int, Update]) -> list[tuple[int, Update]]:
        """(iteration, update) for every update in effect by the end, in arrival order.

        `received`: the updates taken, by id, in arrival order. An applied update carries the
        ones coalesced into it (each applies on top of the one before), so they are all
        recorded at the iteration where it took effect.
        """
        arrived = list(received)
        history, start = [], 0
        for update_id, iteration in self._points:
            end = arrived.index(update_id) + 1
            history += [(iteration, received[u]) for u in arrived[start:end]]
            start = end
        return history
