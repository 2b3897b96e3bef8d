"""Malformed requests for the MONAI Label app, generated from a fixed seed (``tests/test_app_load.py``).

Each case is ``(name, send)``; ``send()`` performs one HTTP request against the server and returns the response.
None of them is valid, so each must be answered 4xx with a reason, change nothing in the datastore and leave the
server up. Kinds: bad JSON and bad types, NaN/inf and out-of-range clicks, 2-D points, unknown image, model,
strategy, method, huge click lists, bad segment names, ROIs, flags and output types, corrupt uploads (labels,
images, models, images sent with a click), labels whose geometry differs from their image's, path-like ids and
tags, bad train and scoring requests.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np
import requests
from app_testing import MODEL, write_image

Case = tuple[str, Callable[[], requests.Response]]
TIMEOUT = 120


def _infer(url: str, image: str, params_text: str, model: str = MODEL) -> Callable[[], requests.Response]:
    return lambda: requests.post(
        f"{url}/infer/{model}", params={"image": image}, files={"params": (None, params_text)}, timeout=TIMEOUT
    )


def _upload(url: str, path: str, query: dict, field: str, file: Path, form: dict | None = None):
    def send():
        with open(file, "rb") as fh:
            files = {field: (file.name, fh), **{k: (None, v) for k, v in (form or {}).items()}}
            return requests.put(f"{url}{path}", params=query, files=files, timeout=TIMEOUT)

    return send


def _infer_upload(url: str, file: Path) -> Callable[[], requests.Response]:
    """A click on an uploaded image, as the Slicer plugin sends an image the server does not have."""
    params = json.dumps({"label": "lesion", "foreground": [[1, 1, 1]]})

    def send():
        with open(file, "rb") as fh:
            files = {"file": (file.name, fh), "params": (None, params)}
            return requests.post(f"{url}/infer/{MODEL}", files=files, timeout=TIMEOUT)

    return send


def _post_json(url: str, path: str, body) -> Callable[[], requests.Response]:
    return lambda: requests.post(f"{url}{path}", data=json.dumps(body), timeout=TIMEOUT)


def click_cases(url: str, rng: np.random.Generator, shape=(72, 64, 32)) -> list[Case]:
    cases: list[Case] = []

    def add(name, params, image="alpha", model=MODEL, raw=False):
        cases.append((name, _infer(url, image, params if raw else json.dumps(params), model)))

    good = [[30, 32, 16]]
    for n in range(12):
        add(f"params-not-json-{n}", "{" + "x" * int(rng.integers(1, 20)), raw=True)
    for n, value in enumerate([[1, 2, 3], 5, "clicks", None, True, 3.5]):
        add(f"params-not-object-{n}", json.dumps(value), raw=True)
    bad_lists = ["12,3,4", 7, {"x": 1}, [["a", "b", "c"]], [[True, 1, 2]], [[[1, 2, 3]]], [1, 2, 3], [None]]
    for n, value in enumerate(bad_lists):
        add(f"foreground-bad-type-{n}", {"foreground": value})
        add(f"background-bad-type-{n}", {"foreground": good, "background": value})
    for n in range(12):
        p = [float(v) for v in rng.integers(0, 20, 3)]
        p[int(rng.integers(0, 3))] = ["NaN", "Infinity", "-Infinity"][n % 3]
        text = json.dumps({"foreground": [p]}).replace('"NaN"', "NaN").replace('"Infinity"', "Infinity")
        add(f"non-finite-click-{n}", text.replace('"-Infinity"', "-Infinity"), raw=True)
    for n in range(20):
        axis, high = int(rng.integers(0, 3)), bool(rng.integers(0, 2))
        p = [int(rng.integers(0, s)) for s in shape]
        p[axis] = shape[axis] + int(rng.integers(0, 500)) if high else -int(rng.integers(1, 500))
        add(f"out-of-range-click-{n}", {"foreground": good if n % 2 else [p], "background": [p] if n % 2 else []})
    for n in range(6):
        add(f"2d-point-{n}", {"foreground": [[int(v) for v in rng.integers(0, 30, 2)]]})
    for n in range(4):
        count = int(rng.integers(201, 3000))
        add(f"huge-click-list-{n}", {"foreground": rng.integers(0, 30, (count, 3)).tolist()})
    for n, image in enumerate(["no_such_image", "../studies/alpha", "/etc/passwd", "alpha.nrrd", "", ".lock"]):
        add(f"unknown-image-{n}", {"foreground": good}, image=image)
    for n, model in enumerate(["no_such_model", "deepedit", "sgpsam2"]):
        add(f"unknown-model-{n}", {"foreground": good}, model=model)
    for n, label in enumerate([["lesion"], 5, {"a": 1}, "x" * 300, "bad\nname", "\x00"]):
        add(f"bad-segment-name-{n}", {"label": label, "foreground": good})
    for n, flag in enumerate(["maybe", 2, [True], {"a": 1}]):
        add(f"bad-reset-flag-{n}", {"foreground": good, "reset_state": flag})
    bad_rois = [[1, 2], [0, 10, 0, 10, 0, "a"], [500, 600, 0, 10, 0, 10], [-50, -10, 0, 5, 0, 5], "roi", 5]
    for n, roi in enumerate(bad_rois):
        add(f"bad-roi-{n}", {"foreground": good, "roi": roi})
    for n, ext in enumerate(["../x.nrrd", ".exe", 5, ".mhd"]):
        add(f"bad-result-extension-{n}", {"foreground": good, "result_extension": ext})
    for n, client in enumerate([5, ["a"], "x" * 300, "tab\tname"]):
        add(f"bad-client-id-{n}", {"foreground": good, "client_id": client})
    cases.append(("infer-no-image", lambda: requests.post(f"{url}/infer/{MODEL}", timeout=TIMEOUT)))
    cases.append(("infer-dicom-seg", lambda: requests.post(f"{url}/infer/{MODEL}?image=alpha&output=dicom_seg")))
    cases.append(("infer-bad-output", lambda: requests.post(f"{url}/infer/{MODEL}?image=alpha&output=pdf")))
    return cases


def upload_files(folder: Path, rng: np.random.Generator, shape=(72, 64, 32), spacing=(1.5, 1.5, 2.0)) -> dict:
    """Corrupt files and labels whose geometry differs from ``alpha``'s, written once into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    valid = folder / "valid_label.nrrd"
    label = np.zeros(shape, np.uint8)
    write_image(valid, label, spacing, origin=(-50.0, 20.0, 0.0))
    files = {}
    for n in range(6):
        name = ["garbage.nrrd", "garbage.nii.gz", "empty.nrrd", "text.nii", "noise.nrrd", "zeros.nii.gz"][n]
        data = [rng.bytes(int(rng.integers(10, 5000))), rng.bytes(300), b"", b"not an image", rng.bytes(2000), b"\0"]
        (folder / name).write_bytes(data[n])
        files[f"corrupt-{name}"] = folder / name
    whole = valid.read_bytes()
    for n in range(4):
        cut = folder / f"truncated_{n}.nrrd"
        cut.write_bytes(whole[: int(rng.integers(10, len(whole) - 1))])
        files[f"truncated-{n}"] = cut
    rotation = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    variants = {
        "shape": dict(array=np.zeros((shape[0] - 1, *shape[1:]), np.uint8)),
        "spacing": dict(spacing=(1.6, 1.5, 2.0)),
        "origin": dict(origin=(-45.0, 20.0, 0.0)),
        "direction": dict(direction=rotation),
        "two-components": None,
    }
    for name, change in variants.items():
        path = folder / f"geometry_{name}.nrrd"
        if change is None:
            import SimpleITK as sitk

            vector = sitk.Compose([sitk.GetImageFromArray(np.transpose(label, (2, 1, 0)))] * 2)
            vector.SetSpacing(spacing)
            vector.SetOrigin((-50.0, 20.0, 0.0))
            sitk.WriteImage(vector, str(path))
        else:
            kwargs = {"spacing": spacing, "origin": (-50.0, 20.0, 0.0), **change}
            write_image(path, kwargs.pop("array", label), **kwargs)
        files[f"geometry-{name}"] = path
    return files


def datastore_cases(url: str, folder: Path, rng: np.random.Generator) -> list[Case]:
    files = upload_files(folder, rng)
    valid = folder / "valid_label.nrrd"
    cases: list[Case] = []
    for name, path in files.items():
        cases.append((f"save-label-{name}", _upload(url, "/datastore/label", {"image": "alpha"}, "label", path)))
        cases.append((f"upload-model-{name}", _upload(url, f"/model/{MODEL}", {}, "file", path)))
        if not name.startswith("geometry"):  # those are valid images: as new images they would be accepted
            query = {"image": f"new_{name}"}
            cases.append((f"add-image-{name}", _upload(url, "/datastore/image", query, "file", path)))
            cases.append((f"infer-upload-{name}", _infer_upload(url, path)))
    for n, image in enumerate(["no_such_image", "../alpha", "", "big.nii"]):
        send = _upload(url, "/datastore/label", {"image": image}, "label", valid)
        cases.append((f"save-label-unknown-image-{n}", send))
    for n, tag in enumerate(["../final", ".hidden", "a/b", "x" * 100, "final label"]):
        query = {"image": "alpha", "tag": tag}
        cases.append((f"save-label-bad-tag-{n}", _upload(url, "/datastore/label", query, "label", valid)))
    for n, params in enumerate(["{", "[1, 2]", "5", '"text"']):
        form = {"params": params}
        send = _upload(url, "/datastore/label", {"image": "alpha"}, "label", valid, form)
        cases.append((f"save-label-bad-params-{n}", send))
    image_file = folder / "copy_of_alpha.nrrd"
    write_image(image_file, np.zeros((8, 8, 8), np.int16))
    for n, image_id in enumerate(["alpha", "../escape", ".hidden", "a\\b", "big"]):
        query = {"image": image_id}
        cases.append((f"add-image-bad-or-existing-id-{n}", _upload(url, "/datastore/image", query, "file", image_file)))
    for n, info in enumerate(["{", "[1]", "7", "x" * 70000]):
        put = dict(params={"image": "alpha"}, files={"info": (None, info)}, timeout=TIMEOUT)
        cases.append((f"image-info-bad-{n}", lambda put=put: requests.put(f"{url}/datastore/image/info", **put)))
    put = dict(params={"image": "no_such_image"}, files={"info": (None, "{}")}, timeout=TIMEOUT)
    cases.append(("image-info-unknown-image", lambda: requests.put(f"{url}/datastore/image/info", **put)))
    put = dict(params={"label": "alpha", "tag": "final"}, files={"info": (None, "{}")}, timeout=TIMEOUT)
    cases.append(("label-info-no-label", lambda: requests.put(f"{url}/datastore/label/info", **put)))
    return cases


def task_cases(url: str, rng: np.random.Generator) -> list[Case]:
    cases: list[Case] = []
    for n, strategy in enumerate(["no_such_strategy", "Random", "uncertainty2"]):
        cases.append((f"unknown-strategy-{n}", _post_json(url, f"/activelearning/{strategy}", {})))
    for n, body in enumerate([[1, 2], "text", 5]):
        cases.append((f"strategy-params-not-object-{n}", _post_json(url, "/activelearning/random", body)))
    cases.append(("strategy-bad-client-id", _post_json(url, "/activelearning/random", {"client_id": [1]})))
    for n, model in enumerate(["no_such_model", "sgpsam_2"]):
        cases.append((f"train-unknown-model-{n}", _post_json(url, f"/train/{model}", {"max_epochs": 1})))
    bad_train = [
        {"max_epochs": "abc"},
        {"max_epochs": 0},
        {"max_epochs": -3},
        {"max_epochs": 1.5},
        {"max_epochs": 10**9},
        {"max_epochs": True},
        {"val_split": 2},
        {"val_split": "half"},
        {"val_split": -0.5},
        {"pretrained": "sometimes"},
        {"device": 5},
        {"device": {"gpu": 0}},
    ]
    for n, body in enumerate(bad_train):
        cases.append((f"train-bad-request-{n}", _post_json(url, f"/train/{MODEL}", body)))
    cases.append(("train-body-not-object", _post_json(url, f"/train/{MODEL}", [1])))
    for n, method in enumerate(["no_such_method", "dice"]):
        cases.append((f"scoring-unknown-method-{n}", _post_json(url, f"/scoring/{method}", {})))
    for n, body in enumerate([{"max_samples": "x"}, {"max_samples": -1}, {"force": "perhaps"}]):
        cases.append((f"scoring-bad-request-{n}", _post_json(url, "/scoring/sgpsam_uncertainty", body)))
    for n, model in enumerate(["no_such_model", "segmentation"]):
        cases.append((f"batch-unknown-model-{n}", _post_json(url, f"/batch/infer/{model}", {})))
    cases.append(("batch-bad-images", lambda: requests.post(f"{url}/batch/infer/{MODEL}?images=some", timeout=TIMEOUT)))
    cases.append(("model-unknown-upload", _upload(url, "/model/no_such_model", {}, "file", Path(__file__))))
    cases.append(("model-delete-unknown", lambda: requests.delete(f"{url}/model/no_such_model", timeout=TIMEOUT)))
    cases.append(("model-delete-nothing-trained", lambda: requests.delete(f"{url}/model/{MODEL}", timeout=TIMEOUT)))
    return cases


def malformed_requests(url: str, studies: Path, scratch: Path, seed: int = 18) -> list[Case]:
    rng = np.random.default_rng(seed)
    cases = click_cases(url, rng) + datastore_cases(url, scratch / "uploads", rng) + task_cases(url, rng)
    order = rng.permutation(len(cases))
    return [cases[i] for i in order]
