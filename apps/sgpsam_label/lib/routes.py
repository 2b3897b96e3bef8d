"""Checked versions of the MONAI Label 0.8.5 endpoints a bad request could turn into a 500, a blocked server or a
changed file (docs/monailabel.md, "Requests and errors").

MONAI Label runs ``/infer`` inside an ``async`` endpoint, so a first click that takes seconds on a CPU holds the
event loop and every other request (``/info`` included) waits behind it. It also parses the form's JSON without a
check (a typo answers 500), starts train/scoring/batch subprocesses for names that do not exist, and lets
``PUT``/``DELETE /model`` write over or rename the user's ``--conf checkpoint``. :func:`install` swaps these routes
for the functions below, which check the request and then call MONAI Label's own endpoint functions. They are
plain ``def`` functions, so FastAPI runs them in its thread pool and the event loop stays free.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any, Callable, Dict, Optional

from fastapi import BackgroundTasks, Depends, File, Form, HTTPException, Request, UploadFile
from monailabel.config import settings
from monailabel.endpoints import activelearning, batch_infer, datastore, infer, scoring, train
from monailabel.endpoints.infer import ResultType
from monailabel.endpoints.user.auth import RBAC, User
from monailabel.interfaces.datastore import DefaultLabelTag
from monailabel.interfaces.tasks.batch_infer import BatchInferImageType
from monailabel.interfaces.utils.app import app_instance
from monailabel.utils.others.generic import remove_file

from .request import SERVER_KEY, unprocessable

logger = logging.getLogger(__name__)

MAX_INFO_CHARS = 65536  # image/label info a client may store in datastore_v2.json per request
USER = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER))
ANNOTATOR = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ANNOTATOR))
ADMIN = Depends(RBAC(settings.MONAI_LABEL_AUTH_ROLE_ADMIN))


def json_object(text: Optional[str], name: str, max_chars: int | None = None) -> Dict[str, Any]:
    if max_chars is not None and text and len(text) > max_chars:
        raise unprocessable(f"{name} is {len(text)} characters long; at most {max_chars}")
    try:
        value = json.loads(text) if text else {}
    except ValueError as err:
        raise unprocessable(f"{name} is not valid JSON: {err}") from None
    if not isinstance(value, dict):
        raise unprocessable(f"{name} must be a JSON object, got {type(value).__name__}")
    return value


def _server_side(request: Request, session_id: str = "", upload: bool = False) -> Dict[str, Any]:
    return {"address": request.client.host if request.client else "", "session_id": session_id, "upload": upload}


def _task(kind: str, name: str):
    tasks = {"model": "_infers", "trainer": "_trainers", "method": "_scoring_methods"}[kind]
    found = getattr(app_instance(), tasks).get(name)
    if found is None:
        available = sorted(getattr(app_instance(), tasks))
        raise HTTPException(status_code=404, detail=f"unknown {kind} {name!r}; available: {available}")
    return found


def _checked(check: Callable[[Dict[str, Any]], Dict[str, Any]], params: Optional[dict]) -> Dict[str, Any]:
    try:
        return check(dict(params or {}))
    except ValueError as err:
        raise unprocessable(str(err).splitlines()[0][:300]) from None


def _removing_uploads_on_error(background_tasks: BackgroundTasks, call: Callable[[], Any]):
    """``call()``; if it fails, delete the request's uploaded files before the error answer goes out.

    MONAI Label removes an upload in a background task, and Starlette runs those only after a successful response:
    every refused upload (a corrupt image, a label of the wrong shape) would otherwise stay in the server's temp
    folder for good.
    """
    try:
        return call()
    except BaseException:
        for task in background_tasks.tasks:
            if task.func is remove_file:
                try:
                    remove_file(*task.args, **task.kwargs)
                except OSError as err:  # the request's own error is the one to report
                    logger.warning(f"could not delete the upload {task.args}: {err}")
        raise


# -- inference and active learning ------------------------------------------------------------------------------
def run_infer(
    request: Request,
    background_tasks: BackgroundTasks,
    model: str,
    image: str = "",
    session_id: str = "",
    params: str = Form("{}"),
    file: UploadFile = File(None),
    label: UploadFile = File(None),
    output: Optional[ResultType] = None,
    user: User = USER,
):
    _task("model", model)
    values = json_object(params, "params")
    if not image and not session_id and file is None:
        raise unprocessable("no image given: pass image=<id>, session_id=<id> or an image file")
    if output == ResultType.dicom_seg:
        raise unprocessable("output=dicom_seg needs a DICOM-web datastore; this server has local files")
    values[SERVER_KEY] = _server_side(request, session_id, upload=file is not None)
    args = (background_tasks, model, image, session_id, json.dumps(values), file, label, output)
    return _removing_uploads_on_error(background_tasks, lambda: infer.run_inference(*args))


def next_sample(request: Request, strategy: str, params: Optional[dict] = None, user: User = USER):
    values = dict(params or {})
    values[SERVER_KEY] = _server_side(request)
    return activelearning.sample(strategy, values, user.username)


# -- datastore ---------------------------------------------------------------------------------------------------
def save_label(
    background_tasks: BackgroundTasks,
    image: str,
    params: str = Form("{}"),
    tag: str = DefaultLabelTag.FINAL.value,
    label: UploadFile = File(...),
    user: User = ANNOTATOR,
):
    json_object(params, "params", MAX_INFO_CHARS)
    return _removing_uploads_on_error(
        background_tasks, lambda: datastore.save_label(background_tasks, image, params, tag, label, user.username)
    )


def add_image(
    background_tasks: BackgroundTasks,
    image: Optional[str] = None,
    params: str = Form("{}"),
    file: UploadFile = File(...),
    user: User = ANNOTATOR,
):
    json_object(params, "params", MAX_INFO_CHARS)
    return _removing_uploads_on_error(
        background_tasks, lambda: datastore.add_image(background_tasks, image, params, file, user.username)
    )


def put_image_info(image: str, info: str = Form("{}"), user: User = ANNOTATOR):
    json_object(info, "info", MAX_INFO_CHARS)
    return datastore.update_image_info(image, info, user.username)


def put_label_info(label: str, tag: str, info: str = Form("{}"), user: User = ANNOTATOR):
    json_object(info, "info", MAX_INFO_CHARS)
    return datastore.update_label_info(label, tag, info, user.username)


def put_label_info_old(label: str, tag: str, params: str = Form("{}"), user: User = ANNOTATOR):
    return put_label_info(label, tag, params, user)


# -- background tasks ----------------------------------------------------------------------------------------------
def start_training(
    model: str,
    params: Optional[dict] = None,
    run_sync: Optional[bool] = False,
    enqueue: Optional[bool] = False,
    user: User = ADMIN,
):
    trainer = _task("trainer", model)
    return train.run_model(model, _checked(trainer.check_request, params), run_sync, enqueue)


def start_all_training(params: Optional[dict] = None, run_sync: Optional[bool] = False, user: User = ADMIN):
    return {name: start_training(name, params, run_sync, True, user) for name in app_instance()._trainers}


def start_scoring(
    method: str, params: Optional[dict] = None, run_sync: Optional[bool] = False, user: User = ANNOTATOR
):
    task = _task("method", method)
    check = getattr(task, "check_request", lambda values: {})
    return scoring.run_method(method, _checked(check, params), run_sync)


def start_batch_infer(
    model: str,
    images: Optional[BatchInferImageType] = BatchInferImageType.IMAGES_ALL,
    params: Optional[dict] = None,
    run_sync: Optional[bool] = False,
    user: User = ADMIN,
):
    _task("model", model)
    return batch_infer.run(model, images, dict(params or {}), run_sync)


# -- model file --------------------------------------------------------------------------------------------------
def upload_model(model: str, file: UploadFile, user: User = ANNOTATOR):
    """Checked like a start checkpoint, then written over the TRAINED model only (atomically)."""
    task = _task("model", model)
    try:
        return task.loader.install_upload(file.file)
    except ValueError as err:
        raise unprocessable(str(err).splitlines()[0][:300]) from None


def delete_model(model: str, user: User = ANNOTATOR):
    """Renames the trained model aside (MONAI Label's behaviour); the ``--conf checkpoint`` file is never touched."""
    task = _task("model", model)
    if not task.loader.retire_trained():
        raise HTTPException(status_code=404, detail=f"no trained model for {model}; the start checkpoint is kept")
    return {}


ROUTES = [  # (path, method, endpoint)
    ("/infer/{model}", "POST", run_infer),
    ("/activelearning/{strategy}", "POST", next_sample),
    ("/datastore/label", "PUT", save_label),
    ("/datastore/", "PUT", add_image),
    ("/datastore/image", "PUT", add_image),
    ("/datastore/image/info", "PUT", put_image_info),
    ("/datastore/label/info", "PUT", put_label_info),
    ("/datastore/updatelabelinfo", "PUT", put_label_info_old),
    ("/train/{model}", "POST", start_training),
    ("/train/", "POST", start_all_training),
    ("/scoring/{method}", "POST", start_scoring),
    ("/batch/infer/{model}", "POST", start_batch_infer),
    ("/model/{model}", "PUT", upload_model),
    ("/model/{model}", "DELETE", delete_model),
]


def install(fastapi_app) -> None:
    """Put these endpoints in front of MONAI Label's (Starlette serves the first route that matches a request)."""
    prefix = settings.MONAI_LABEL_API_STR
    routes = fastapi_app.router.routes
    for path, method, endpoint in ROUTES:
        fastapi_app.add_api_route(prefix + path, endpoint, methods=[method], summary=(endpoint.__doc__ or "").strip())
        routes.insert(0, routes.pop())
    if hasattr(fastapi_app.router, "_mark_routes_changed"):  # FastAPI >= 0.120 caches its route lists
        fastapi_app.router._mark_routes_changed()
    logger.info(f"checked endpoints installed in front of MONAI Label's: {len(ROUTES)} routes")


def install_into_running_server() -> bool:
    """Install into MONAI Label's FastAPI app if this process is the server (not a train/scoring subprocess)."""
    server = sys.modules.get("monailabel.app")
    if server is None or not hasattr(server, "app"):
        return False
    install(server.app)
    return True
