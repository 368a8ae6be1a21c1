"""Configuration: one frozen settings class per service, from STYLEBLEND_* environment variables.

Command-line flags go over the environment by being passed as keyword arguments.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from services.common.manifest import MIN_SIDE_PX
from services.common.providers import TENSORRT_SIDES

MiB = 1024 * 1024
_METRICS = "Prometheus metrics over HTTP on this port; 0 picks a free one; unset: none"
# The largest image the features service runs the model on, per side and in all; the gateway
# refuses a plan that would ask for more (the same STYLEBLEND_* variables, read by both). 2048²
# is the largest TensorRT profile's square; the side lets a long style image keep 32 px across.
EXTRACT_SIDE_PX = 4096
EXTRACT_PIXELS = 2048 * 2048
_EXTRACT_SIDE = "longest side of an image the features service extracts, in pixels"
_EXTRACT_PIXELS = "most pixels (width × height) of an image the features service extracts"
# Tiles, when a canvas does not fit the reconstruction's memory whole: side and context.
TILE_PX = 512
TILE_MARGIN_PX = 64
# What the features and blending services keep for references: the images callers sent
# (sent again by sha256 only), blending's targets and the source tensors it fetched.
IMAGE_STORE_BYTES = 128 * MiB
TARGET_STORE_BYTES = 256 * MiB
SOURCE_CACHE_BYTES = 256 * MiB
_IMAGE_STORE = "memory for images callers sent, so they send each once"
# ONNX Runtime's CPU memory arena: keep (its default; RSS stays at the largest run's), shrink
# (handed back after each run), off (plain malloc, and malloc_trim after each run).
CpuArena = Literal["keep", "shrink", "off"]


Precision = Literal["float32", "bfloat16", "float16"]  # the reconstruction network's format
Compile = Literal["off", "default", "reduce-overhead"]  # torch.compile's mode, or off
Convolution = Literal["auto", "winograd", "direct"]  # how the 3×3 convolutions are computed


class ServiceConfig(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="STYLEBLEND_", frozen=True, extra="ignore")

    host: str = Field("127.0.0.1", description="interface the servers listen on")
    max_message_bytes: int = Field(64 * MiB, gt=0, description="largest gRPC message")
    grace_s: float = Field(5.0, ge=0, description="seconds calls in flight get on SIGTERM")
    log_level: str = "INFO"
    log_format: Literal["json", "text"] = Field("json", description="JSON lines or plain text")
    # TLS for this server: both files set turn it on; a client CA also asks clients for theirs.
    tls_cert_file: Path | None = Field(None, description="server certificate chain (PEM)")
    tls_key_file: Path | None = Field(None, description="server private key (PEM)")
    tls_client_ca_file: Path | None = Field(
        None, description="CA that signs client certificates; set: mutual TLS is required"
    )
    # The graph's own credential: the gateway sends it, the internal services ask for it.
    internal_token: SecretStr | None = Field(
        None,
        description="secret the gateway sends and the internal services require; "
        "`styleblend up` makes a new one each start",
    )
    upstream_timeout_s: float = Field(30.0, gt=0, description="deadline of one upstream call")
    # What features, blending and the gateway keep (uploads, images sent, feature tensors):
    # in this process, or in a Redis every replica shares (services/common/store.py).
    store: str = Field(
        "memory", description="memory, or redis://HOST:PORT/DB: a store every replica shares"
    )
    store_ttl_s: float = Field(
        3600.0, gt=0, description="with a shared store: seconds a value lives after its last use"
    )
    # Replicas of features and blending keep what they made; callers fetch it from the one
    # that holds it. Unset: callers use the address they are configured with (one replica).
    advertise_address: str | None = Field(
        None, description="this replica's own address, host:port, for fetches of what it keeps"
    )
    # TLS to the services this one calls (the gateway: all three; blending: features;
    # reconstruction: blending; the studio's bridge: the gateway): a CA turns it on; a client
    # certificate and key answer servers that ask for one (mutual TLS).
    upstream_ca_file: Path | None = Field(None, description="CA that signs the services' certs")
    upstream_cert_file: Path | None = Field(None, description="client certificate chain (PEM)")
    upstream_key_file: Path | None = Field(None, description="client private key (PEM)")

    @field_validator("store")
    @classmethod
    def _store_url(cls, value: str) -> str:
        if value != "memory" and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(
                f"store: {value!r} is neither `memory` nor a Redis URL "
                "(redis://HOST:PORT/DB, rediss:// with TLS, unix:///path.sock)"
            )
        return value

    @model_validator(mode="after")
    def _upstream_pair(self) -> ServiceConfig:
        if (self.upstream_cert_file is None) != (self.upstream_key_file is None):
            raise ValueError("upstream_cert_file and upstream_key_file go together")
        if self.upstream_cert_file is not None and self.upstream_ca_file is None:
            raise ValueError("upstream_cert_file needs upstream_ca_file (TLS to the services)")
        return self

    @model_validator(mode="after")
    def _tls_pair(self) -> ServiceConfig:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file go together: set both or neither")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("tls_client_ca_file needs tls_cert_file and tls_key_file")
        return self

    def address(self, port: int) -> str:
        return f"{self.host}:{port}"

    @property
    def internal_secret(self) -> str | None:
        return self.internal_token.get_secret_value() if self.internal_token else None


class ModelConfig(ServiceConfig):
    model: str = Field("vgg19", description="feature model id")
    model_dir: Path = Field(Path("models"), description="folder holding one folder per export")

    @property
    def model_path(self) -> Path:
        return self.model_dir / self.model


class FeaturesConfig(ModelConfig):
    features_port: int = Field(50052, ge=0, le=65535)
    features_metrics_port: int | None = Field(None, ge=0, le=65535, description=_METRICS)
    # Comma-separated; tried in order, filtered by what the installed ONNX Runtime offers.
    providers: Annotated[tuple[str, ...], NoDecode] = (
        "TensorrtExecutionProvider",
        "CUDAExecutionProvider",
        "CPUExecutionProvider",
    )
    cache_bytes: int = Field(512 * MiB, ge=0, description="memory budget of the feature cache")
    image_store_bytes: int = Field(IMAGE_STORE_BYTES, ge=0, description=_IMAGE_STORE)
    max_extract_side_px: int = Field(EXTRACT_SIDE_PX, ge=MIN_SIDE_PX, description=_EXTRACT_SIDE)
    max_extract_pixels: int = Field(EXTRACT_PIXELS, ge=MIN_SIDE_PX**2, description=_EXTRACT_PIXELS)
    cpu_arena: CpuArena = Field(
        "off", description="ONNX Runtime's CPU arena: keep, shrink or off (memory given back)"
    )
    intra_op_threads: int = Field(0, ge=0, description="ONNX Runtime threads; 0 = its default")
    fast_model_dir: Path = Field(
        Path("models/fast"), description="folder of trained feed-forward networks, one each"
    )
    universal_dir: Path = Field(
        Path("models/universal"),
        description="folder of the universal decoders (universal.json); none there: no universal",
    )
    trt_fp16: bool = Field(True, description="TensorRT builds float16 engines")
    trt_engine_cache_dir: Path | None = Field(
        Path("models/trt-cache"), description="where TensorRT keeps built engines; unset: none"
    )
    trt_profile_sides: tuple[int, int, int] = Field(
        TENSORRT_SIDES, description="TensorRT profile: smallest, usual and largest side"
    )

    @field_validator("providers", mode="before")
    @classmethod
    def _split(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(name.strip() for name in value.split(",") if name.strip())
        return value


class BlendingConfig(ServiceConfig):
    blending_port: int = Field(50053, ge=0, le=65535)
    blending_metrics_port: int | None = Field(None, ge=0, le=65535, description=_METRICS)
    features_address: str = Field("127.0.0.1:50052", description="where blending fetches tensors")
    image_store_bytes: int = Field(IMAGE_STORE_BYTES, ge=0, description=_IMAGE_STORE)
    target_store_bytes: int = Field(
        TARGET_STORE_BYTES, ge=0, description="memory for blended targets, kept for reconstruction"
    )
    source_cache_bytes: int = Field(
        SOURCE_CACHE_BYTES, ge=0, description="memory for tensors fetched from features"
    )


class ReconstructionConfig(ModelConfig):
    reconstruction_port: int = Field(50054, ge=0, le=65535)
    reconstruction_metrics_port: int | None = Field(None, ge=0, le=65535, description=_METRICS)
    blending_address: str = Field(
        "127.0.0.1:50053", description="where reconstruction fetches its targets"
    )
    device: str = Field("auto", description='"auto" (CUDA when there is one), "cpu" or "cuda:N"')
    threads: int = Field(0, ge=0, description="PyTorch CPU threads; 0 = its default")
    channels_last: bool = Field(
        True, description="the network in NHWC: oneDNN's and tensor cores' faster convolutions"
    )
    memory_budget_mib: int = Field(
        0, ge=0, description="memory all runs together may use; 0 = ¾ of the device's (or RAM)"
    )
    tile_px: int = Field(
        TILE_PX, ge=MIN_SIDE_PX, description="tile side when a canvas is over the budget"
    )
    tile_margin_px: int = Field(TILE_MARGIN_PX, ge=0, description="context around each tile")
    precision: Precision = Field(
        "float32", description="the network's autocast format; losses stay float32"
    )
    compile: Compile = Field(
        "off", description="torch.compile the network; reduce-overhead replays CUDA graphs"
    )
    convolution: Convolution = Field(
        "auto",
        description="winograd: NNPACK's F(6×6, 3×3), CPU and float32 only; direct: the runtime's "
        "own (oneDNN, cuDNN); auto: winograd wherever it runs",
    )


class GatewayConfig(ServiceConfig):
    gateway_port: int = Field(50051, ge=0, le=65535)
    gateway_metrics_port: int | None = Field(None, ge=0, le=65535, description=_METRICS)
    http_port: int = Field(8080, ge=0, le=65535, description="browser studio; 0 picks a free one")
    gateway_token: SecretStr | None = Field(
        None, description="bearer token every public call must carry; unset: no token asked"
    )
    features_address: str = "127.0.0.1:50052"
    blending_address: str = "127.0.0.1:50053"
    reconstruction_address: str = "127.0.0.1:50054"
    # Limits: over any of them a request is RESOURCE_EXHAUSTED.
    max_side_px: int = Field(1024, ge=MIN_SIDE_PX)
    max_sources: int = Field(8, ge=1)
    # Each region's mask is decoded at the canvas and each is a guidance channel (a Gram per style
    # layer, a colouring per universal level): an upload referenced 10,000 times would cost
    # 10,000 canvas-sized masks. 16 is more than a person paints.
    max_regions: int = Field(16, ge=0)
    max_iterations: int = Field(2000, ge=1)
    max_request_bytes: int = Field(64 * MiB, gt=0)
    max_image_pixels: int = Field(40_000_000, gt=0)
    max_scales: int = Field(4, ge=1, description="most coarse-to-fine scales")
    upload_store_bytes: int = Field(256 * MiB, ge=0, description="memory for uploaded images")
    upload_bytes_per_client: int | None = Field(
        None, ge=0, description="the part of the upload store one client may fill; unset: ¼ of it"
    )
    max_extract_side_px: int = Field(EXTRACT_SIDE_PX, ge=MIN_SIDE_PX, description=_EXTRACT_SIDE)
    max_extract_pixels: int = Field(EXTRACT_PIXELS, ge=MIN_SIDE_PX**2, description=_EXTRACT_PIXELS)
    max_sessions: int = Field(32, ge=1, description="Blend and Session calls running at once")
    max_sessions_per_client: int = Field(4, ge=1, description="the same, from one client")
    session_start_timeout_s: float = Field(
        30.0, gt=0, description="a Session that sends no `start` within this is ended"
    )
    # Comma-separated, e.g. "https://studio.example.org" for a proxy in front of the studio.
    studio_origins: Annotated[tuple[str, ...], NoDecode] = Field(
        (), description="web origins besides the studio's own that may use its API and socket"
    )
    # Defaults for unset request fields.
    default_side_px: int = Field(256, ge=MIN_SIDE_PX)
    default_iterations: int = Field(150, ge=1)
    default_preview_every: int = Field(10, ge=1)
    default_learning_rate: float = Field(0.02, gt=0)

    @field_validator("studio_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: object) -> object:
        if isinstance(value, str):
            origins = (origin.strip().rstrip("/") for origin in value.split(","))
            return tuple(origin for origin in origins if origin)
        return value

    @model_validator(mode="after")
    def _defaults_within_limits(self) -> GatewayConfig:
        """A request that leaves a field unset must not be refused for a value it never gave."""
        for default, limit in (("default_side_px", "max_side_px"),
                               ("default_iterations", "max_iterations")):  # fmt: skip
            if getattr(self, default) > getattr(self, limit):
                raise ValueError(
                    f"{default} {getattr(self, default)} is over {limit} {getattr(self, limit)}; "
                    f"lower STYLEBLEND_{default.upper()} too"
                )
        return self
