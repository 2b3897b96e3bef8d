"""One click request of 3D Slicer's MONAI Label plugin, checked before the engine sees it (docs/monailabel.md).

Everything a client sends is checked here and a bad value becomes a 422 with a one-line reason. Keys the server
adds itself (the client's address, the plugin's upload session) travel under :data:`SERVER_KEY`, which
``lib/routes.py`` overwrites on every request, so a client cannot forge them.
"""

from __future__ import annotations

import math
import unicodedata
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from fastapi import HTTPException

SERVER_KEY = "_sgpsam_server"  # {"address": str, "session_id": str, "upload": bool}, set by lib/routes.py only
DEFAULT_CLIENT_IDS = frozenset({"", "user-xyz", "none", "null"})  # what an unconfigured Slicer (or client) sends
MAX_NAME_CHARS = 128
RESULT_EXTENSIONS = (".nrrd", ".seg.nrrd", ".nii.gz", ".nii", ".mha")
TRUE_STRINGS = ("1", "true", "yes", "on")
FALSE_STRINGS = ("0", "false", "no", "off", "")


def unprocessable(detail: str) -> HTTPException:
    return HTTPException(status_code=422, detail=detail)


def parse_flag(value: Any, name: str) -> bool:
    if value is None:
        return False
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in TRUE_STRINGS + FALSE_STRINGS:
        return value.strip().lower() in TRUE_STRINGS
    raise unprocessable(f"'{name}' must be true or false, got {value!r}"[:300])


def check_name(value: Any, what: str) -> str:
    """A short printable name (segment, client id): no control characters, at most 128 characters."""
    if not isinstance(value, str):
        raise unprocessable(f"{what} must be a string, got {type(value).__name__}")
    name = value.strip()
    if not name or len(name) > MAX_NAME_CHARS:
        raise unprocessable(f"{what} must have 1 to {MAX_NAME_CHARS} characters, got {len(name)}")
    if any(unicodedata.category(ch).startswith("C") for ch in name):
        raise unprocessable(f"{what} {name[:40]!r} contains control characters")
    return name


def segment_name(value: Any, default: str) -> str:
    """The plugin sends the current segment's name as ``label``: any name is accepted; none = ``default``."""
    if value is None or value == "":
        return default
    return check_name(value, "label (segment name)")


def session_owner(data: Mapping[str, Any]) -> str:
    """Whose click history this is: a configured client id, else the plugin's upload session, else the address.

    Every Slicer install sends the client id "user-xyz" until its user changes it, so that id alone would let two
    annotators on one image truncate each other's history.
    """
    client = data.get("client_id")
    client = "" if client in (None, "") else check_name(client, "client_id")
    if client.lower() not in DEFAULT_CLIENT_IDS:
        return f"client:{client}"
    server = data.get(SERVER_KEY) or {}
    if server.get("session_id"):
        return f"session:{server['session_id']}"
    if server.get("address"):
        return f"address:{server['address']}"
    return "local"  # in-process callers (batch inference, scripts)


def parse_roi(value: Any, shape: Sequence[int]) -> tuple[tuple[int, int], ...] | None:
    """Slicer's ROI ``[i0, i1, j0, j1, k0, k1]`` (file voxel indices, each pair in either order) -> inclusive
    ``((i_lo, i_hi), (j_lo, j_hi), (k_lo, k_hi))`` clipped to the image; None when no ROI was sent."""
    if value is None or (isinstance(value, (list, tuple, str)) and len(value) == 0):
        return None
    numbers = isinstance(value, (list, tuple)) and len(value) == 6
    numbers = numbers and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    if not numbers or not all(math.isfinite(float(v)) for v in value):
        raise unprocessable(f"roi must be 6 finite numbers [i0, i1, j0, j1, k0, k1], got {value!r}"[:300])
    box = []
    for axis in range(3):
        lo, hi = sorted((int(round(value[2 * axis])), int(round(value[2 * axis + 1]))))
        lo, hi = max(lo, 0), min(hi, int(shape[axis]) - 1)
        if lo > hi:
            dims = "x".join(str(int(s)) for s in shape[:3])
            raise unprocessable(f"roi {list(value)} does not overlap the image (shape {dims})")
        box.append((lo, hi))
    return tuple(box)


def inside_roi(point: Sequence[float], roi) -> bool:
    return all(lo - 0.5 <= p < hi + 0.5 for p, (lo, hi) in zip(point, roi))


def result_extension(value: Any) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str) or value.lower() not in RESULT_EXTENSIONS:
        raise unprocessable(f"result_extension must be one of {', '.join(RESULT_EXTENSIONS)}, got {value!r}"[:300])
    return value.lower()


def check_click_count(points: Any, name: str, limit: int) -> None:
    if isinstance(points, (list, tuple)) and len(points) > limit:
        raise unprocessable(f"{len(points)} {name} clicks in one request; at most {limit} (--conf max_clicks)")


@dataclass(frozen=True)
class ClickRequest:
    """A checked click request. ``session_key`` is a tuple, so no segment or client name can collide."""

    image_id: str
    segment: str
    owner: str
    reset: bool
    extension: str | None

    @property
    def session_key(self) -> tuple[str, str, str]:
        return (self.image_id, self.segment, self.owner)

    def describe(self) -> dict[str, str]:
        return {"image": self.image_id, "segment": self.segment, "client": self.owner}


def click_request(data: Mapping[str, Any], default_segment: str, max_clicks: int) -> ClickRequest:
    for name in ("foreground", "background"):
        check_click_count(data.get(name), name, max_clicks)
    return ClickRequest(
        image_id=str(data.get("image_id") or data.get("image")),
        segment=segment_name(data.get("label"), default_segment),
        owner=session_owner(data),
        reset=parse_flag(data.get("reset_state"), "reset_state"),
        extension=result_extension(data.get("result_extension")),
    )
