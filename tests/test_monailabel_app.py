"""End-to-end tests of the MONAI Label app ``apps/sgpsam_label``: the REAL server, driven by MONAI Label's client.

The server runs as a subprocess (``monailabel start_server``) on 127.0.0.1 with the tiny preset, a studies folder of
real MR cases (NRRD) and one synthetic NIfTI case, and HTTP(S) proxies pointing at a dead port so that anything
reaching for the internet at start-up would fail.

Weights: ``app_testing.make_cube_checkpoint`` (a test helper, built in the fixture in < 1 s, no training) sets a
tiny SGP-SAM by hand so that its output does not depend on the image and is a 16^3-voxel cube of positive logits
at the CENTRE of the input crop. Since the engine centres the crop of a new lesion on its first click, the mask is
a ~24 mm cube around the click: a model that "segments something around a click", deterministic and cheap, so the
geometry assertions (shape, affine, clicked voxel inside the mask) test the app and the engine, not a model's
accuracy. Training for a few seconds on a synthetic blob was tried first: ~200 steps took minutes on this CPU and
still reached only Dice 0.5.
"""

from __future__ import annotations

import json
import shutil
import sys
import threading

import nibabel as nib
import numpy as np
import pytest
import requests
import torch
from app_testing import APP_DIR, MODEL, AppServer, make_cube_checkpoint
from monai.transforms import LoadImage
from monailabel.client.client import MONAILabelClientException
from scipy.ndimage import distance_transform_edt

START_TIMEOUT_S = 150
TRAIN_TIMEOUT_S = 240

pytestmark = pytest.mark.timeout(900)


# ----------------------------------------------------------------------------------------------------------------
# fixtures
# ----------------------------------------------------------------------------------------------------------------
def load(path) -> tuple[np.ndarray, np.ndarray]:
    img = LoadImage(image_only=True)(str(path))
    return np.asarray(img), np.asarray(img.affine, dtype=np.float64)


def deepest_voxel(label_path) -> list[int]:
    """The lesion voxel farthest from the lesion border (file voxel indices, what Slicer sends)."""
    label, _ = load(label_path)
    dist = distance_transform_edt(label > 0)
    return [int(v) for v in np.unravel_index(int(np.argmax(dist)), dist.shape)]


@pytest.fixture(scope="module")
def server(tmp_path_factory, real_data_dir):
    root = tmp_path_factory.mktemp("monailabel")
    studies = root / "studies"
    studies.mkdir()
    for case in ("brain1", "brain2", "breast1"):
        shutil.copy(real_data_dir / f"{case}_image.nrrd", studies / f"{case}.nrrd")
    from scripts.data.synthetic_data import generate_case

    image, label, affine, _ = generate_case(np.random.default_rng(3), (96, 96, 24))
    nib.save(nib.Nifti1Image(image, affine), studies / "synth.nii.gz")
    nib.save(nib.Nifti1Image(label, affine), root / "synth_label.nii.gz")
    ckpt = root / "cube_tiny.pt"
    make_cube_checkpoint(ckpt)
    conf = {"checkpoint": ckpt, "model_dir": root / "model", "max_epochs": 1}
    try:
        srv = AppServer(root, studies, conf, timeout=START_TIMEOUT_S)
    except RuntimeError as err:
        pytest.fail(str(err))
    srv.model_dir, srv.shared = root / "model", {}
    yield srv
    srv.stop()


def infer(srv: AppServer, image: str, params: dict, client=None):
    client = client or srv.client()
    label_file, out = client.infer(MODEL, image, {"label": "lesion", **params})
    return label_file, out


def raw_infer(srv: AppServer, image: str, params_text: str, model: str = MODEL) -> requests.Response:
    return requests.post(f"{srv.url}/infer/{model}", params={"image": image}, files={"params": (None, params_text)})


def wait_idle(srv: AppServer, kind: str, timeout: float = 120) -> dict:
    try:
        return srv.wait_idle(kind, timeout)
    except TimeoutError as err:
        pytest.fail(str(err))


# ----------------------------------------------------------------------------------------------------------------
# tests (module order matters: they share one server)
# ----------------------------------------------------------------------------------------------------------------
sys.path.insert(0, str(APP_DIR))  # the app's own modules (``lib``), imported as the server imports them
from lib.scoring import uncertainty as unc  # noqa: E402

sys.path.remove(str(APP_DIR))  # keep the app's generic top-level names (main, lib) off other tests' path


def test_uncertainty_score_is_flip_disagreement(tmp_path, real_data_dir):
    a = torch.zeros(2, 8, 8, 8, dtype=torch.bool)
    a[:, 2:5, 2:5, 2:5] = True
    b = torch.zeros_like(a)
    b[:, 5:8, 5:8, 5:8] = True
    masks = torch.stack(
        [torch.stack([a[0], a[0], torch.zeros_like(a[0])]), torch.stack([a[1], b[1], torch.zeros_like(a[0])])], 1
    )
    np.testing.assert_allclose(unc.pairwise_disagreement(masks.transpose(0, 1)), [0.0, 1.0, 0.0], atol=1e-6)

    from scripts.checkpoint import load_weights
    from scripts.modeling import build_sgp_sam

    ckpt = tmp_path / "cube.pt"
    make_cube_checkpoint(ckpt)
    cube = build_sgp_sam("tiny").eval()
    load_weights(cube, ckpt)
    image = str(real_data_dir / "breast1_image.nrrd")
    result = unc.image_uncertainty(cube, image, num_candidates=3)
    assert result["score"] == 0.0 and result["members"] == 4  # a centred cube does not change when mirrored
    assert 1 <= len(result["candidates"]) <= 3 and all(len(p) == 3 for p in result["candidates"])
    torch.manual_seed(1)
    rand = build_sgp_sam("tiny").eval()
    score = unc.image_uncertainty(rand, image, num_candidates=3, flip_axes=(0,))["score"]
    assert 0.0 <= score <= 1.0


def test_info_lists_3d_point_model(server):
    info = server.client().info()
    model = info["models"][MODEL]
    assert model["type"] == "deepgrow" and model["dimension"] == 3 and model["labels"] == ["lesion"]
    assert model["sgpsam"]["preset"] == "tiny" and model["sgpsam"]["model_version"].startswith("cube_tiny.pt@")
    assert set(info["strategies"]) >= {"uncertainty", "random", "first"}
    assert "sgpsam_uncertainty" in info["scoring"] and MODEL in info["trainers"]
    assert info["labels"] == ["lesion"]


def test_click_in_real_lesion_returns_mask_in_image_geometry(server, real_data_dir):
    click = deepest_voxel(real_data_dir / "brain2_label.nrrd")
    label_file, params = infer(server, "brain2", {"foreground": [click], "background": []})
    image, image_affine = load(real_data_dir / "brain2_image.nrrd")
    mask, mask_affine = load(label_file)
    assert mask.shape == image.shape
    np.testing.assert_allclose(mask_affine, image_affine, atol=1e-4)
    assert mask[tuple(click)] == 1, "the clicked voxel must be inside the returned mask"
    assert 0 < mask.sum() < 0.05 * mask.size  # a lesion-sized blob, not the whole volume
    assert params["encoder_runs"] >= 1 and params["new_clicks"] == 1 and params["objects"] == 1
    server.shared["brain2"] = {"click": click, "mask": mask, "version": params["model_version"]}


def test_nifti_mask_keeps_affine(server):
    image = nib.load(server.root / "studies" / "synth.nii.gz")
    label = nib.load(server.root / "synth_label.nii.gz").get_fdata() > 0
    click = [int(v) for v in np.unravel_index(int(np.argmax(distance_transform_edt(label))), label.shape)]
    label_file, params = infer(
        server, "synth", {"foreground": [click], "background": [], "result_extension": ".nii.gz"}
    )
    out = nib.load(label_file)
    assert out.shape == image.shape
    np.testing.assert_allclose(out.affine, image.affine, atol=1e-4)
    assert out.get_fdata()[tuple(click)] == 1


def test_repeat_click_uses_cached_embedding(server):
    first = server.shared["brain2"]["click"]
    second = [first[0] + 2, first[1], first[2]]
    _, params = infer(server, "brain2", {"foreground": [first, second], "background": []})
    assert params["encoder_runs"] == 0 and params["cache_hits"] >= 1
    assert params["new_clicks"] == 1 and params["decoder_runs"] >= 1


def test_undo_and_reset(server):
    first = server.shared["brain2"]["click"]
    label_file, params = infer(server, "brain2", {"foreground": [first], "background": []})
    assert params["undone_clicks"] == 1 and params["new_clicks"] == 0
    assert params["decoder_runs"] == 0 and params["encoder_runs"] == 0  # exact restore of round one
    np.testing.assert_array_equal(load(label_file)[0], server.shared["brain2"]["mask"])

    _, params = infer(server, "brain2", {"foreground": [first], "background": [], "reset_state": True})
    assert params["reset"] is True and params["new_clicks"] == 1 and params["undone_clicks"] == 0
    assert params["decoder_runs"] >= 1 and params["encoder_runs"] == 0  # fresh session, cached embedding

    far = [10, 10, first[2]]  # a foreground click far from the lesion starts a second object
    _, params = infer(server, "brain2", {"foreground": [first, far], "background": []})
    assert params["objects"] == 2


@pytest.mark.parametrize(
    "params_text, status, reason",
    [
        (json.dumps({"label": "lesion", "foreground": [[9999, 0, 0]]}), 422, "outside the image"),
        (json.dumps({"label": "lesion", "foreground": [1, 2, 3]}), 422, "not a list of 3 numbers"),
        (json.dumps({"label": "lesion", "foreground": [[1, 2]]}), 422, "not a list of 3 numbers"),
        (json.dumps({"label": "lesion", "foreground": [[float("nan"), 2, 3]]}), 422, "non-finite"),
        (json.dumps({"label": ["lesion"], "foreground": [[10, 10, 5]]}), 422, "must be a string"),
        (json.dumps({"label": "lesion", "foreground": [[10, 10, 5]], "roi": [1, 2]}), 422, "roi must be 6"),
        (json.dumps({"label": "lesion", "foreground": [[10, 10, 5]], "reset_state": "maybe"}), 422, "reset_state"),
    ],
)
def test_malformed_click_requests_get_4xx(server, params_text, status, reason):
    response = raw_infer(server, "brain2", params_text)
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert reason in detail and "\n" not in detail


def test_missing_image_model_and_strategy_get_404_and_server_keeps_serving(server):
    for response in (
        raw_infer(server, "no_such_image", json.dumps({"foreground": [[1, 1, 1]]})),
        raw_infer(server, "brain2", json.dumps({"foreground": [[1, 1, 1]]}), model="no_such_model"),
        requests.post(f"{server.url}/activelearning/no_such_strategy", json={}),
    ):
        assert response.status_code == 404, response.text
        assert "not found" in response.json()["detail"] or "unknown" in response.json()["detail"]
    with pytest.raises(MONAILabelClientException, match="Status: 4"):
        server.client().infer(MODEL, "brain2", {"label": "lesion", "foreground": [[-5, 0, 0]]})
    assert requests.get(f"{server.url}/info/", timeout=10).status_code == 200
    click = server.shared["brain2"]["click"]
    _, params = infer(server, "brain2", {"foreground": [click], "background": [], "reset_state": True})
    assert params["new_clicks"] == 1


def test_concurrent_clicks_on_two_images(server, real_data_dir):
    cases = {"breast1": deepest_voxel(real_data_dir / "breast1_label.nrrd"), "brain1": [128, 128, 12]}
    results, errors = {}, []

    def work(image):
        try:
            client = server.client()
            for _ in range(2):
                results[image] = infer(
                    server, image, {"foreground": [cases[image]], "background": [], "reset_state": True}, client
                )
        except Exception as err:  # reported below
            errors.append(f"{image}: {err!r}")

    threads = [threading.Thread(target=work, args=(image,)) for image in cases]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=180)
    assert not errors, errors
    for image, click in cases.items():
        label_file, params = results[image]
        ref, ref_affine = load(real_data_dir / f"{image}_image.nrrd")
        mask, affine = load(label_file)
        assert mask.shape == ref.shape and mask[tuple(click)] == 1
        np.testing.assert_allclose(affine, ref_affine, atol=1e-4)
        assert params["session"]["image"] == image and params["session"]["segment"] == "lesion"
    assert requests.get(f"{server.url}/info/", timeout=10).status_code == 200


def test_save_label_never_corrupts_existing_labels(server, real_data_dir):
    client = server.client()
    client.save_label("brain2", str(real_data_dir / "brain2_label.nrrd"), tag="final")
    client.save_label("synth", str(server.root / "synth_label.nii.gz"), tag="final")
    saved = server.root / "studies" / "labels" / "final" / "brain2.nrrd"
    before = saved.read_bytes()

    garbage = server.root / "garbage.nrrd"
    garbage.write_bytes(b"not an image at all")
    wrong_shape = real_data_dir / "breast1_label.nrrd"
    uploads_before = set(server.tmp.glob("*.nrrd"))
    for bad in (garbage, wrong_shape):
        with pytest.raises(MONAILabelClientException, match="Status: 422"):
            client.save_label("brain2", str(bad), tag="final")
    with pytest.raises(MONAILabelClientException, match="Status: 404"):
        client.save_label("no_such_image", str(real_data_dir / "brain2_label.nrrd"), tag="final")
    click = json.dumps({"label": "lesion", "foreground": [[1, 1, 1]]})
    with open(garbage, "rb") as fh:  # a corrupt image sent with a click, as the Slicer plugin uploads images
        files = {"params": (None, click), "file": ("x.nrrd", fh)}
        response = requests.post(f"{server.url}/infer/{MODEL}", files=files, timeout=120)
    assert response.status_code == 422 and "cannot be read" in response.json()["detail"], response.text
    assert set(server.tmp.glob("*.nrrd")) <= uploads_before  # refused uploads are not left in the server's temp
    assert saved.read_bytes() == before
    assert not list(saved.parent.glob(".*.tmp"))
    datastore = client.datastore()
    assert datastore["objects"]["brain2"]["labels"]["final"]["ext"] == ".nrrd"
    assert "final" in datastore["objects"]["synth"]["labels"]
    assert set(client.datastore()["objects"]) == {"brain1", "brain2", "breast1", "synth"}


def test_strategies(server):
    client = server.client()
    # the scoring method (run at start-up) has scored every unlabeled image with the current model
    wait_idle(server, "scoring")
    version = server.shared["brain2"]["version"]
    for image in ("brain1", "breast1"):
        entry = requests.get(f"{server.url}/datastore/image/info", params={"image": image}).json()["sgpsam_uncertainty"]
        assert 0.0 <= entry["score"] <= 1.0 and entry["model"] == version and entry["members"] == 4

    # the strategy follows the score (set here: the cube model is image-independent, so its scores tie)
    for image, score in (("brain1", 0.2), ("breast1", 0.7)):
        info = {"sgpsam_uncertainty": {"score": score, "model": version}}
        files = {"info": (None, json.dumps(info))}
        r = requests.put(f"{server.url}/datastore/image/info", params={"image": image}, files=files)
        assert r.status_code == 200, r.text
    for _ in range(2):  # served again: no re-sorting by when it was last served
        sample = client.next_sample("uncertainty", {})
        assert sample["id"] == "breast1" and sample["score"] == pytest.approx(0.7)
    assert client.next_sample("first", {})["id"] == "brain1"
    assert client.next_sample("random", {})["id"] in ("brain1", "breast1")


def test_train_then_model_reloads(server):
    client = server.client()
    task = client.train_start(MODEL, {"max_epochs": 1})
    assert task.get("status") in ("SUBMITTED", "RUNNING", "DONE"), task
    status = wait_idle(server, "train", TRAIN_TIMEOUT_S)
    assert status.get("status") == "DONE", f"{status}\n{server.tail(80)}"
    stats = client.info()["train_stats"][MODEL]
    assert stats["status"] == "DONE" and stats["epoch"] == 1 and stats["num_train"] == 2
    assert stats["model_updated"] is True and stats["pretrained"].endswith("cube_tiny.pt")
    assert stats["best_metric"] is not None and stats["train_loss"] is not None
    assert (server.model_dir / "model.pt").is_file()

    # a new session runs on the new weights; the brain2 session started before training keeps its weights
    _, params = infer(server, "brain1", {"foreground": [[128, 128, 12]], "background": [], "reset_state": True})
    assert params["model_version"].startswith("model.pt@") and params["model_version"] == stats["model_version"]
    assert client.info()["models"][MODEL]["sgpsam"]["model_version"] == stats["model_version"]
    click = server.shared["brain2"]["click"]
    _, params = infer(server, "brain2", {"foreground": [click, [click[0] + 1, click[1], click[2]]], "background": []})
    assert params["model_version"] == server.shared["brain2"]["version"], "a running session must keep its weights"
    assert params["encoder_runs"] == 0 and params["new_clicks"] == 1
    _, params = infer(server, "brain2", {"foreground": [click], "background": [], "reset_state": True})
    assert params["model_version"] == stats["model_version"] and params["encoder_runs"] >= 1  # new embedding
