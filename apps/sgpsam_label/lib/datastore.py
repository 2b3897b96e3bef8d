"""``LocalDatastore`` whose writes cannot lose or corrupt labels and images.

MONAI Label 0.8.5's ``LocalDatastore`` copies an upload straight over the existing file (``shutil.copy``), rewrites
``datastore_v2.json`` in place, and the server and its scoring/training subprocesses each hold their own in-memory
copy of that JSON, so one process can overwrite an entry another just added (a scoring run writing an image score
over a label the server had just registered; a reconcile after a file event writing back an old copy). This
subclass:

* checks an upload before touching anything: a label must be a readable one-component image on its image's grid
  (size, spacing, origin, direction), an image must be a readable 3-D image under a new, plain id, a label tag a
  plain name (no path);
* keeps the previous final (or any tag's) label when a new one is saved, as ``.label_versions/<tag>/<id>.v<N><ext>``
  in the studies folder, with its datastore info beside it (``.v<N>.json``);
* writes files to a temporary file in the same folder and ``os.replace``-s them (atomic on POSIX), the JSON too;
* does every read-modify-write of the JSON -- saves, image uploads, info updates and the inherited reconcile --
  under the datastore's file lock, after re-reading the file if another process changed it;
* reloads the JSON on the rename events (``on_moved``) the atomic writes produce in other processes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import threading
import time
from typing import Any, Dict

from fastapi import HTTPException
from filelock import FileLock
from monailabel.datastore.local import DataModel, ImageLabelModel, LocalDatastore, LocalDatastoreModel
from monailabel.interfaces.datastore import DefaultLabelTag

from .geometry import GeometryError, check_image, check_label_fits

logger = logging.getLogger(__name__)

VERSIONS_DIR = ".label_versions"
TAG_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")


def check_tag(tag: str) -> str:
    if not isinstance(tag, str) or not TAG_PATTERN.match(tag):
        raise HTTPException(status_code=422, detail=f"label tag must be a plain name like 'final', got {tag!r}"[:200])
    return tag


def check_image_id(image_id: str) -> str:
    plain = isinstance(image_id, str) and 0 < len(image_id) <= 128 and os.path.basename(image_id) == image_id
    plain = plain and not image_id.startswith(".") and "\\" not in image_id and image_id.isprintable()
    if not plain:
        raise HTTPException(status_code=422, detail=f"image id must be a plain file name, got {image_id!r}"[:200])
    return image_id


def _fsync_copy(src: str, tmp: str) -> None:
    shutil.copyfile(src, tmp)
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())


class SafeLocalDatastore(LocalDatastore):
    def __init__(self, *args, validate_labels: bool = True, **kwargs) -> None:
        self._validate_labels = validate_labels
        self._held = threading.local()  # depth of this thread's hold on the file lock (FileLock is not re-entrant)
        super().__init__(*args, **kwargs)
        handler = getattr(self, "_handler", None)
        if handler is not None:
            handler.on_moved = self._on_moved_event

    # -- locking and the JSON file ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self):
        depth = getattr(self._held, "depth", 0)
        lock = FileLock(self._lock_file) if depth == 0 else contextlib.nullcontext()
        with lock:
            self._held.depth = depth + 1
            try:
                yield
            finally:
                self._held.depth = depth

    def _atomic_write_text(self, path: str, text: str) -> None:
        tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{os.getpid()}.tmp")
        with open(tmp, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)

    def _init_from_datastore_file(self, throw_exception=False):
        """Re-read the JSON if another process changed it (MONAI Label's method, here under the re-entrant lock)."""
        path = self._datastore_config_path
        with self._locked():
            if not os.path.exists(path) or os.stat(path).st_mtime == self._config_ts:
                return
            ts = os.stat(path).st_mtime
            try:
                with open(path) as fp:
                    model = LocalDatastoreModel.model_validate_json(fp.read())
            except ValueError as err:
                logger.error(f"+++ datastore file unreadable, keeping the in-memory copy: {err}")
                if throw_exception:
                    raise
                return
            model.base_path = self._datastore_path
            self._datastore = model
            self._config_ts = ts

    def sync(self) -> None:
        """Pick up changes other processes (scoring, training) wrote to the datastore file."""
        self._init_from_datastore_file()

    def _update_datastore_file(self, lock=True):
        with self._locked():
            self._ignore_event_config = True
            text = json.dumps(self._datastore.model_dump(exclude={"base_path"}), indent=2, default=str)
            self._atomic_write_text(self._datastore_config_path, text)
            self._config_ts = os.stat(self._datastore_config_path).st_mtime

    def _reconcile_datastore(self):
        with self._locked():  # re-read, compare with the files, write back: one step for other processes
            super()._reconcile_datastore()

    def _on_moved_event(self, event):
        if getattr(event, "dest_path", None) == self._datastore_config_path:
            self._init_from_datastore_file()  # no-op for our own writes (same mtime)

    # -- labels ---------------------------------------------------------------------------------------------------
    def _check_label(self, image_id: str, label_filename: str) -> None:
        try:
            check_label_fits(label_filename, self.get_image_uri(image_id))
        except GeometryError as err:
            raise HTTPException(status_code=422, detail=f"label {err}"[:500]) from None

    def _keep_previous(self, image_id: str, label_tag: str, previous: DataModel | None, new_ext: str) -> int:
        """Move/link the current label of this tag into the versions folder; returns its version number (0: none)."""
        if previous is None:
            return 0
        current = os.path.join(self._datastore.label_path(label_tag), self._filename(image_id, previous.ext))
        if not os.path.isfile(current):
            return 0
        folder = os.path.join(self._datastore_path, VERSIONS_DIR, label_tag)
        os.makedirs(folder, exist_ok=True)
        pattern = re.compile(re.escape(image_id) + r"\.v(\d+)\.json$")
        number = 1 + max([int(m.group(1)) for f in os.listdir(folder) if (m := pattern.match(f))], default=0)
        kept = os.path.join(folder, f"{image_id}.v{number}{previous.ext}")
        if previous.ext != new_ext:
            os.replace(current, kept)  # the new label has another name: the old file would linger as a stale label
        else:
            try:
                os.link(current, kept)  # instant; the current name is replaced atomically right after
            except OSError:
                _fsync_copy(current, kept)
        info = json.dumps({"tag": label_tag, "ext": previous.ext, "info": previous.info}, indent=2, default=str)
        self._atomic_write_text(os.path.join(folder, f"{image_id}.v{number}.json"), info)
        return number

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: Dict[str, Any]) -> str:
        label_tag = check_tag(label_tag or DefaultLabelTag.FINAL.value)
        logger.info(f"Saving Label for Image: {image_id}; Tag: {label_tag}")
        if not self._datastore.objects.get(image_id):
            self.sync()
        if not self._datastore.objects.get(image_id):
            raise HTTPException(status_code=404, detail=f"image {image_id!r} not found in the datastore")
        if self._validate_labels:
            self._check_label(image_id, label_filename)

        _, label_ext = self._to_id(os.path.basename(label_filename))
        label_path = self._datastore.label_path(label_tag)
        name = self._filename(image_id, label_ext)
        tmp = os.path.join(label_path, f".{name}.{os.getpid()}.{threading.get_ident()}.tmp")

        with self._locked():
            self._init_from_datastore_file()
            obj = self._datastore.objects.get(image_id)
            if obj is None:  # removed meanwhile by another process; re-register it
                self._datastore.objects[image_id] = obj = self._reconcile_object(image_id)
            os.makedirs(label_path, exist_ok=True)
            _fsync_copy(label_filename, tmp)
            version = 1 + self._keep_previous(image_id, label_tag, obj.labels.get(label_tag), label_ext)
            os.replace(tmp, os.path.join(label_path, name))  # the previous label stays intact until this instant
            info = dict(label_info or {})
            info.update(ts=int(time.time()), name=name, version=version)
            obj.labels[label_tag] = DataModel(info=info, ext=label_ext)
            self._update_datastore_file()
        return image_id

    def _reconcile_object(self, image_id: str):
        for f in os.listdir(self._datastore.image_path()):
            iid, ext = self._to_id(f)
            if iid == image_id:
                return ImageLabelModel(image=DataModel(info={"ts": int(time.time()), "name": f}, ext=ext))
        raise HTTPException(status_code=404, detail=f"image {image_id!r} not found in the datastore")

    # -- images and info ------------------------------------------------------------------------------------------
    def add_image(self, image_id: str, image_filename: str, image_info: Dict[str, Any]) -> str:
        default_id, image_ext = self._to_id(os.path.basename(image_filename))
        image_id = check_image_id(image_id or default_id)
        if not any(image_filename.endswith(pattern.replace("*", "")) for pattern in self._extensions):
            raise HTTPException(status_code=422, detail=f"image file type {image_ext!r} is not served here")
        try:
            check_image(image_filename)
        except GeometryError as err:
            raise HTTPException(status_code=422, detail=f"image {err}") from None
        name = self._filename(image_id, image_ext)
        dest = os.path.join(self._datastore.image_path(), name)
        tmp = os.path.join(self._datastore.image_path(), f".{name}.{os.getpid()}.{threading.get_ident()}.tmp")
        with self._locked():
            self._init_from_datastore_file()
            if image_id in self._datastore.objects or os.path.exists(dest):
                raise HTTPException(status_code=409, detail=f"image {image_id!r} exists; remove it first")
            _fsync_copy(image_filename, tmp)
            os.replace(tmp, dest)
            info = dict(image_info or {})
            info.update(ts=int(time.time()), name=name)
            self._datastore.objects[image_id] = ImageLabelModel(image=DataModel(info=info, ext=image_ext))
            self._update_datastore_file()
        return image_id

    def update_image_info(self, image_id: str, info: Dict[str, Any]) -> None:
        with self._locked():
            self._init_from_datastore_file()
            obj = self._datastore.objects.get(image_id)
            if not obj:
                raise HTTPException(status_code=404, detail=f"image {image_id!r} not found in the datastore")
            obj.image.info.update(info)
            self._update_datastore_file()

    def update_label_info(self, label_id: str, label_tag: str, info: Dict[str, Any]) -> None:
        with self._locked():
            self._init_from_datastore_file()
            label = self._datastore.label(label_id, label_tag)
            if not label:
                raise HTTPException(status_code=404, detail=f"label {label_id!r} with tag {label_tag!r} not found")
            label.info.update(info)
            self._update_datastore_file()

    def label_versions(self, image_id: str, label_tag: str = DefaultLabelTag.FINAL.value) -> list[str]:
        """Files of the earlier labels of ``image_id`` (oldest first)."""
        folder = os.path.join(self._datastore_path, VERSIONS_DIR, check_tag(label_tag))
        if not os.path.isdir(folder):
            return []
        pattern = re.compile(re.escape(image_id) + r"\.v(\d+)\.(?!json$).+$")
        found = [(int(m.group(1)), f) for f in os.listdir(folder) if (m := pattern.match(f))]
        return [os.path.join(folder, f) for _, f in sorted(found)]
