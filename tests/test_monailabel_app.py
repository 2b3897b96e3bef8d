"""End-to-end tests of the MONAI Label app ``apps/sgpsam_label``: the REAL server, driven by MONAI Label's client.

The server runs as a subprocess (``monailabel start_server``) on 127.0.0.1 with the tiny preset, a studies folder of
real MR cases (NRRD) and one synthetic NIfTI case, and HTTP(S) proxies pointing at a dead port so that anything
reaching for the internet at start-up would fail.

Weights: ``lib/testing.make_cube_checkpoint`` (the app's helper, built in the fixture in < 1 s, no training) sets a
tiny SGP-SAM by hand so that its output does not depend on the image and is a 16^3-voxel cube of positive logits
at the CENTRE of the input crop. Since the engine centres the crop of a new lesion on its first click, the mask is
a ~24 mm cube around the click: a model that "segments something around a click", deterministic and cheap, so the
geometry assertions (shape, affine, clicked voxel inside the mask) test the app and the engine, not a model's
accuracy. Training for a few seconds on a synthetic blob was tried first: ~200 steps took minutes on this CPU and
still reached only Dice 0.5.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import requests
import torch
from monai.transforms import LoadImage
from monailabel.client import MONAILabelClient
from monailabel.client.client import MONAILabelClientException
from scipy.ndimage import distance_transform_edt

REPO_ROOT = Path(__file__).resolve().parents[1]
APP_DIR = REPO_ROOT / "apps" / "sgpsam_label"
MODEL = "sgpsam"
START_TIMEOUT_S = 150
TRAIN_TIMEOUT_S = 240

pytestmark = pytest.mark.timeout(900)


# ----------------------------------------------------------------------------------------------------------------
# fixtures
# ----------------------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load(path) -> tuple[np.ndarray, np.ndarray]:
    img = LoadImage(image_only=True)(str(path))
    return np.asarray(img), np.asarray(img.affine, dtype=np.float64)


def deepest_voxel(label_path) -> list[int]:
    """The lesion voxel farthest from the lesion border (file voxel indices, what Slicer sends)."""
    label, _ = load(label_path)
    dist = distance_transform_edt(label > 0)
    return [int(v) for v in np.unravel_index(int(np.argmax(dist)), dist.shape)]


class Server:
    def __init__(self, root: Path, url: str, proc: subprocess.Popen, log: Path, model_dir: Path):
        self.root, self.url, self.proc, self.log, self.model_dir = root, url, proc, log, model_dir
        self.shared: dict = {}

    def tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def client(self) -> MONAILabelClient:
        return MONAILabelClient(self.url, tmpdir=str(self.root / "client"))


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
    model_dir = root / "model"
    (root / "client").mkdir()

    port = free_port()
    cli = Path(sys.executable).parent / "monailabel"
    cmd = [str(cli)] if cli.exists() else [sys.executable, "-m", "monailabel.main"]
    cmd += ["start_server", "--app", str(APP_DIR), "--studies", str(studies), "--host", "127.0.0.1"]
    cmd += ["--port", str(port), "--conf", "preset", "tiny", "--conf", "checkpoint", str(ckpt)]
    cmd += ["--conf", "model_dir", str(model_dir), "--conf", "max_epochs", "1"]
    dead = "http://127.0.0.1:9"  # offline: any attempt to reach the internet fails fast
    env = {
        **os.environ,
        "MONAILABEL_PYEXE": sys.executable,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "MONAI_LABEL_SESSION_PATH": str(root / "sessions"),
        "HTTP_PROXY": dead,
        "HTTPS_PROXY": dead,
        "http_proxy": dead,
        "https_proxy": dead,
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
        "PYTHONUNBUFFERED": "1",
    }
    log = root / "server.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    srv = Server(root, f"http://127.0.0.1:{port}", proc, log, model_dir)
    try:
        deadline = time.time() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"server exited with {proc.returncode}:\n{srv.tail()}")
            try:
                if requests.get(f"{srv.url}/info/", timeout=5).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.time() > deadline:
                pytest.fail(f"server not answering /info after {START_TIMEOUT_S} s:\n{srv.tail()}")
            time.sleep(1)
        yield srv
    finally:
        # the server and its scoring/training subprocesses share the session we started: end exactly that group
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=10)


def infer(srv: Server, image: str, params: dict, client: MONAILabelClient | None = None):
    client = client or srv.client()
    label_file, out = client.infer(MODEL, image, {"label": "lesion", **params})
    return label_file, out


def raw_infer(srv: Server, image: str, params_text: str, model: str = MODEL) -> requests.Response:
    return requests.post(f"{srv.url}/infer/{model}", params={"image": image}, files={"params": (None, params_text)})


def wait_idle(srv: Server, kind: str, timeout: float = 120) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        response = requests.get(f"{srv.url}/{kind}/", timeout=10)
        if response.status_code == 404:  # no task ever ran
            return {}
        status = response.json()
        if status.get("status") not in ("SUBMITTED", "RUNNING"):
            return status
        time.sleep(1)
    pytest.fail(f"{kind} still running after {timeout} s:\n{srv.tail()}")


# ----------------------------------------------------------------------------------------------------------------
# tests (module order matters: they share one server)
# ----------------------------------------------------------------------------------------------------------------
sys.path.insert(0, str(APP_DIR))  # the app's own helpers (``lib``), imported as the server imports them
from lib.scoring import uncertainty as unc  # noqa: E402
from lib.testing import make_cube_checkpoint  # noqa: E402

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
        (json.dumps({"label": "lesion", "foreground": [], "background": []}), 422, "no clicks"),
        (json.dumps({"label": "liver", "foreground": [[10, 10, 5]]}), 422, "unknown label"),
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
        assert params["session"] == f"{image}:lesion"
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
    for bad in (garbage, wrong_shape):
        with pytest.raises(MONAILabelClientException, match="Status: 422"):
            client.save_label("brain2", str(bad), tag="final")
    with pytest.raises(MONAILabelClientException, match="Status: 404"):
        client.save_label("no_such_image", str(real_data_dir / "brain2_label.nrrd"), tag="final")
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
    assert stats["status"] == "DONE" and stats["epochs"] == 1 and stats["num_train"] == 2
    assert stats["model_updated"] is True and stats["pretrained"].endswith("cube_tiny.pt")
    assert stats["best_metric"] is not None and stats["train_loss"] is not None
    assert (server.model_dir / "model.pt").is_file()

    click = server.shared["brain2"]["click"]
    _, params = infer(server, "brain1", {"foreground": [[128, 128, 12]], "background": []})
    assert params["model_version"].startswith("model.pt@") and params["model_version"] == stats["model_version"]
    assert params["model_version"] != server.shared["brain2"]["version"]
    _, params = infer(server, "brain2", {"foreground": [click], "background": []})
    assert params["encoder_runs"] >= 1  # the embedding cache was invalidated with the old weights
    assert client.info()["models"][MODEL]["sgpsam"]["model_version"] == stats["model_version"]
