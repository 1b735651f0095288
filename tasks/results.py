"""Cached task results that are read back without executing anything.

Prefect deserializes a stored result with the serializer named in the stored file itself: a file
planted under `.prefect/storage` naming `pickle` (or `json` with an `object_decoder` of the
planter's choice) would run code on the next cache lookup. Our results are plain data (a
StageResult, a dict of numbers and names), so `PlainJSON` writes them as JSON and builds only
those when reading, and `Verified` wraps a task's cache policy: before Prefect looks up the record
under a key, a record there that PlainJSON did not write is removed (and the task runs again).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

from prefect.cache_policies import CachePolicy
from prefect.filesystems import LocalFileSystem
from prefect.results import get_default_result_storage
from prefect.serializers import Serializer

from components.pipeline.layout import StageResult

SERIALIZER = "rlhf-plain-json"
log = logging.getLogger(__name__)


class PlainJSON(Serializer):
    """A StageResult or JSON data; loading builds only those, importing nothing the file names."""

    type: Literal["rlhf-plain-json"] = SERIALIZER

    def dumps(self, obj: Any) -> bytes:
        if isinstance(obj, StageResult):
            return json.dumps({"stage_result": obj.model_dump(mode="json")}).encode()
        return json.dumps({"data": obj}).encode()

    def loads(self, blob: bytes) -> Any:
        document = json.loads(blob)
        if "stage_result" in document:
            return StageResult.model_validate(document["stage_result"])
        return document["data"]


def written_by_us(content: bytes) -> bool:
    try:
        return json.loads(content)["metadata"]["serializer"] == {"type": SERIALIZER}
    except (ValueError, KeyError, TypeError):
        return False


@dataclass
class Verified(CachePolicy):
    """`policy`'s cache key, with the local record stored under it checked first."""

    policy: CachePolicy | None = None  # required; a default only because CachePolicy's fields have them

    def compute_key(self, task_ctx, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs) -> Optional[str]:
        key = self.policy.compute_key(task_ctx, inputs, flow_parameters, **kwargs)
        storage = task_ctx.result_store.result_storage or get_default_result_storage(_sync=True)
        if not key or not isinstance(storage, LocalFileSystem):  # remote storage: what its owner lets in
            return key
        record = Path(storage.basepath).expanduser() / key
        if record.is_file() and not written_by_us(record.read_bytes()):
            log.warning("removed cached result %s: not written by this pipeline's JSON serializer", record)
            record.unlink()
        return key
