"""ReconstructionService over gRPC: the optimisation on a worker thread, previews encoded here.

The optimisation thread only hands over raw pixels; encoding a preview happens on the
thread that streams to the caller, so it never slows an iteration down.
"""

from __future__ import annotations

import contextvars
import logging
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Protocol

import grpc
import torch
from styleblend.internal.v1 import blending_pb2, reconstruction_pb2, reconstruction_pb2_grpc
from styleblend.v1 import styleblend_pb2

from services.common import images, wire
from services.common.errors import FailedPrecondition, InvalidArgument, StyleBlendError
from services.common.heap import malloc_trim
from services.common.manifest import Manifest
from services.common.metrics import ServiceMetrics
from services.common.server import Servicer
from services.reconstruction import core
from services.reconstruction.memory import MiB, Planner, device_budget

_OPTIMIZERS = {styleblend_pb2.OPTIMIZER_LBFGS: "lbfgs", styleblend_pb2.OPTIMIZER_ADAM: "adam"}
_DONE = object()
log = logging.getLogger(__name__)


class TargetSource(Protocol):
    """Where targets named by key come from: the blending service (channels.BlendedTargets)."""

    def targets(self, key: str, at: str = "") -> blending_pb2.BlendTargetsResponse:
        """`at`: the replica that holds them; "": the service's own address."""
        ...


def to_scale(
    message: reconstruction_pb2.ScaleTargets, index: int, blending: TargetSource | None = None
) -> core.ScaleTargets:
    """One scale's targets: as the message carries them, or fetched by their key."""
    what = f"scales[{index}]"
    targets: reconstruction_pb2.ScaleTargets | blending_pb2.BlendTargetsResponse = message
    if message.targets_key:
        if blending is None:
            raise FailedPrecondition(
                f"{what}.targets_key: this reconstruction service has no blending service to "
                "fetch targets from (STYLEBLEND_BLENDING_ADDRESS)"
            )
        targets = blending.targets(message.targets_key, at=message.targets_holder)
    return core.ScaleTargets(
        width=message.width_px,
        height=message.height_px,
        iterations=message.iterations,
        channels=[
            core.StyleChannel(
                mask=wire.from_tensor(c.mask, f"{what}.channels[{k}].mask")
                if c.HasField("mask")
                else None,
                grams=wire.from_layer_tensors(c.grams, f"{what}.channels[{k}].grams"),
                scale=c.scale,
            )
            for k, c in enumerate(targets.channels)
        ],
        features=wire.from_layer_tensors(targets.features, f"{what}.features"),
        content_weights=wire.from_layer_tensors(targets.content_weights, f"{what}.content_weights"),
    )


def to_job(
    start: reconstruction_pb2.ReconstructJob, blending: TargetSource | None = None
) -> core.Job:
    if start.optimizer not in _OPTIMIZERS:
        raise InvalidArgument(f"optimizer: {start.optimizer} is not LBFGS or ADAM")
    scales = [to_scale(scale, i, blending) for i, scale in enumerate(start.scales)]
    if not scales:
        raise InvalidArgument("scales: at least one scale is needed")
    first = scales[0]
    init = None
    if start.init_image:
        init = images.to_canvas(start.init_image, first.width, first.height, "init_image")
    colour = None
    if start.preserve_color == styleblend_pb2.PRESERVE_COLOR_LUMINANCE:
        if not start.color_image:
            raise InvalidArgument("color_image is required with PRESERVE_COLOR_LUMINANCE")
        colour = [
            images.to_canvas(start.color_image, scale.width, scale.height, "color_image")
            for scale in scales
        ]
    return core.Job(
        scales=scales,
        optimizer=_OPTIMIZERS[start.optimizer],
        loss_weights=core.LossWeights(
            start.content_loss_weight, start.style_loss_weight, start.tv_loss_weight
        ),
        init=init,
        seed=start.seed,
        preview_every=start.preview_every,
        learning_rate=start.learning_rate,
        colour=colour,
    )


def to_update(
    message: reconstruction_pb2.ReconstructUpdate, blending: TargetSource | None = None
) -> core.Update:
    return core.Update(
        update_id=message.update_id,
        scales=[to_scale(scale, i, blending) for i, scale in enumerate(message.scales)],
        loss_weights=core.LossWeights(
            message.content_loss_weight, message.style_loss_weight, message.tv_loss_weight
        ),
        at_iteration=message.at_iteration,
    )


def losses_message(losses: core.Losses) -> styleblend_pb2.Losses:
    return styleblend_pb2.Losses(
        content=losses.content, style=losses.style, tv=losses.tv, total=losses.total
    )


def event_message(event: core.Event) -> styleblend_pb2.BlendEvent:
    if isinstance(event, core.Progress):
        return styleblend_pb2.BlendEvent(
            progress=styleblend_pb2.Progress(
                iteration=event.iteration,
                iterations_total=event.iterations_total,
                scale=event.scale,
                scales_total=event.scales_total,
                losses=losses_message(event.losses),
                iterations_per_second=event.iterations_per_second,
                update_id=event.update_id,
                update_iteration=event.update_iteration,
                width_px=event.width,
                height_px=event.height,
            )
        )
    height, width = event.pixels.shape[:2]
    if isinstance(event, core.Preview):
        return styleblend_pb2.BlendEvent(
            preview=styleblend_pb2.Preview(
                iteration=event.iteration,
                image=images.encode_preview(event.pixels),
                width_px=width,
                height_px=height,
            )
        )
    return styleblend_pb2.BlendEvent(
        result=styleblend_pb2.Result(
            image=images.encode(event.pixels),
            width_px=width,
            height_px=height,
            stats=styleblend_pb2.Stats(
                iterations=event.iterations,
                seconds=event.seconds,
                first_losses=losses_message(event.first_losses),
                final_losses=losses_message(event.final_losses),
                finished_early=event.finished_early,
            ),
        )
    )


def in_background(
    events: Iterator[core.Event],
    control: core.Control,
    handover: queue.Queue[object] | None = None,
) -> Iterator[object]:
    """Run `events` on its own thread; closing this iterator cancels it. What others put on
    `handover` meanwhile comes out in turn."""
    handover = handover if handover is not None else queue.Queue()

    def pump() -> None:
        try:
            for event in events:
                handover.put(event)
        except BaseException as error:  # handed to the consumer, which re-raises it
            handover.put(error)
        handover.put(_DONE)

    # The context goes along, so what the optimisation logs names the caller's session.
    worker = threading.Thread(
        target=contextvars.copy_context().run, args=(pump,), name="reconstruction", daemon=True
    )
    worker.start()
    item: object = None
    try:
        while (item := handover.get()) is not _DONE:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        control.cancel.set()
        reap = threading.Thread(target=hand_back, args=(worker,), name="reconstruction-reap")
        reap.start()
        if item is _DONE:  # the run is over: its thread ends at once, so the caller waits
            reap.join()


def hand_back(worker: threading.Thread) -> None:
    """Once a run's thread has ended, hand the heap's free pages back: a session's activations
    and its thread's NNPACK buffer (tens of MiB at any size) would otherwise stay resident, at
    the high-water mark of the most sessions that ever ran at once."""
    worker.join()
    malloc_trim()


class ReconstructionServicer(reconstruction_pb2_grpc.ReconstructionServiceServicer):
    def __init__(
        self,
        net: core.FeatureNet,
        manifest: Manifest,
        device: torch.device,
        metrics: ServiceMetrics | None = None,
        planner: Planner | None = None,
        blending: TargetSource | None = None,
    ) -> None:
        self.net = net
        self.blending = blending
        self.planner = planner or Planner(net, device, device_budget(device))
        self.manifest = manifest
        self.device = device
        self.strides = manifest.strides
        metrics = metrics or ServiceMetrics("reconstruction")
        self.active = metrics.gauge(
            "styleblend_reconstruction_active_sessions", "Reconstruct streams running now"
        )
        self.iterations = metrics.counter(
            "styleblend_reconstruction_iterations", "optimisation steps taken, all runs together"
        )
        self.iterations_per_second = metrics.gauge(
            "styleblend_reconstruction_iterations_per_second",
            "the latest rate a run reported (rate(…iterations_total) for all runs)",
        )

    def Reconstruct(
        self,
        request_iterator: Iterator[reconstruction_pb2.ReconstructRequest],
        context: grpc.ServicerContext,
    ) -> Iterator[reconstruction_pb2.ReconstructResponse]:
        first = next(request_iterator, None)
        if first is None or not first.HasField("start"):
            raise InvalidArgument("the first message must carry `start`")
        self.check_model(first.start)
        job, reservation = self.planner.plan(to_job(first.start, self.blending))
        control = core.Control()
        context.add_callback(control.cancel.set)
        handover: queue.Queue[object] = queue.Queue()
        threading.Thread(
            target=contextvars.copy_context().run,
            args=(follow, request_iterator, control, self.blending, handover.put),
            daemon=True,
            name="session-follow",
        ).start()
        events = core.reconstruct(self.net, job, control, self.device, self.strides)
        log.info(
            "reconstructing: %d scale(s), %s, %s, about %d MiB",
            len(job.scales), job.optimizer, "tiled" if job.tiling else "whole",
            reservation.nbytes // MiB,
        )  # fmt: skip
        with reservation, self.active.track_inprogress():
            for event in in_background(events, control, handover):
                if isinstance(event, styleblend_pb2.BlendEvent):  # an update follow() refused
                    yield reconstruction_pb2.ReconstructResponse(event=event)
                    continue
                assert isinstance(event, core.Progress | core.Preview | core.Result)
                if isinstance(event, core.Progress):
                    self.iterations.inc()
                    self.iterations_per_second.set(event.iterations_per_second)
                yield reconstruction_pb2.ReconstructResponse(event=event_message(event))

    def check_model(self, start: reconstruction_pb2.ReconstructJob) -> None:
        own = (self.manifest.model, self.manifest.weights_sha256)
        if (start.model, start.weights_sha256) != own:
            raise FailedPrecondition(
                f"model mismatch: the targets come from {start.model} with weights "
                f"{start.weights_sha256[:12]}, this reconstruction service has {own[0]} with "
                f"weights {own[1][:12]}; export the same model for both services"
            )

    def GetDevice(
        self, request: reconstruction_pb2.GetDeviceRequest, context: grpc.ServicerContext
    ) -> reconstruction_pb2.GetDeviceResponse:
        return reconstruction_pb2.GetDeviceResponse(
            model=self.manifest.model,
            weights_sha256=self.manifest.weights_sha256,
            device=str(self.device),
        )


def follow(
    request_iterator: Iterator[reconstruction_pb2.ReconstructRequest],
    control: core.Control,
    blending: TargetSource | None = None,
    report: Callable[[styleblend_pb2.BlendEvent], None] = lambda _: None,
) -> None:
    """Apply the caller's later messages; the caller closing its side changes nothing. An
    update whose targets cannot be had (evicted from blending, say) is reported refused, its
    hold let go, and the run goes on."""
    try:
        for request in request_iterator:
            if request.HasField("finish"):
                control.finish.set()
            elif request.HasField("hold"):
                control.updates.hold(request.hold.update_id, request.hold.at_iteration)
            elif request.HasField("update"):
                update_id = request.update.update_id
                try:
                    control.updates.post(to_update(request.update, blending))
                except (StyleBlendError, RuntimeError) as error:  # RuntimeError: blending failed
                    log.warning("update %d refused: %s", update_id, error)
                    control.updates.hold(update_id, 0)
                    code = error.code if isinstance(error, StyleBlendError) else 13  # INTERNAL
                    refused = styleblend_pb2.UpdateRejected(
                        update_id=update_id, code=code, message=str(error)
                    )
                    report(styleblend_pb2.BlendEvent(update_rejected=refused))
    except (grpc.RpcError, InvalidArgument):  # gone, or sent bytes that do not parse
        control.cancel.set()


def reconstruction_servicer(
    net: core.FeatureNet,
    manifest: Manifest,
    device: torch.device,
    metrics: ServiceMetrics | None = None,
    planner: Planner | None = None,
    blending: TargetSource | None = None,
) -> Servicer:
    return Servicer(
        reconstruction_pb2.DESCRIPTOR.services_by_name["ReconstructionService"].full_name,
        ReconstructionServicer(net, manifest, device, metrics, planner, blending),
        reconstruction_pb2_grpc.add_ReconstructionServiceServicer_to_server,
    )
