"""``LocalDatastore`` whose writes cannot lose or corrupt labels.

MONAI Label 0.8.5's ``LocalDatastore`` copies an uploaded label straight over the existing file (``shutil.copy``) and
rewrites ``datastore_v2.json`` in place, and the server and its scoring/training subprocesses each hold their own
in-memory copy of that JSON: a scoring subprocess that writes an image score can overwrite an entry the server
just added for a saved label. This subclass:

* checks an uploaded label (readable image, same spatial shape as its image) before touching anything;
* writes the label to a temporary file in the same folder and ``os.replace``-s it (atomic on POSIX);
* writes ``datastore_v2.json`` the same way;
* does every read-modify-write of the JSON under the datastore's file lock after re-reading the file if another
  process changed it, so concurrent writers merge instead of overwriting each other;
* reloads the JSON on the rename events (``on_moved``) the atomic writes produce in other processes.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from typing import Any, Dict

import SimpleITK as sitk
from fastapi import HTTPException
from filelock import FileLock
from monailabel.datastore.local import DataModel, LocalDatastore, LocalDatastoreModel
from monailabel.interfaces.datastore import DefaultLabelTag

logger = logging.getLogger(__name__)


def _spatial_shape(path: str) -> tuple[int, ...]:
    """Voxel grid size from the header only (ITK index order, the same for the image and its label)."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    reader.ReadImageInformation()
    return tuple(int(s) for s in reader.GetSize())


class SafeLocalDatastore(LocalDatastore):
    def __init__(self, *args, validate_labels: bool = True, **kwargs) -> None:
        self._validate_labels = validate_labels
        super().__init__(*args, **kwargs)
        handler = getattr(self, "_handler", None)
        if handler is not None:
            handler.on_moved = self._on_moved_event

    # -- file helpers ----------------------------------------------------------------------------------------------
    def _atomic_write_text(self, path: str, text: str) -> None:
        tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{os.getpid()}.tmp")
        with open(tmp, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)

    def _reload_unlocked(self) -> None:
        """Re-read the JSON if another process changed it (caller holds the file lock)."""
        path = self._datastore_config_path
        if not os.path.exists(path):
            return
        ts = os.stat(path).st_mtime
        if ts == self._config_ts:
            return
        try:
            with open(path) as fp:
                model = LocalDatastoreModel.model_validate_json(fp.read())
        except ValueError as err:
            logger.error(f"+++ datastore file unreadable, keeping the in-memory copy: {err}")
            return
        model.base_path = self._datastore_path
        self._datastore = model
        self._config_ts = ts

    def sync(self) -> None:
        """Pick up changes other processes (scoring, training) wrote to the datastore file."""
        with FileLock(self._lock_file):
            self._reload_unlocked()

    def _update_datastore_file(self, lock=True):
        def _write():
            self._ignore_event_config = True
            text = json.dumps(self._datastore.model_dump(exclude={"base_path"}), indent=2, default=str)
            self._atomic_write_text(self._datastore_config_path, text)
            self._config_ts = os.stat(self._datastore_config_path).st_mtime

        if lock:
            with FileLock(self._lock_file):
                _write()
        else:
            _write()

    def _on_moved_event(self, event):
        if getattr(event, "dest_path", None) == self._datastore_config_path:
            self._init_from_datastore_file()  # no-op for our own writes (same mtime)

    # -- writes --------------------------------------------------------------------------------------------------
    def _check_label(self, image_id: str, label_filename: str) -> None:
        try:
            label_shape = _spatial_shape(label_filename)
        except Exception:  # any reader error = not a usable label file
            raise HTTPException(status_code=422, detail="label file is not a readable image (NIfTI/NRRD)") from None
        image_shape = _spatial_shape(self.get_image_uri(image_id))
        if label_shape != image_shape:
            raise HTTPException(
                status_code=422,
                detail=f"label shape {list(label_shape)} does not match image shape {list(image_shape)}",
            )

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: Dict[str, Any]) -> str:
        logger.info(f"Saving Label for Image: {image_id}; Tag: {label_tag}")
        label_tag = label_tag or DefaultLabelTag.FINAL.value
        if not self._datastore.objects.get(image_id):
            self.sync()
        if not self._datastore.objects.get(image_id):
            raise HTTPException(status_code=404, detail=f"image {image_id!r} not found in the datastore")
        if self._validate_labels:
            self._check_label(image_id, label_filename)

        _, label_ext = self._to_id(os.path.basename(label_filename))
        label_path = self._datastore.label_path(label_tag)
        name = self._filename(image_id, label_ext)
        dest = os.path.join(label_path, name)
        tmp = os.path.join(label_path, f".{name}.{os.getpid()}.tmp")

        with FileLock(self._lock_file):
            os.makedirs(label_path, exist_ok=True)
            shutil.copyfile(label_filename, tmp)
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, dest)  # the previous label stays intact until this instant

            self._reload_unlocked()
            obj = self._datastore.objects.get(image_id)
            if obj is None:  # removed meanwhile by another process; re-register it
                self._datastore.objects[image_id] = obj = self._reconcile_object(image_id)
            info = dict(label_info or {})
            info["ts"] = int(time.time())
            info["name"] = name
            obj.labels[label_tag] = DataModel(info=info, ext=label_ext)
            self._update_datastore_file(lock=False)
        return image_id

    def _reconcile_object(self, image_id: str):
        from monailabel.datastore.local import ImageLabelModel

        for f in os.listdir(self._datastore.image_path()):
            iid, ext = self._to_id(f)
            if iid == image_id:
                return ImageLabelModel(image=DataModel(info={"ts": int(time.time()), "name": f}, ext=ext))
        raise HTTPException(status_code=404, detail=f"image {image_id!r} not found in the datastore")

    def update_image_info(self, image_id: str, info: Dict[str, Any]) -> None:
        with FileLock(self._lock_file):
            self._reload_unlocked()
            obj = self._datastore.objects.get(image_id)
            if not obj:
                raise HTTPException(status_code=404, detail=f"image {image_id!r} not found in the datastore")
            obj.image.info.update(info)
            self._update_datastore_file(lock=False)

    def update_label_info(self, label_id: str, label_tag: str, info: Dict[str, Any]) -> None:
        with FileLock(self._lock_file):
            self._reload_unlocked()
            label = self._datastore.label(label_id, label_tag)
            if not label:
                raise HTTPException(status_code=404, detail=f"label {label_id!r} with tag {label_tag!r} not found")
            label.info.update(info)
            self._update_datastore_file(lock=False)
