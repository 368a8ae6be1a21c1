"""ReconstructionService over gRPC: the optimisation on a worker thread, previews encoded here.

The optimisation thread only hands over raw pixels; encoding a preview happens on the
thread that streams to the caller, so it never slows an iteration down.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

import grpc
import torch
from styleblend.internal.v1 import reconstruction_pb2, reconstruction_pb2_grpc
from styleblend.v1 import styleblend_pb2

from services.common import images, wire
from services.common.errors import FailedPrecondition, InvalidArgument
from services.common.manifest import Manifest
from services.common.server import Servicer
from services.reconstruction import core

_OPTIMIZERS = {styleblend_pb2.OPTIMIZER_LBFGS: "lbfgs", styleblend_pb2.OPTIMIZER_ADAM: "adam"}
_DONE = object()


def to_job(start: reconstruction_pb2.ReconstructJob) -> core.Job:
    if start.optimizer not in _OPTIMIZERS:
        raise InvalidArgument(f"optimizer: {start.optimizer} is not LBFGS or ADAM")
    init = None
    if start.init_image:
        init = images.to_canvas(start.init_image, start.width_px, start.height_px, "init_image")
    return core.Job(
        grams=wire.from_layer_tensors(start.grams, "grams"),
        features=wire.from_layer_tensors(start.features, "features"),
        style_scale=start.style_scale,
        content_scale=start.content_scale,
        width=start.width_px,
        height=start.height_px,
        iterations=start.iterations,
        optimizer=_OPTIMIZERS[start.optimizer],
        content_weight=start.content_loss_weight,
        style_weight=start.style_loss_weight,
        tv_weight=start.tv_loss_weight,
        init=init,
        seed=start.seed,
        preview_every=start.preview_every,
        learning_rate=start.learning_rate,
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
                scale=0,
                scales_total=1,
                losses=losses_message(event.losses),
                iterations_per_second=event.iterations_per_second,
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


def in_background(events: Iterator[core.Event], control: core.Control) -> Iterator[core.Event]:
    """Run `events` on its own thread; closing this iterator cancels it."""
    handover: queue.Queue[object] = queue.Queue()

    def pump() -> None:
        try:
            for event in events:
                handover.put(event)
        except BaseException as error:  # handed to the consumer, which re-raises it
            handover.put(error)
        handover.put(_DONE)

    worker = threading.Thread(target=pump, name="reconstruction", daemon=True)
    worker.start()
    try:
        while (item := handover.get()) is not _DONE:
            if isinstance(item, BaseException):
                raise item
            yield item  # type: ignore[misc]
    finally:
        control.cancel.set()


class ReconstructionServicer(reconstruction_pb2_grpc.ReconstructionServiceServicer):
    def __init__(self, net: core.FeatureNet, manifest: Manifest, device: torch.device) -> None:
        self.net = net
        self.manifest = manifest
        self.device = device

    def Reconstruct(
        self,
        request_iterator: Iterator[reconstruction_pb2.ReconstructRequest],
        context: grpc.ServicerContext,
    ) -> Iterator[reconstruction_pb2.ReconstructResponse]:
        first = next(request_iterator, None)
        if first is None or not first.HasField("start"):
            raise InvalidArgument("the first message must carry `start`")
        self.check_model(first.start)
        job = to_job(first.start)
        control = core.Control()
        context.add_callback(control.cancel.set)
        threading.Thread(target=follow, args=(request_iterator, control), daemon=True).start()
        events = core.reconstruct(self.net, job, control, self.device)
        for event in in_background(events, control):
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
    request_iterator: Iterator[reconstruction_pb2.ReconstructRequest], control: core.Control
) -> None:
    """Apply the caller's later messages; the caller closing its side changes nothing."""
    try:
        for request in request_iterator:
            if request.HasField("finish"):
                control.finish.set()
    except grpc.RpcError:
        control.cancel.set()


def reconstruction_servicer(
    net: core.FeatureNet, manifest: Manifest, device: torch.device
) -> Servicer:
    return Servicer(
        reconstruction_pb2.DESCRIPTOR.services_by_name["ReconstructionService"].full_name,
        ReconstructionServicer(net, manifest, device),
        reconstruction_pb2_grpc.add_ReconstructionServiceServicer_to_server,
    )
