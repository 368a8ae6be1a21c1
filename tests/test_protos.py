"""The .proto files as an API: lint-clean, fully commented, and usable by reflection alone."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, json_format
from google.protobuf.message_factory import GetMessageClass
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from tests.conftest import ROOT, Graph

PROTOS = ROOT / "protos"
PROTO_FILES = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
BUF = ROOT / "clients" / "node" / "node_modules" / ".bin" / "buf"  # from `npm ci` there

# Where each kind of declaration sits in a FileDescriptorProto, as SourceCodeInfo paths name it.
FILE_MESSAGE = descriptor_pb2.FileDescriptorProto.MESSAGE_TYPE_FIELD_NUMBER
FILE_ENUM = descriptor_pb2.FileDescriptorProto.ENUM_TYPE_FIELD_NUMBER
FILE_SERVICE = descriptor_pb2.FileDescriptorProto.SERVICE_FIELD_NUMBER
MESSAGE_FIELD = descriptor_pb2.DescriptorProto.FIELD_FIELD_NUMBER
MESSAGE_NESTED = descriptor_pb2.DescriptorProto.NESTED_TYPE_FIELD_NUMBER
MESSAGE_ENUM = descriptor_pb2.DescriptorProto.ENUM_TYPE_FIELD_NUMBER
MESSAGE_ONEOF = descriptor_pb2.DescriptorProto.ONEOF_DECL_FIELD_NUMBER
ENUM_VALUE = descriptor_pb2.EnumDescriptorProto.VALUE_FIELD_NUMBER
SERVICE_METHOD = descriptor_pb2.ServiceDescriptorProto.METHOD_FIELD_NUMBER

SourcePath = tuple[int, ...]  # indices into the FileDescriptorProto, as SourceCodeInfo gives them


def compile_protos(include: Path, files: list[str], out: Path) -> descriptor_pb2.FileDescriptorSet:
    """The files' descriptors with their comments (protoc's source info)."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{include}",
            "--include_source_info",
            f"--descriptor_set_out={out}",
            *files,
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())


def _enum(
    enum: descriptor_pb2.EnumDescriptorProto, name: str, at: SourcePath
) -> Iterator[tuple[str, SourcePath]]:
    yield f"enum {name}", at
    for i, value in enumerate(enum.value):
        yield f"enum value {value.name}", (*at, ENUM_VALUE, i)


def _message(
    message: descriptor_pb2.DescriptorProto, name: str, at: SourcePath
) -> Iterator[tuple[str, SourcePath]]:
    yield f"message {name}", at
    for i, field in enumerate(message.field):
        yield f"field {name}.{field.name}", (*at, MESSAGE_FIELD, i)
    # `optional` fields get a synthetic oneof each, which has no place in the source.
    synthetic = {f.oneof_index for f in message.field if f.proto3_optional}
    for i, oneof in enumerate(message.oneof_decl):
        if i not in synthetic:
            yield f"oneof {name}.{oneof.name}", (*at, MESSAGE_ONEOF, i)
    for i, nested in enumerate(message.nested_type):
        if not nested.options.map_entry:  # a map<K, V> is written (and commented) as its field
            yield from _message(nested, f"{name}.{nested.name}", (*at, MESSAGE_NESTED, i))
    for i, enum in enumerate(message.enum_type):
        yield from _enum(enum, f"{name}.{enum.name}", (*at, MESSAGE_ENUM, i))


def declarations(file: descriptor_pb2.FileDescriptorProto) -> Iterator[tuple[str, SourcePath]]:
    """Every service, rpc, message, field, oneof, enum and enum value, with its source path."""
    for i, message in enumerate(file.message_type):
        yield from _message(message, f"{file.package}.{message.name}", (FILE_MESSAGE, i))
    for i, enum in enumerate(file.enum_type):
        yield from _enum(enum, f"{file.package}.{enum.name}", (FILE_ENUM, i))
    for i, service in enumerate(file.service):
        name = f"{file.package}.{service.name}"
        yield f"service {name}", (FILE_SERVICE, i)
        for j, method in enumerate(service.method):
            yield f"rpc {name}.{method.name}", (FILE_SERVICE, i, SERVICE_METHOD, j)


def uncommented(file: descriptor_pb2.FileDescriptorProto) -> list[str]:
    commented = {
        tuple(location.path)
        for location in file.source_code_info.location
        if location.leading_comments.strip()
    }
    return [name for name, at in declarations(file) if at not in commented]


@pytest.fixture(scope="module")
def descriptors(
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, descriptor_pb2.FileDescriptorProto]:
    out = tmp_path_factory.mktemp("protos") / "all.binpb"
    return {file.name: file for file in compile_protos(PROTOS, PROTO_FILES, out).file}


@pytest.mark.parametrize("name", PROTO_FILES)
def test_every_declaration_has_a_leading_comment(
    name: str, descriptors: dict[str, descriptor_pb2.FileDescriptorProto]
) -> None:
    file = descriptors[name]
    assert len(list(declarations(file))) > 5  # the walk found the file's contents
    assert uncommented(file) == []


def test_the_comment_check_finds_what_is_missing(tmp_path: Path) -> None:
    (tmp_path / "bare.proto").write_text(
        'syntax = "proto3";\npackage bare.v1;\n'
        "// Thing is commented.\nmessage Thing {\n"
        "  // Commented.\n  optional string a = 1;\n"
        "  string b = 2;  // trailing comments do not count\n"
        "  oneof choice {\n    // Commented.\n    string c = 3;\n  }\n"
        "  map<string, int32> d = 4;\n"
        "}\n"
        "enum Kind {\n  // Commented.\n  KIND_UNSPECIFIED = 0;\n}\n"
    )
    (file,) = compile_protos(tmp_path, ["bare.proto"], tmp_path / "bare.binpb").file
    assert uncommented(file) == [
        "field bare.v1.Thing.b",
        "field bare.v1.Thing.d",
        "oneof bare.v1.Thing.choice",
        "enum bare.v1.Kind",
    ]


@pytest.mark.skipif(
    shutil.which("node") is None or not BUF.exists(),
    reason="needs node and buf (`npm ci --prefix clients/node`)",
)
def test_buf_lint_is_clean() -> None:
    done = subprocess.run(
        [str(BUF), "lint"], cwd=PROTOS, capture_output=True, text=True, timeout=120
    )
    assert (done.returncode, done.stdout + done.stderr) == (0, "")


def test_get_info_through_reflection_alone(graph: Graph) -> None:
    """What a client without our .proto files (grpcurl, Postman) sees: enough to call GetInfo."""
    with grpc.insecure_channel(graph.address) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        assert "styleblend.v1.StyleBlend" in database.get_services()
        # A pool of its own, so nothing comes from the generated stubs that tests import.
        pool = descriptor_pool.DescriptorPool(database)
        method = pool.FindServiceByName("styleblend.v1.StyleBlend").methods_by_name["GetInfo"]
        assert (method.input_type.full_name, method.output_type.full_name) == (
            "styleblend.v1.GetInfoRequest",
            "styleblend.v1.GetInfoResponse",
        )
        assert not (method.client_streaming or method.server_streaming)
        request_class = GetMessageClass(method.input_type)
        response_class = GetMessageClass(method.output_type)
        get_info = channel.unary_unary(
            f"/{method.containing_service.full_name}/{method.name}",
            request_serializer=request_class.SerializeToString,
            response_deserializer=response_class.FromString,
        )
        answer = get_info(request_class(), timeout=30)
    assert answer.DESCRIPTOR.file.pool is pool
    info = json_format.MessageToDict(answer, preserving_proto_field_name=True)
    assert info["model"] == "vgg19"
    assert "relu4_2" in [layer["name"] for layer in info["layers"]]
