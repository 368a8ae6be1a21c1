"""One blend or session from features to result, with live updates along the way.

Threads: the caller iterates `events()`, which only reads one outbox; a pump thread computes
the targets, starts the reconstruction and moves its events into the outbox, where rejected
updates and errors also land; a worker turns accepted updates into new targets. Updates are
checked on arrival, so a bad one is refused in-band and the run goes on; one whose targets then
cannot be made is refused too, and the session goes on as if it had never come. Because the caller
only waits on the outbox, a cancel or a server shutting down reaches it at once, even while
an upstream call is still out. What to ask the services for a plan is targets.py's, the one-pass
image and its events instant.py's.
"""

from __future__ import annotations

import logging
import queue
import threading
import weakref
from collections.abc import Iterator

from styleblend.internal.v1 import reconstruction_pb2
from styleblend.v1 import styleblend_pb2

from services.common import images
from services.common.config import GatewayConfig
from services.common.errors import FailedPrecondition, StyleBlendError, Unavailable
from services.common.manifest import Manifest
from services.common.updates import coalesced
from services.gateway.instant import InstantImage
from services.gateway.plan import Plan, Update, apply_update
from services.gateway.recipe import RECIPE_KEY, Applied, recipe_json
from services.gateway.targets import ReconstructStream, Targets, Upstreams

log = logging.getLogger(__name__)

_END = object()
_FINISH = Update(update_id=0)  # queued behind the updates: the one-pass path's finish
_WAKE = Update(update_id=0)  # wakes the worker to end
SHUTTING_DOWN = "the gateway is shutting down"
# Of the grace period, what a run that cannot finish in time leaves before it says so: the
# server cancels calls still open at its end, and a cancelled call tells the client nothing.
_GRACE_FRACTION = 0.75


class BlendRun:
    """`update`, `finish` and `cancel` may be called from any thread while `events()` runs."""

    def __init__(
        self,
        plan: Plan,
        manifest: Manifest,
        upstreams: Upstreams,
        config: GatewayConfig,
    ) -> None:
        self.first = self.plan = plan
        self.manifest = manifest
        self.upstreams = upstreams
        self.config = config
        self.targets = Targets(upstreams, manifest)
        self._outbox: queue.Queue[object] = queue.Queue()
        self._controls: queue.Queue[object] = queue.Queue()
        self._work: queue.Queue[Update] = queue.Queue()
        # The updates taken, in arrival order, and the plan each made; one whose targets cannot
        # be made leaves both again (`_refuse`), as a refused update leaves no trace.
        self._received: dict[int, Update] = {}
        self._plans: dict[int, Plan] = {}
        self._plans_lock = threading.Lock()
        self._applied = Applied()  # where each update took effect, for the recipe
        self._stream: ReconstructStream | None = None
        self._lock = threading.Lock()  # orders starting the stream against cancel and shutdown
        self._cancelled = threading.Event()
        self._finishing = threading.Event()
        self._shutting_down = threading.Event()
        self._session = False
        self._instant = InstantImage(self.targets)

    # --- the caller's side -------------------------------------------------------------------
    def events(self, session: bool = False) -> Iterator[styleblend_pb2.BlendEvent]:
        """A Blend's events, or a Session's: a one-pass-only session waits for `finish`."""
        self._session = session
        threading.Thread(target=self._run, daemon=True, name="gateway-pump").start()
        try:
            while (item := self._outbox.get()) is not _END:
                if isinstance(item, BaseException):
                    raise item
                assert isinstance(item, styleblend_pb2.BlendEvent)
                yield self._annotated(item)
        finally:
            self._cancelled.set()
            self._work.put(_WAKE)
            self._controls.put(_END)
            with self._lock:
                stream = self._stream
            if stream is not None:
                stream.cancel()

    def update(self, update: Update) -> None:
        """Check a parsed update against the session now; refuse it in-band if it does not
        hold, else queue its targets."""
        try:
            if self._shutting_down.is_set():
                raise FailedPrecondition(f"{SHUTTING_DOWN}; updates are no longer taken")
            if self._finishing.is_set():
                raise FailedPrecondition("the session is finishing; updates are no longer taken")
            with self._plans_lock:
                if update.update_id == 0 or update.update_id in self._received:
                    raise FailedPrecondition(
                        f"update_id {update.update_id}: each update needs its own id > 0"
                    )
                plan = apply_update(self.plan, update, self.config)
                self.plan = plan  # the next update applies on top of this one
                self._received[update.update_id] = update
                self._plans[update.update_id] = plan
        except StyleBlendError as error:
            self._reject(update.update_id, error)
            return
        if update.at_iteration:
            hold = reconstruction_pb2.HoldAt(
                update_id=update.update_id, at_iteration=update.at_iteration
            )
            self._controls.put(reconstruction_pb2.ReconstructRequest(hold=hold))
        self._work.put(update)

    def reject_start(self) -> None:
        self._reject(0, FailedPrecondition("the session has started; `start` only goes first"))

    def reject(self, update_id: int, error: StyleBlendError) -> None:
        """An update that did not parse: refused in-band, and the session goes on."""
        self._reject(update_id, error)

    def finish(self) -> None:
        self._finishing.set()
        self._work.put(_FINISH)
        self._controls.put(
            reconstruction_pb2.ReconstructRequest(finish=styleblend_pb2.FinishSession())
        )

    def cancel(self) -> None:
        self._cancelled.set()
        self._controls.put(_END)
        self._outbox.put(_END)  # the caller stops waiting, even if the targets are not ready
        with self._lock:
            stream = self._stream
        if stream is not None:
            stream.cancel()

    def shut_down(self, grace_s: float) -> None:
        """The server is stopping: finish now and send the image as it stands, or, with no
        image yet, end with UNAVAILABLE. Either way within the grace period, and said in words.
        """
        with self._lock:
            self._shutting_down.set()
            # A reconstruction running, or a one-pass-only run (whose image exists once it has
            # started), can finish; a run still computing its targets has nothing to send.
            can_finish = self._stream is not None or self.plan.instant_only
        if self._cancelled.is_set():
            return
        if self._session:
            notice = Unavailable(
                f"{SHUTTING_DOWN}: the session is finished early and its result is the image "
                "as it stands; start a new session to go on"
                if can_finish
                else f"{SHUTTING_DOWN}: the session ends before its first image"
            )
            self._reject(0, notice)
        if can_finish:
            self.finish()
        else:
            self._outbox.put(Unavailable(f"{SHUTTING_DOWN}; send the request again"))
        # If the result cannot come in time, say so before the server cancels the call.
        timer = threading.Timer(grace_s * _GRACE_FRACTION, self._too_late)
        timer.daemon = True
        timer.start()

    def _too_late(self) -> None:
        self._outbox.put(
            Unavailable(f"{SHUTTING_DOWN} and the result was not ready within its grace period")
        )

    # --- threads -----------------------------------------------------------------------------
    def _run(self) -> None:
        """Targets, then the reconstruction's events into the outbox; errors go there too."""
        try:
            self._start()
        except BaseException as error:  # handed to the caller, which raises it
            self._outbox.put(error)
            self._outbox.put(_END)

    def _start(self) -> None:
        # The start's plan: by the time this thread runs, `update` may have moved `self.plan` on,
        # and each update comes through `_work_on_updates` in its turn.
        first, init_image = self.first, b""
        if first.instant is not None:
            init_image = self._instant.make(first)
            self._outbox.put(self._instant.preview(first, 0))
            if first.instant_only and not self._session:  # a Blend ends with it
                self._outbox.put(self._instant.result(first))
                self._outbox.put(_END)
                return
            if first.instant_only:  # a Session on `finish`
                self._work_on_updates()
                return
        job = self.targets.job(first, self.targets.scales(first), init_image)
        with self._lock:
            if self._cancelled.is_set():
                return
            if self._shutting_down.is_set():
                raise Unavailable(f"{SHUTTING_DOWN}; send the request again")
            self._stream = stream = self.upstreams.reconstruct(self._requests(job))
        threading.Thread(target=self._work_on_updates, daemon=True, name="gateway-updates").start()
        for response in stream:
            if response.event.HasField("update_rejected"):
                self._refused_upstream(response.event.update_rejected)
            else:
                self._outbox.put(response.event)
        self._outbox.put(_END)

    def _refused_upstream(self, rejected: styleblend_pb2.UpdateRejected) -> None:
        """Reconstruction could not take an update (its targets were evicted from blending)."""
        with self._plans_lock:
            update = self._received.get(rejected.update_id)
        if update is not None:
            self._refuse(update, FailedPrecondition(rejected.message))

    def _work_on_updates(self) -> None:
        while not self._cancelled.is_set():
            batch = [self._work.get()]
            while not self._work.empty():
                batch.append(self._work.get_nowait())
            taken = [update for update in batch if self._plan_of(update) is not None]
            # Of the updates due as soon as possible only the latest gets targets; the ones for a
            # fixed iteration all do (the reconstruction coalesces those). All go in order.
            soon, _ = coalesced(taken, lambda update: not update.at_iteration)
            for update in taken:
                if self._cancelled.is_set():
                    return
                if update.at_iteration:
                    self._apply(update)
                elif update is soon[-1]:
                    for candidate in reversed(soon):  # refused, the one before it goes instead
                        if self._apply(candidate):
                            break
            if any(update is _FINISH for update in batch) and self.plan.instant_only:
                self._outbox.put(self._instant.result(self.plan))
                self._outbox.put(_END)
                return

    def _apply(self, update: Update) -> bool:
        """Send a taken update's one-pass image and targets; False if it was refused."""
        if (plan := self._plan_of(update)) is not None and plan.instant is not None:
            self._send_instant_preview(update, plan)
        if (plan := self._plan_of(update)) is not None and not plan.instant_only:
            self._send_update(update, plan)
        return self._plan_of(update) is not None

    def _plan_of(self, update: Update) -> Plan | None:
        """The plan a taken update makes as it stands now (a refusal before it may have made it
        again); None for one refused since it was queued, and for the worker's own signals."""
        with self._plans_lock:
            return self._plans.get(update.update_id) if update.update_id else None

    def _refuse(self, update: Update, error: StyleBlendError) -> None:
        """The targets for a taken update cannot be made (an upstream failed, say): refuse it and
        go on as if it had never come. The updates after it were planned on top of it, so they
        are planned again without it, and one that no longer holds is refused too."""
        refused = [(update, error)]
        with self._plans_lock:
            if update.update_id not in self._received:
                return  # already refused
            arrived = list(self._received)
            at = arrived.index(update.update_id)
            plan = self._plans[arrived[at - 1]] if at else self.first
            for later in arrived[at + 1 :]:
                try:
                    plan = self._plans[later] = apply_update(
                        plan, self._received[later], self.config
                    )
                except StyleBlendError as again:
                    refused.append((self._received[later], again))
            for gone, _ in refused:
                del self._received[gone.update_id], self._plans[gone.update_id]
            self.plan = plan
        for gone, reason in refused:
            if gone.at_iteration:  # the reconstruction holds for it: let it go on
                release = reconstruction_pb2.HoldAt(update_id=gone.update_id, at_iteration=0)
                self._controls.put(reconstruction_pb2.ReconstructRequest(hold=release))
            self._reject(gone.update_id, reason)

    def _send_instant_preview(self, update: Update, plan: Plan) -> None:
        try:
            self._instant.make(plan)
        except StyleBlendError as error:
            self._refuse(update, error)
            return
        if self.plan.instant_only:
            self._applied.record(update.update_id, 0)
        self._outbox.put(self._instant.preview(self.plan, update.update_id))

    def _send_update(self, update: Update, plan: Plan) -> None:
        try:
            scales = self.targets.scales(plan)
        except StyleBlendError as error:  # e.g. a service down for a moment
            self._refuse(update, error)
            return
        message = reconstruction_pb2.ReconstructUpdate(
            update_id=update.update_id,
            scales=scales,
            content_loss_weight=plan.content_loss_weight,
            style_loss_weight=plan.style_loss_weight,
            tv_loss_weight=plan.tv_loss_weight,
            at_iteration=update.at_iteration,
        )
        self._controls.put(reconstruction_pb2.ReconstructRequest(update=message))

    def _reject(self, update_id: int, error: StyleBlendError) -> None:
        rejected = styleblend_pb2.UpdateRejected(
            update_id=update_id, code=error.code, message=str(error)
        )
        self._outbox.put(styleblend_pb2.BlendEvent(update_rejected=rejected))

    def _requests(
        self, job: reconstruction_pb2.ReconstructJob
    ) -> Iterator[reconstruction_pb2.ReconstructRequest]:
        yield reconstruction_pb2.ReconstructRequest(start=job)
        while (control := self._controls.get()) is not _END:
            assert isinstance(control, reconstruction_pb2.ReconstructRequest)
            yield control

    # --- events ------------------------------------------------------------------------------
    def _annotated(self, event: styleblend_pb2.BlendEvent) -> styleblend_pb2.BlendEvent:
        """Note which updates took effect where; put the recipe on the result."""
        if event.HasField("progress"):
            self._applied.record(event.progress.update_id, event.progress.update_iteration)
        elif event.HasField("result"):
            with self._plans_lock:
                received = dict(self._received)
            history = self._applied.history(received)
            recipe = recipe_json(self.plan, self.first, self.manifest, history)
            event.result.recipe_json = recipe
            event.result.image = images.with_text(event.result.image, RECIPE_KEY, recipe)
        return event


class Runs:
    """The runs in flight through one gateway, so a stopping server can finish them."""

    def __init__(self) -> None:
        self._runs: weakref.WeakSet[BlendRun] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._grace_s: float | None = None  # set once the server stops

    def track(self, run: BlendRun) -> BlendRun:
        with self._lock:
            self._runs.add(run)
            grace_s = self._grace_s
        if grace_s is not None:  # arrived as the server began to stop
            run.shut_down(grace_s)
        return run

    def shut_down(self, grace_s: float) -> None:
        """Tell every run the server is stopping; each ends within `grace_s`."""
        with self._lock:
            self._grace_s = grace_s
            runs = list(self._runs)
        log.info("finishing %d run(s) in flight, %.1f s grace", len(runs), grace_s)
        for run in runs:
            run.shut_down(grace_s)
