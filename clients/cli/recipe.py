"""Replaying a recipe: the request a result was made from, with its images found again.

A recipe names every image by its sha256 (as an upload id); the CLI adds `paths`, where this
machine keeps each one, when it writes a result.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from google.protobuf.json_format import ParseDict
from PIL import Image
from styleblend.v1 import styleblend_pb2, styleblend_pb2_grpc

from clients.cli.script import Step

RECIPE_KEY = "styleblend:recipe"  # the PNG text chunk the gateway writes


class RecipeError(ValueError):
    pass


def load(path: Path) -> dict[str, Any]:
    """A recipe from a result PNG's text chunk, or from a JSON file."""
    if path.suffix.lower() == ".png":
        with Image.open(path) as image:
            text = getattr(image, "text", {}).get(RECIPE_KEY)
        if text is None:
            raise RecipeError(f"{path}: this PNG carries no styleblend recipe")
    else:
        text = path.read_text()
    try:
        recipe: dict[str, Any] = json.loads(text)
    except json.JSONDecodeError as error:
        raise RecipeError(f"{path}: not a recipe ({error})") from None
    if "request" not in recipe:
        raise RecipeError(f"{path}: not a recipe (no `request`)")
    return recipe


def _file(sha256: str, paths: dict[str, str]) -> bytes:
    where = paths.get(sha256)
    if where is None or not Path(where).is_file():
        raise RecipeError(f"the recipe needs image {sha256[:12]}…, which is not at {where}")
    data = Path(where).read_bytes()
    if hashlib.sha256(data).hexdigest() != sha256:
        raise RecipeError(f"{where} has changed since the recipe was made (sha256 differs)")
    return data


def _upload_ids(message: Any) -> list[Any]:
    """Every image reference (a message with an `upload_id`) inside a request or update."""
    found = []
    for field, value in message.ListFields():
        values = value if field.is_repeated else [value]
        for item in values:
            if hasattr(item, "ListFields"):
                if "upload_id" in item.DESCRIPTOR.fields_by_name and item.upload_id:
                    found.append(item)
                found += _upload_ids(item)
    return found


def _upload_all(
    message: Any, paths: dict[str, str], stub: styleblend_pb2_grpc.StyleBlendStub
) -> None:
    for holder in _upload_ids(message):
        data = _file(holder.upload_id, paths)
        answer = stub.UploadImage(styleblend_pb2.UploadImageRequest(data=data), timeout=60)
        if answer.upload_id != holder.upload_id:
            raise RecipeError(f"the gateway names {paths[holder.upload_id]} differently")


def replay(
    path: Path, stub: styleblend_pb2_grpc.StyleBlendStub
) -> tuple[styleblend_pb2.BlendRequest, list[Step], dict[str, str]]:
    """The recipe's request (its images uploaded) and its updates as timed steps."""
    recipe = load(path)
    paths: dict[str, str] = recipe.get("paths", {})
    request = ParseDict(recipe["request"], styleblend_pb2.BlendRequest())
    _upload_all(request, paths, stub)
    if recipe.get("init_image_sha256"):
        request.init_image = _file(recipe["init_image_sha256"], paths)
    steps = []
    for entry in recipe.get("updates", []):
        update = ParseDict(entry, styleblend_pb2.SessionUpdate())
        _upload_all(update, paths, stub)
        steps.append(Step(update.at_iteration, update))
    return request, steps, paths
