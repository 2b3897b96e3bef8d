"""The MONAI Label app as 3D Slicer's plugin and a team use it: segment names, no points, ROI, client ids, Next
Sample, saving twice, batch inference, model upload, what ``/info`` shows, and mask geometry read with ITK.

One real server (``monailabel start_server``, 127.0.0.1, tiny preset, hand-set ``cube`` weights whose mask is a
~24 mm cube centred on a new lesion's first click; see ``app_testing``), driven by MONAI Label's client.
"""

from __future__ import annotations

import copy
import hashlib
import json
import sys
import time

import numpy as np
import pytest
import requests
import SimpleITK as sitk
import torch
from app_testing import (
    APP_DIR,
    MODEL,
    AppServer,
    blob_image,
    make_cube_checkpoint,
    make_random_checkpoint,
    write_image,
)
from fastapi import HTTPException
from monailabel.client.client import MONAILabelClientException
from requests_toolbelt.adapters.source import SourceAddressAdapter

pytestmark = pytest.mark.timeout(600)

SPACING = (1.0, 1.1, 2.0)
SHAPE = (64, 56, 30)
CLICK = [30, 28, 14]


def rotation(z_deg: float, x_deg: float) -> np.ndarray:
    z, x = np.radians(z_deg), np.radians(x_deg)
    rz = np.array([[np.cos(z), -np.sin(z), 0], [np.sin(z), np.cos(z), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(x), -np.sin(x)], [0, np.sin(x), np.cos(x)]])
    return rz @ rx


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("app_slicer")
    studies = root / "studies"
    studies.mkdir()
    for n, name in enumerate(("case1", "case2", "case3", "case4")):
        image, _ = blob_image(SHAPE, centre=CLICK, radius=4, seed=n)
        write_image(studies / f"{name}.nrrd", image, SPACING, origin=(10.0, -20.0, 5.0))
    image, _ = blob_image((60, 50, 24), centre=CLICK, radius=4, seed=9)
    write_image(studies / "oblique.nrrd", image, (0.8, 0.9, 2.0), (12.0, -40.0, 3.0), rotation(30, 12))
    write_image(studies / "tilted.nii.gz", image, (1.2, 0.9, 1.5), (-8.0, 15.0, 30.0), rotation(-20, 25))
    ckpt = root / "cube.pt"
    make_cube_checkpoint(ckpt)
    conf = {"checkpoint": ckpt, "model_dir": root / "model"}
    srv = AppServer(root, studies, conf, env={"MONAI_LABEL_AUTO_UPDATE_SCORING": "false"})
    srv.checkpoint = ckpt
    yield srv
    srv.stop()


def read(path) -> tuple[np.ndarray, sitk.Image]:
    """(array indexed (i, j, k), image) read with ITK, as Slicer reads a returned mask."""
    image = sitk.ReadImage(str(path))
    return np.transpose(sitk.GetArrayFromImage(image), (2, 1, 0)), image


def click(srv, image, label, fg, bg=(), client_id="reader-1", **extra):
    """One Slicer-like request; (mask (i, j, k), result params, the mask as ITK read it)."""
    mask_file, params = srv.client(client_id).infer(
        MODEL, image, {"label": label, "foreground": [list(p) for p in fg], "background": list(bg), **extra}
    )
    array, image = read(mask_file)
    return array, params, image


# ----------------------------------------------------------------------------------------------------------------
# segment names, no points, ROI (items 1-3)
# ----------------------------------------------------------------------------------------------------------------
def test_any_segment_name_has_its_own_session_and_comes_back_under_its_name(server):
    far = [CLICK[0] + 25, CLICK[1], CLICK[2]]
    mask, params, _ = click(server, "case1", "Segment_1", [CLICK])
    assert params["label_names"] == {"Segment_1": 1} and params["session"]["segment"] == "Segment_1"
    assert mask[tuple(CLICK)] == 1 and mask.max() == 1
    mask, params, _ = click(server, "case1", "Läsion 2 (liver)", [far])
    assert params["label_names"] == {"Läsion 2 (liver)": 1} and params["objects"] == 1, "a new segment, a new session"
    assert mask[tuple(far)] == 1 and mask[tuple(CLICK)] == 0, "the other segment's clicks must not leak in"
    _, params, _ = click(server, "case1", "Segment_1", [CLICK, [CLICK[0] + 1, *CLICK[1:]]])
    assert params["new_clicks"] == 1 and params["undone_clicks"] == 0, "Segment_1's history was lost"


def test_no_points_gives_an_empty_mask_and_starts_the_session_over(server):
    click(server, "case2", "lesion", [CLICK], client_id="reader-2")
    mask, params, _ = click(server, "case2", "lesion", [], client_id="reader-2")
    assert mask.shape == SHAPE and mask.max() == 0 and params["empty"] is True
    _, params, _ = click(server, "case2", "lesion", [CLICK], client_id="reader-2")
    assert params["new_clicks"] == 1 and params["undone_clicks"] == 0, "the session was not started over"


def test_roi_restricts_the_mask_and_ignores_clicks_outside_it(server):
    roi = [CLICK[0] + 5, CLICK[0] - 5, CLICK[1] - 4, CLICK[1] + 4, CLICK[2] - 3, CLICK[2] + 3]  # Slicer: any order
    outside = [2, 2, 2]
    mask, params, out = click(server, "case3", "lesion", [CLICK, outside], roi=roi, client_id="reader-3")
    assert mask.shape == SHAPE and mask[tuple(CLICK)] == 1
    inside = np.zeros(SHAPE, bool)
    inside[CLICK[0] - 5 : CLICK[0] + 6, CLICK[1] - 4 : CLICK[1] + 5, CLICK[2] - 3 : CLICK[2] + 4] = True
    assert mask[~inside].max() == 0, "the mask reaches outside the ROI"
    assert mask[inside].mean() > 0.8, "the cube covers (almost) the whole ROI here"
    assert params["ignored_clicks"] == 1 and params["roi"] == [[25, 35], [24, 32], [11, 17]]
    image = sitk.ReadImage(str(server.studies / "case3.nrrd"))
    np.testing.assert_allclose(out.GetOrigin(), image.GetOrigin(), atol=1e-4)  # the full grid, not the ROI's
    wider = [CLICK[0] - 8, CLICK[0] + 8, CLICK[1] - 8, CLICK[1] + 8, CLICK[2] - 5, CLICK[2] + 5]
    _, params, _ = click(server, "case3", "lesion", [CLICK], roi=wider, client_id="reader-3")
    assert params["reset"] is True, "a new ROI starts the session over"
    mask, params, _ = click(server, "case3", "lesion", [], roi=wider, client_id="reader-3")
    assert mask.max() == 0 and params["empty"] is True  # only an ROI, no points


# ----------------------------------------------------------------------------------------------------------------
# mask geometry read with ITK (item 6)
# ----------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("image_id, file_name", [("oblique", "oblique.nrrd"), ("tilted", "tilted.nii.gz")])
def test_mask_geometry_read_with_itk_matches_the_image(server, image_id, file_name):
    image = sitk.ReadImage(str(server.studies / file_name))
    assert not np.allclose(np.reshape(image.GetDirection(), (3, 3)), np.eye(3)), "the test image must be oblique"
    mask, _, out = click(server, image_id, "lesion", [CLICK], client_id="geometry")
    assert out.GetSize() == image.GetSize()
    np.testing.assert_allclose(out.GetSpacing(), image.GetSpacing(), rtol=1e-5)
    np.testing.assert_allclose(out.GetOrigin(), image.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(out.GetDirection(), image.GetDirection(), atol=1e-5)
    assert mask[tuple(CLICK)] == 1, "the clicked voxel (ITK index) must be in the mask"
    to_world = np.reshape(out.GetDirection(), (3, 3)) * np.asarray(out.GetSpacing())  # index -> LPS mm
    centre = np.asarray(out.GetOrigin()) + to_world @ np.argwhere(mask > 0).mean(0)
    clicked = np.asarray(image.TransformIndexToPhysicalPoint([int(v) for v in CLICK]))
    assert np.linalg.norm(centre - clicked) < 3.0, f"mask centre {centre} is not at the click {clicked} (mm)"


# ----------------------------------------------------------------------------------------------------------------
# several annotators (items 7, 9)
# ----------------------------------------------------------------------------------------------------------------
def test_default_client_ids_from_two_machines_keep_separate_histories(server):
    def session_from(address: str) -> requests.Session:
        http = requests.Session()
        http.mount("http://", SourceAddressAdapter(address))
        return http

    def slicer_click(http, fg):
        params = json.dumps({"label": "lesion", "foreground": fg, "background": [], "client_id": "user-xyz"})
        response = http.post(f"{server.url}/infer/{MODEL}?image=case4&output=json", files={"params": (None, params)})
        assert response.status_code == 200, response.text
        return response.json()

    first, second = session_from("127.0.0.1"), session_from("127.0.0.2")
    far = [CLICK[0] + 25, CLICK[1], CLICK[2]]
    assert slicer_click(first, [CLICK])["session"]["client"] == "address:127.0.0.1"
    assert slicer_click(second, [far])["session"]["client"] == "address:127.0.0.2"
    params = slicer_click(first, [CLICK, [CLICK[0] + 1, *CLICK[1:]]])
    assert params["new_clicks"] == 1 and params["undone_clicks"] == 0 and params["objects"] == 1, params


def test_session_owner_prefers_a_set_client_id_then_the_upload_session_then_the_address():
    sys.path.insert(0, str(APP_DIR))
    try:
        from lib.request import SERVER_KEY, session_owner
    finally:
        sys.path.remove(str(APP_DIR))
    server_side = {SERVER_KEY: {"address": "10.0.0.7", "session_id": "s-1"}}
    assert session_owner({"client_id": "alice", **server_side}) == "client:alice"
    assert session_owner({"client_id": "user-xyz", **server_side}) == "session:s-1"
    assert session_owner({"client_id": None, SERVER_KEY: {"address": "10.0.0.7"}}) == "address:10.0.0.7"


def test_next_sample_hands_each_client_another_image_and_keeps_a_clients_own(server):
    picks = {who: server.client(who).next_sample("uncertainty", {})["id"] for who in ("ann-a", "ann-b", "ann-c")}
    assert len(set(picks.values())) == 3, f"two clients got the same image: {picks}"
    assert server.client("ann-a").next_sample("uncertainty", {})["id"] == picks["ann-a"]
    assert server.client("ann-d").next_sample("first", {})["id"] not in picks.values()


def test_saving_a_label_again_keeps_the_previous_one(server, tmp_path):
    versions = []
    for n in range(2):
        label = np.zeros(SHAPE, np.uint8)
        label[10 + n : 20, 10:20, 5:10] = 1
        path = tmp_path / f"v{n}.nrrd"
        write_image(path, label, SPACING, origin=(10.0, -20.0, 5.0))
        server.client(f"ann-{n}").save_label("case2", str(path), tag="final")
        versions.append(path.read_bytes())
    assert (server.studies / "labels" / "final" / "case2.nrrd").read_bytes() == versions[1]
    assert (server.studies / ".label_versions" / "final" / "case2.v1.nrrd").read_bytes() == versions[0]
    info = requests.get(f"{server.url}/datastore/label/info", params={"label": "case2", "tag": "final"}).json()
    assert info["version"] == 2


@pytest.mark.parametrize(
    "change, reason",
    [
        ({"spacing": (1.0, 1.2, 2.0)}, "spacing"),
        ({"origin": (11.0, -20.0, 5.0)}, "origin"),
        ({"direction": rotation(90, 0)}, "direction"),
    ],
)
def test_label_on_another_grid_is_refused(server, tmp_path, change, reason):
    path = tmp_path / "label.nrrd"
    write_image(path, np.ones(SHAPE, np.uint8), **{"spacing": SPACING, "origin": (10.0, -20.0, 5.0), **change})
    with pytest.raises(MONAILabelClientException, match=f"Status: 422.*{reason}"):
        server.client().save_label("case1", str(path), tag="final")


# ----------------------------------------------------------------------------------------------------------------
# batch inference, /info, model upload (items 5, 12)
# ----------------------------------------------------------------------------------------------------------------
def test_batch_inference_skips_each_image_with_a_reason(server):
    response = requests.post(f"{server.url}/batch/infer/{MODEL}?run_sync=true", json={}, timeout=120)
    assert response.status_code == 200, response.text
    result = response.json()
    assert set(result) == {"case1", "case2", "case3", "case4", "oblique", "tilted"}
    assert all("clicks" in entry["skipped"] for entry in result.values())
    assert not list((server.studies / "labels" / "original").iterdir()), "batch inference wrote labels"


def test_info_shows_no_server_paths(server):
    text = requests.get(f"{server.url}/info/", timeout=10).text
    for folder in (server.root, server.studies, APP_DIR, APP_DIR.parents[1]):
        assert str(folder) not in text, f"/info shows the server folder {folder}"


def test_model_upload_and_delete_never_touch_the_start_checkpoint(server, tmp_path):
    before = hashlib.sha256(server.checkpoint.read_bytes()).hexdigest()
    trained = server.root / "model" / "model.pt"
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with open(garbage, "rb") as fh:
        response = requests.put(f"{server.url}/model/{MODEL}", files={"file": ("garbage.pt", fh)})
    assert response.status_code == 422 and not trained.exists(), response.text
    upload = tmp_path / "upload.pt"
    make_cube_checkpoint(upload)
    with open(upload, "rb") as fh:
        response = requests.put(f"{server.url}/model/{MODEL}", files={"file": ("upload.pt", fh)})
    assert response.status_code == 200, response.text
    assert trained.read_bytes() == upload.read_bytes()
    _, params, _ = click(server, "case1", "lesion", [CLICK], client_id="after-upload", reset_state=True)
    assert params["model_version"].startswith("model.pt@")
    assert requests.delete(f"{server.url}/model/{MODEL}").status_code == 200 and not trained.exists()
    assert hashlib.sha256(server.checkpoint.read_bytes()).hexdigest() == before, "the start checkpoint changed"
    _, params, _ = click(server, "case1", "lesion", [CLICK], client_id="after-delete", reset_state=True)
    assert params["model_version"].startswith("cube.pt@")


# ----------------------------------------------------------------------------------------------------------------
# in-process checks of the app's pieces (no server): the work one click may cost, train requests (items 4, 8)
# ----------------------------------------------------------------------------------------------------------------
def _app_modules():
    sys.path.insert(0, str(APP_DIR))
    try:
        from lib.infers.sgpsam import SGPSAMInfer
        from lib.settings import AppSettings
        from lib.trainers.sgpsam import resolve_device
    finally:
        sys.path.remove(str(APP_DIR))
    return SGPSAMInfer, AppSettings, resolve_device


def _whole_crop(network):
    """The network with a decoder whose logits are large and positive everywhere: every mask fills its crop."""
    with torch.no_grad():
        network.mask_decoder.output_upscaling[3].weight.zero_()
        network.mask_decoder.output_upscaling[3].bias.fill_(1.0)
        for mlp in network.mask_decoder.output_hypernetworks_mlps:
            mlp.layers[-1].weight.zero_()
            mlp.layers[-1].bias.fill_(10.0)
    return network


def test_one_click_costs_at_most_max_windows_crops_and_max_objects_lesions(tmp_path):
    SGPSAMInfer, AppSettings, _ = _app_modules()
    conf = {
        "checkpoint": make_random_checkpoint(tmp_path / "random.pt"),
        "device": "cpu",
        "model_dir": str(tmp_path / "model"),
    }
    task = SGPSAMInfer(AppSettings.from_conf({**conf, "max_windows": 2, "max_objects": 1}))
    task.engine.set_network(_whole_crop(task.model().network), "whole-crop")
    path = tmp_path / "wide.nrrd"
    write_image(path, np.full((220, 40, 30), 100, np.int16), (1.5, 1.5, 1.5))
    request = {"image": str(path), "image_id": "wide", "foreground": [[110, 20, 15]]}
    result = task.run_inferer(dict(request))["result"]
    assert result["windows"] == 2 and result["encoder_runs"] == 2, "the mask touches every face: capped at 2 crops"
    request["foreground"] = [[110, 20, 15], [5, 20, 15]]  # outside the first crop: a second lesion
    with pytest.raises(HTTPException, match="at most 1 per session") as err:
        task.run_inferer(dict(request))
    assert err.value.status_code == 422


def test_train_device_from_slicer_is_mapped_or_ignored():
    _, _, resolve_device = _app_modules()
    assert resolve_device("cpu", "cuda") == "cpu"
    assert resolve_device(["cpu"], "cuda") == "cpu"  # MONAI Label's device list, first entry
    assert resolve_device("NVIDIA Unknown GPU 9000", "cpu") == "cpu"  # not on this server: --conf device
    assert resolve_device(None, "cpu") == "cpu"
    with pytest.raises(ValueError, match="device must be a name"):
        resolve_device(5, "cpu")


def _small_case(tmp_path):
    path = tmp_path / "small.nrrd"
    image, _ = blob_image((40, 40, 24), centre=[20, 20, 12], radius=4)
    write_image(path, image, (1.5, 1.5, 1.5))
    return str(path)


def test_a_session_keeps_its_weights_until_reset_or_idle(tmp_path):
    SGPSAMInfer, AppSettings, _ = _app_modules()
    conf = {
        "checkpoint": make_random_checkpoint(tmp_path / "random.pt"),
        "device": "cpu",
        "model_dir": str(tmp_path / "model"),
    }
    engine = SGPSAMInfer(AppSettings.from_conf({**conf, "session_idle_s": 2})).engine
    path, first = _small_case(tmp_path), [20, 20, 12]
    started = engine.segment(path, path, [first], [], session_key="a").info["model_version"]
    engine.set_network(_whole_crop(copy.deepcopy(engine.network)), "retrained")
    assert engine.segment(path, path, [first, [21, 20, 12]], [], session_key="a").info["model_version"] == started
    assert engine.segment(path, path, [first], [], session_key="b").info["model_version"] == "retrained"
    assert engine.segment(path, path, [first], [], session_key="a", reset=True).info["model_version"] == "retrained"
    engine.segment(path, path, [first], [], session_key="c")
    time.sleep(2.5)  # idle longer than session_idle_s: dropped, the next click starts over
    again = engine.segment(path, path, [first, [22, 20, 12]], [], session_key="c").info
    assert again["new_clicks"] == 2 and again["undone_clicks"] == 0


@pytest.mark.parametrize("limit", [{"cache_mb": 1}, {"max_sessions": 1}])
def test_click_histories_count_in_one_memory_budget_and_the_oldest_session_goes_first(tmp_path, limit):
    SGPSAMInfer, AppSettings, _ = _app_modules()
    conf = {
        "checkpoint": make_random_checkpoint(tmp_path / "random.pt"),
        "device": "cpu",
        "model_dir": str(tmp_path / "model"),
    }
    engine = SGPSAMInfer(AppSettings.from_conf({**conf, **limit})).engine
    path, first = _small_case(tmp_path), [20, 20, 12]
    engine.segment(path, path, [first], [], session_key="old")
    engine.segment(path, path, [first], [], session_key="new")  # 64^3 float16 logits per round: 0.5 MiB
    again = engine.segment(path, path, [first, [21, 20, 12]], [], session_key="old").info
    assert again["new_clicks"] == 2, "the least recently used session should have been dropped"
    held = engine._cache.total + engine._sessions.nbytes()
    assert held <= engine.max_bytes or "max_sessions" in limit
