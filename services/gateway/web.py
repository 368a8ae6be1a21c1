"""The browser studio's bridge: static files, and the public API over HTTP and a WebSocket.

A thin adapter beside the gateway's gRPC server and a gRPC client of it: each WebSocket text
frame from the page is a `SessionRequest` in protobuf's canonical JSON, each frame to the page
a `SessionResponse` in the same form. No blending logic lives here; the gateway checks
everything. A failed call reaches the page as `{"error": {"code": "...", "message": "..."}}`.

Tokens: the bridge holds none. The page sends the gateway's token, when there is one, as
`Authorization: Bearer …` on HTTP calls and as a first WebSocket frame `{"token": "…"}` (a
browser cannot set headers on a WebSocket); the bridge passes it on as gRPC metadata and the
gateway checks it, so the studio and gRPC clients meet the same rule. The bridge also names the
browser's address (`x-styleblend-client`), so session limits count browsers, not the bridge.

Origins: without a token any page open in the browser could drive a studio on loopback, so the
socket's upgrade and every state-changing call must come from the studio's own page (or an
origin configured for a proxy in front); a request without an Origin is not from a browser page.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
from aiohttp import WSCloseCode, WSMsgType, web
from google.protobuf import json_format
from google.protobuf.message import Message
from styleblend.v1 import styleblend_pb2, styleblend_pb2_grpc
from yarl import URL

from services.common.security import (
    AUTHORIZATION,
    CLIENT_KEY,
    WILDCARD_HOSTS,
)

if TYPE_CHECKING:
    from styleblend.v1.styleblend_pb2_grpc import StyleBlendAsyncStub

log = logging.getLogger(__name__)

MiB = 1024 * 1024
_CLIENTS = Path(__file__).resolve().parents[2] / "clients"
WEB_DIR = _CLIENTS / "web"
SAMPLES_DIR = _CLIENTS / "samples"
SAMPLE_KINDS = ("content", "style")
UNARY_TIMEOUT_S = 30.0  # GetInfo and UploadImage answer at once unless the gateway is stuck
# A SessionRequest's JSON nests six deep (update, regions, region, mask, …); no frame needs more.
MAX_FRAME_DEPTH = 32
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")

# What a unary call's status means to a browser; anything else is a bad gateway.
_HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.FAILED_PRECONDITION: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 413,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}


def to_json(message: Message) -> str:
    return json_format.MessageToJson(message, indent=None)


def error_json(code: str, message: str) -> str:
    return json.dumps({"error": {"code": code, "message": message}})


def rpc_error_json(error: grpc.aio.AioRpcError) -> str:
    return error_json(error.code().name, error.details() or "the gateway gave no details")


Metadata = tuple[tuple[str, str], ...]


def call_metadata(remote: str | None, authorization: str | None) -> Metadata:
    """What a bridged call carries: the browser's address, and its token if it sent one."""
    metadata: list[tuple[str, str]] = [(CLIENT_KEY, remote or "unknown")]
    if authorization:
        metadata.append((AUTHORIZATION, authorization))
    return tuple(metadata)


class FrameRefused(Exception):
    """A frame that is not a request; `closes`: one that ends the socket, not only itself."""

    def __init__(self, message: str, *, closes: bool = False) -> None:
        super().__init__(message)
        self.closes = closes


def frame_json(text: str) -> dict[str, Any]:
    """A frame's JSON object, nested at most MAX_FRAME_DEPTH deep (Python's parser would
    recurse until it gives up on deeper nesting)."""
    too_deep = FrameRefused(
        f"the frame's JSON nests more than {MAX_FRAME_DEPTH} levels deep; no request does",
        closes=True,
    )
    try:
        value = json.loads(text)
    except RecursionError:
        raise too_deep from None
    except ValueError as error:
        raise FrameRefused(f"not a SessionRequest: not JSON ({error})") from None
    if json_depth(value) > MAX_FRAME_DEPTH:
        raise too_deep
    if not isinstance(value, dict):
        raise FrameRefused("not a SessionRequest: a frame is one JSON object")
    return value


def json_depth(value: object) -> int:
    """How deep lists and objects nest in `value` (a scalar is 0), without recursing."""
    deepest, pending = 0, [(value, 0)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, depth + 1)
            pending.extend(
                (child, depth + 1) for child in (item.values() if isinstance(item, dict) else item)
            )
    return deepest


def token_of(value: object) -> str | None:
    """The token of a `{"token": "…"}` frame; None for any other frame."""
    if isinstance(value, dict) and set(value) == {"token"} and isinstance(value["token"], str):
        return value["token"]
    return None


Origin = tuple[str, str, int]  # scheme, host, port


def origin_of(text: str) -> Origin | None:
    """`http://LocalHost` → ("http", "localhost", 80); None for what is not an origin ("null")."""
    try:
        url = URL(text)
    except ValueError:
        return None
    if not url.scheme or not url.host or url.port is None or url.user or url.path not in ("", "/"):
        return None
    return url.scheme.lower(), url.host.lower(), url.port


class Origins:
    """Which pages may drive the studio: its own, and `extra` (e.g. a proxy's public origin).

    Its own is the origin the request came to (its Host), but only where that names the machine
    without DNS: an IP address, `localhost`, or the host the studio was told to listen on. A page
    whose name an attacker's DNS points at 127.0.0.1 (DNS rebinding) has a Host of that name and
    is refused.
    """

    def __init__(self, listen_host: str, extra: Iterable[str] = ()) -> None:
        self.listen_host = "" if listen_host in WILDCARD_HOSTS else listen_host.strip("[]").lower()
        self.extra = {origin for text in extra if (origin := origin_of(text.rstrip("/")))}

    def allows(self, origin: str | None, scheme: str, host: str) -> bool:
        if origin is None:  # not a page: browsers send Origin on every upgrade and POST
            return True
        given = origin_of(origin)
        if given is None:
            return False
        if given in self.extra:
            return True
        return given == origin_of(f"{scheme}://{host}") and self._fixed(given[1])

    def _fixed(self, name: str) -> bool:
        """A name that no one else's DNS can point here."""
        if name in ("localhost", self.listen_host):
            return True
        try:
            ipaddress.ip_address(name)
        except ValueError:
            return False
        return True


@dataclass(frozen=True)
class Sample:
    kind: str  # "content" or "style"
    name: str  # file name, e.g. "astronaut.jpg"

    @property
    def url(self) -> str:
        return f"samples/{self.kind}/{self.name}"  # relative: the studio may sit under a prefix


def find_samples(folder: Path) -> list[Sample]:
    return [
        Sample(kind, path.name)
        for kind in SAMPLE_KINDS
        for path in sorted((folder / kind).glob("*.jpg"))
    ]


class Session:
    """One WebSocket bridged to one `Session` call; the call starts with the first good frame."""

    def __init__(
        self, socket: web.WebSocketResponse, stub: StyleBlendAsyncStub, remote: str | None
    ) -> None:
        self.socket = socket
        self.stub = stub
        self.remote = remote
        self.authorization: str | None = None  # from a token frame before the first request
        self._started = False
        self._requests: asyncio.Queue[styleblend_pb2.SessionRequest | None] = asyncio.Queue()
        self._send_lock = asyncio.Lock()  # the reader's error frames and the events interleave

    async def run(self) -> None:
        reader = asyncio.create_task(self._read_frames())
        first = await self._requests.get()
        if first is None:  # the page left before sending anything usable
            await reader
            return
        metadata = call_metadata(self.remote, self.authorization)
        if refusal := await self._refusal(metadata):
            await self.send(refusal)
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
            return
        call = self.stub.Session(self._outgoing(first), metadata=metadata)
        writer = asyncio.create_task(self._write_events(call))
        # Whichever ends first ends both: a finished call closes the socket, a closed socket
        # cancels the call (the gateway then stops the reconstruction within one iteration).
        await asyncio.wait({reader, writer}, return_when=asyncio.FIRST_COMPLETED)
        call.cancel()
        for task in (reader, writer):
            task.cancel()
        for outcome in await asyncio.gather(reader, writer, return_exceptions=True):
            if isinstance(outcome, Exception):  # e.g. the page vanished mid-send
                log.warning("session bridge ended with %r", outcome)

    async def _refusal(self, metadata: Metadata) -> str | None:
        """The error frame for a gateway that refuses this page's token, or None.

        Asked with a unary call first because a stream refused at once races the first write:
        grpc.aio then reports INTERNAL ("Internal error from Core") instead of the gateway's
        UNAUTHENTICATED, and the person would not learn that the token is wrong.
        """
        try:
            await self.stub.GetInfo(
                styleblend_pb2.GetInfoRequest(), timeout=UNARY_TIMEOUT_S, metadata=metadata
            )
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.UNAUTHENTICATED:
                return rpc_error_json(error)
        return None  # any other failure shows itself on the session's own call

    async def stop(self) -> None:
        """Tell the page that the server is stopping, then close; closing ends the call."""
        # In a frame, not only in the close: a browser may not pass a close's reason on.
        await self.send(
            error_json("UNAVAILABLE", "the studio server is stopping; try again shortly")
        )
        await self.socket.close(code=WSCloseCode.GOING_AWAY, message=b"the server is stopping")

    async def send(self, frame: str) -> None:
        async with self._send_lock:
            if not self.socket.closed:
                await self.socket.send_str(frame)

    async def _outgoing(
        self, first: styleblend_pb2.SessionRequest
    ) -> AsyncIterator[styleblend_pb2.SessionRequest]:
        yield first
        while (request := await self._requests.get()) is not None:
            yield request

    async def _read_frames(self) -> None:
        try:
            async for frame in self.socket:
                if frame.type != WSMsgType.TEXT:
                    await self.send(error_json("INVALID_ARGUMENT", "frames must be JSON text"))
                    continue
                try:
                    value = frame_json(frame.data)
                except FrameRefused as refused:
                    await self.send(error_json("INVALID_ARGUMENT", str(refused)))
                    if refused.closes:
                        await self.socket.close(
                            code=WSCloseCode.POLICY_VIOLATION, message=b"frame refused"
                        )
                        return
                    continue
                token = token_of(value)
                if token is not None:
                    if self._started:
                        await self.send(
                            error_json("INVALID_ARGUMENT", "the token goes before `start`")
                        )
                    else:
                        self.authorization = f"Bearer {token}"
                    continue
                try:
                    request = json_format.ParseDict(value, styleblend_pb2.SessionRequest())
                except json_format.ParseError as error:
                    await self.send(
                        error_json("INVALID_ARGUMENT", f"not a SessionRequest: {error}")
                    )
                    continue
                self._started = True
                await self._requests.put(request)
        finally:
            await self._requests.put(None)  # ends the request stream: a half-close

    async def _write_events(
        self,
        call: grpc.aio.StreamStreamCall[
            styleblend_pb2.SessionRequest, styleblend_pb2.SessionResponse
        ],
    ) -> None:
        try:
            async for response in call:
                await self.send(to_json(response))
        except grpc.aio.AioRpcError as error:
            await self.send(rpc_error_json(error))


class Bridge:
    """The aiohttp application's handlers; lives on the bridge's own event loop."""

    def __init__(
        self,
        gateway_address: str,
        max_message_bytes: int,
        web_dir: Path,
        samples_dir: Path,
        credentials: grpc.ChannelCredentials | None = None,
        origins: Origins | None = None,
    ) -> None:
        limit = max_message_bytes
        options = [
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", limit),
        ]
        self.channel = (
            grpc.aio.insecure_channel(gateway_address, options=options)
            if credentials is None
            else grpc.aio.secure_channel(gateway_address, credentials, options=options)
        )
        self.stub: StyleBlendAsyncStub = styleblend_pb2_grpc.StyleBlendStub(self.channel)
        self.max_message_bytes = max_message_bytes
        self.web_dir = web_dir
        self.samples = find_samples(samples_dir)
        self.samples_dir = samples_dir
        self.origins = origins or Origins("127.0.0.1")
        self.sessions: set[Session] = set()

    def application(self) -> web.Application:
        # A source image goes up whole in one POST, so the body limit is the message limit.
        app = web.Application(
            client_max_size=self.max_message_bytes, middlewares=[self.from_allowed_origin]
        )
        app.router.add_get("/", self.index)
        app.router.add_get("/ws/session", self.session)
        app.router.add_get("/api/info", self.info)
        app.router.add_post("/api/upload", self.upload)
        app.router.add_get("/api/samples", self.list_samples)
        app.router.add_static("/samples/", self.samples_dir)
        app.router.add_static("/", self.web_dir)  # last: it claims every other path
        app.on_shutdown.append(self.stop_sessions)
        return app

    @web.middleware
    async def from_allowed_origin(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        """A WebSocket upgrade or a state-changing call from another page: 403."""
        upgrade = request.headers.get("Upgrade", "").lower() == "websocket"
        if request.method in SAFE_METHODS and not upgrade:
            return await handler(request)
        origin = request.headers.get("Origin")
        if self.origins.allows(origin, request.scheme, request.host):
            return await handler(request)
        log.warning("refused %s %s from origin %s", request.method, request.path, origin)
        return web.Response(
            text=error_json(
                "PERMISSION_DENIED",
                f"origin {origin} may not use this studio: only its own page may "
                "(add an origin with STYLEBLEND_STUDIO_ORIGINS, e.g. for a proxy in front)",
            ),
            status=403,
            content_type="application/json",
        )

    async def index(self, request: web.Request) -> web.FileResponse:
        return web.FileResponse(self.web_dir / "index.html")

    async def session(self, request: web.Request) -> web.WebSocketResponse:
        # Frames from the page carry style maps; a result frame may be a large PNG in base64.
        socket = web.WebSocketResponse(max_msg_size=self.max_message_bytes, heartbeat=30)
        await socket.prepare(request)
        session = Session(socket, self.stub, request.remote)
        self.sessions.add(session)
        try:
            await session.run()
        finally:
            self.sessions.discard(session)
            await socket.close()
        return socket

    async def info(self, request: web.Request) -> web.Response:
        try:
            info = await self.stub.GetInfo(
                styleblend_pb2.GetInfoRequest(),
                timeout=UNARY_TIMEOUT_S,
                metadata=call_metadata(request.remote, request.headers.get("Authorization")),
            )
        except grpc.aio.AioRpcError as error:
            return rpc_error_response(error)
        return web.Response(text=to_json(info), content_type="application/json")

    async def upload(self, request: web.Request) -> web.Response:
        data = await request.read()
        try:
            uploaded = await self.stub.UploadImage(
                styleblend_pb2.UploadImageRequest(data=data),
                timeout=UNARY_TIMEOUT_S,
                metadata=call_metadata(request.remote, request.headers.get("Authorization")),
            )
        except grpc.aio.AioRpcError as error:
            return rpc_error_response(error)
        return web.Response(text=to_json(uploaded), content_type="application/json")

    async def list_samples(self, request: web.Request) -> web.Response:
        listing = {
            kind: [{"name": s.name, "url": s.url} for s in self.samples if s.kind == kind]
            for kind in SAMPLE_KINDS
        }
        return web.json_response(listing)

    async def stop_sessions(self, app: web.Application) -> None:
        for session in list(self.sessions):
            await session.stop()


def rpc_error_response(error: grpc.aio.AioRpcError) -> web.Response:
    return web.Response(
        text=rpc_error_json(error),
        status=_HTTP_STATUS.get(error.code(), 502),
        content_type="application/json",
    )


class WebServer:
    """The bridge on its own event loop in a background thread; `port` is the bound port."""

    def __init__(
        self,
        host: str,
        port: int,
        gateway_address: str,
        *,
        max_message_bytes: int,
        web_dir: Path,
        samples_dir: Path,
        credentials: grpc.ChannelCredentials | None = None,
        origins: Iterable[str] = (),
    ) -> None:
        self.host = host
        self.port = port
        self.gateway_address = gateway_address
        self.max_message_bytes = max_message_bytes
        self.web_dir = web_dir
        self.samples_dir = samples_dir
        self.credentials = credentials
        self.origins = Origins(host, origins)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True, name="web")
        self._runner: web.AppRunner | None = None
        self._bridge: Bridge | None = None

    def start(self, timeout_s: float = 30.0) -> None:
        self._thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self._serve(), self._loop).result(timeout_s)
        except BaseException:
            self._loop.call_soon_threadsafe(self._loop.stop)
            raise

    def stop(self, timeout_s: float = 5.0) -> None:
        """Close the open sessions (their gRPC calls are cancelled) and stop serving."""
        if not self._thread.is_alive():
            return
        asyncio.run_coroutine_threadsafe(self._close(), self._loop).result(timeout_s)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout_s)

    async def _serve(self) -> None:
        # The gRPC channel belongs to the loop that uses it, so it is made here.
        self._bridge = Bridge(
            self.gateway_address,
            self.max_message_bytes,
            self.web_dir,
            self.samples_dir,
            self.credentials,
            self.origins,
        )
        self._runner = web.AppRunner(
            self._bridge.application(), access_log=None, shutdown_timeout=2.0
        )
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port).start()
        self.port = self._runner.addresses[0][1]

    async def _close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._bridge is not None:
            await self._bridge.channel.close()


def start_web(
    host: str,
    port: int,
    gateway_address: str,
    *,
    max_message_bytes: int = 64 * MiB,
    web_dir: Path = WEB_DIR,
    samples_dir: Path = SAMPLES_DIR,
    credentials: grpc.ChannelCredentials | None = None,
    origins: Iterable[str] = (),
) -> WebServer:
    """Serve the studio on host:port (0 picks a free port), bridged to the gateway's gRPC API
    (over TLS with `credentials`); pages from `origins` may use it besides its own."""
    server = WebServer(
        host,
        port,
        gateway_address,
        max_message_bytes=max_message_bytes,
        web_dir=web_dir,
        samples_dir=samples_dir,
        credentials=credentials,
        origins=origins,
    )
    server.start()
    log.info("studio at http://%s:%d/ (gateway %s)", host, server.port, gateway_address)
    return server
