"""The one-pass image of a run (the fast network's or the universal one) and its events.

It comes first, for the start and for each update, before any reconstruction; for a run that
asked for nothing else (`Plan.instant_only`) it is the result.
"""

from __future__ import annotations

from styleblend.v1 import styleblend_pb2

from services.gateway.plan import Plan
from services.gateway.targets import Targets


class InstantImage:
    def __init__(self, targets: Targets) -> None:
        self.targets = targets
        self.image = b""  # the latest one made

    def make(self, plan: Plan) -> bytes:
        """The image for `plan`; it stays the latest only once it has been made."""
        self.image = self.targets.instant(plan)
        return self.image

    def preview(self, plan: Plan, update_id: int) -> styleblend_pb2.BlendEvent:
        canvas = plan.canvas
        preview = styleblend_pb2.Preview(
            iteration=0,
            image=self.image,
            width_px=canvas.width,
            height_px=canvas.height,
            fast=plan.fast is not None,
            universal=plan.universal is not None,
            update_id=update_id,
        )
        return styleblend_pb2.BlendEvent(preview=preview)

    def result(self, plan: Plan) -> styleblend_pb2.BlendEvent:
        canvas = plan.canvas
        result = styleblend_pb2.Result(
            image=self.image, width_px=canvas.width, height_px=canvas.height
        )
        return styleblend_pb2.BlendEvent(result=result)
