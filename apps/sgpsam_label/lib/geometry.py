"""Header checks for uploaded images and labels, read with ITK as 3D Slicer reads them (no voxel data loaded)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

SPACING_RTOL = 1e-3  # relative; NIfTI stores spacing as float32
ORIGIN_VOXEL_FRACTION = 0.01  # origins may differ by 1 % of the smallest voxel side
DIRECTION_ATOL = 1e-3


class GeometryError(ValueError):
    """An unreadable file or a label that does not lie on its image's voxel grid."""


@dataclass(frozen=True)
class Header:
    size: tuple[int, ...]
    spacing: np.ndarray
    origin: np.ndarray
    direction: np.ndarray
    components: int


def read_header(path: str, whole: bool = False) -> Header:
    """The grid of an image file; ``whole=True`` also decodes the voxels (a file cut short passes the header)."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    try:
        reader.ReadImageInformation()
        image = reader.Execute() if whole else reader
    except RuntimeError:
        raise GeometryError("not a readable image (NIfTI/NRRD), or its voxel data is incomplete") from None
    dim = image.GetDimension()
    return Header(
        size=tuple(int(s) for s in image.GetSize()),
        spacing=np.asarray(image.GetSpacing(), dtype=np.float64),
        origin=np.asarray(image.GetOrigin(), dtype=np.float64),
        direction=np.asarray(image.GetDirection(), dtype=np.float64).reshape(dim, dim),
        components=int(image.GetNumberOfComponentsPerPixel() if whole else image.GetNumberOfComponents()),
    )


def check_image(path: str) -> Header:
    header = read_header(path, whole=True)
    if len(header.size) not in (3, 4) or min(header.size) < 1:
        raise GeometryError(f"image must be 3-D (a 4th axis for channels is allowed), got size {list(header.size)}")
    return header


def _listed(values: np.ndarray) -> list[float]:
    return [round(float(v), 6) for v in np.ravel(values)]


def check_label_fits(label_path: str, image_path: str) -> None:
    """Raise GeometryError unless the label has one component and the image's size, spacing, origin and direction."""
    label = read_header(label_path, whole=True)
    if label.components != 1:
        raise GeometryError(f"label must have one component per voxel, got {label.components}")
    image = read_header(image_path)
    if label.size[:3] != image.size[:3] or len(label.size) != 3:
        raise GeometryError(f"label shape {list(label.size)} does not match image shape {list(image.size[:3])}")
    spacing = image.spacing[:3]
    if not np.allclose(label.spacing[:3], spacing, rtol=SPACING_RTOL, atol=0):
        raise GeometryError(f"label spacing {_listed(label.spacing)} does not match image spacing {_listed(spacing)}")
    tolerance = ORIGIN_VOXEL_FRACTION * float(spacing.min())
    if np.abs(label.origin[:3] - image.origin[:3]).max() > tolerance:
        raise GeometryError(
            f"label origin {_listed(label.origin)} does not match image origin {_listed(image.origin[:3])}"
        )
    if np.abs(label.direction[:3, :3] - image.direction[:3, :3]).max() > DIRECTION_ATOL:
        raise GeometryError(
            f"label direction {_listed(label.direction)} does not match image direction "
            f"{_listed(image.direction[:3, :3])}"
        )
