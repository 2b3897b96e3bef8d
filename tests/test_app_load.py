"""Load and fault tests of the MONAI Label app: several annotators at once, and a stream of malformed requests.

One real server (``monailabel start_server``, 127.0.0.1, tiny preset, the hand-set ``cube`` weights of
``app_testing``) with background scoring off, so that nothing but the requests below writes to the datastore.
Tests run in file order: the malformed requests first (they need the datastore as it was created), then the
annotators (who save labels). Latency is not asserted here: ``benchmarks/bench_monailabel_load.py`` prints it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
import SimpleITK as sitk
from app_malformed import malformed_requests
from app_testing import MODEL, AppServer, blob_image, start_cube_app, write_image

pytestmark = pytest.mark.timeout(900)

IMAGES = {"alpha": ".nrrd", "beta": ".nii.gz"}
SHAPE = (72, 64, 32)
SPACING = (1.5, 1.5, 2.0)
CLIENTS = [f"annotator-{n}" for n in range(8)]
CLICKS = 20


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("app_load")
    studies = root / "studies"
    studies.mkdir()
    for n, (name, ext) in enumerate(IMAGES.items()):
        image, _ = blob_image(SHAPE, centre=[24 + 24 * n, 32, 16], radius=5, seed=n)
        write_image(studies / f"{name}{ext}", image, SPACING, origin=(-50.0, 20.0, 10.0 * n))
    big = np.random.default_rng(7).integers(0, 400, (300, 300, 160), dtype=np.int16)  # seconds to preprocess
    write_image(studies / "big.nii", big, (0.6, 0.6, 0.8))
    srv = start_cube_app(root, studies)
    yield srv
    srv.stop()


def datastore_digest(studies: Path) -> dict[str, str]:
    """sha256 of every file under the studies folder (hidden files, labels and datastore_v2.json included)."""
    return {
        str(p.relative_to(studies)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(studies.rglob("*"))
        if p.is_file()
    }


def mask_digest(path) -> str:
    array = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    return hashlib.sha1(np.packbits(array > 0).tobytes() + str(array.shape).encode()).hexdigest()


# ----------------------------------------------------------------------------------------------------------------
# malformed requests
# ----------------------------------------------------------------------------------------------------------------
def test_malformed_requests_answer_4xx_and_leave_the_datastore_unchanged(server, tmp_path):
    before = datastore_digest(server.studies)
    temp_before = set(server.tmp.iterdir())
    cases = malformed_requests(server.url, server.studies, tmp_path, seed=18)
    assert len(cases) >= 200
    failures = []
    for name, send in cases:
        try:
            response = send()
        except requests.RequestException as err:
            failures.append(f"{name}: no answer ({err!r})")
            continue
        try:
            detail = response.json().get("detail")
        except ValueError:
            detail = None
        if not 400 <= response.status_code < 500 or not detail:
            failures.append(f"{name}: HTTP {response.status_code} {response.text[:200]!r}")
        if not server.alive():
            failures.append(f"{name}: the server died")
            break
    summary = f"{len(failures)} of {len(cases)} malformed requests were not answered 4xx with a reason:\n"
    assert not failures, summary + "\n".join(failures[:30]) + f"\n{server.tail(40)}"
    assert requests.get(f"{server.url}/info/", timeout=10).status_code == 200, "the server stopped answering /info"
    after = datastore_digest(server.studies)
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    assert not changed, f"malformed requests changed the datastore: {changed}"
    left = sorted(p.name for p in set(server.tmp.iterdir()) - temp_before)
    assert not left, f"refused uploads left in the server's temp folder: {left}"
    _, params = server.infer("alpha", {"foreground": [[30, 32, 16]], "reset_state": True})
    assert params["new_clicks"] == 1, "a valid click after the malformed ones must still work"


# ----------------------------------------------------------------------------------------------------------------
# concurrent annotators
# ----------------------------------------------------------------------------------------------------------------
def click_sequence(client: int, image: int) -> list[dict]:
    """20 requests of one annotator on one image: each adds one click to the lists it re-sends, like Slicer."""
    rng = np.random.default_rng(1000 * client + image)
    first = [int(rng.integers(16, 56)), int(rng.integers(16, 48)), int(rng.integers(8, 24))]
    fg, bg, objects, out = [first], [], 1, []
    for step in range(CLICKS):
        if step > 0:
            kind = rng.random()
            if kind < 0.15 and objects < 4:  # far away: a new lesion
                fg.append([int(rng.integers(2, 70)), int(rng.integers(2, 62)), int(rng.integers(2, 30))])
                objects += 1
            elif kind < 0.45:
                near = np.asarray(fg[-1]) + rng.integers(-8, 9, 3)
                bg.append([int(np.clip(v, 0, s - 1)) for v, s in zip(near, SHAPE)])
            else:
                near = np.asarray(fg[-1]) + rng.integers(-4, 5, 3)
                fg.append([int(np.clip(v, 0, s - 1)) for v, s in zip(near, SHAPE)])
        out.append({"foreground": [list(p) for p in fg], "background": [list(p) for p in bg], "reset_state": step == 0})
    return out


def annotate(server: AppServer, client: int, order: list[str], results: dict, files: dict) -> None:
    api = server.client(CLIENTS[client])
    for image in order:
        digests = []
        for params in click_sequence(client, list(IMAGES).index(image)):
            mask_file, out = api.infer(MODEL, image, {"label": "lesion", **params})
            assert out["session"]["client"] == f"client:{CLIENTS[client]}"
            digests.append(mask_digest(mask_file))
        results[(client, image)] = digests
        kept = server.root / "last_masks" / f"{CLIENTS[client]}_{image}{IMAGES[image]}"
        kept.parent.mkdir(exist_ok=True)
        files[(client, image)] = shutil.copyfile(mask_file, kept)


def test_concurrent_annotators_get_their_own_masks_and_keep_every_label(server):
    concurrent, last_masks, errors = {}, {}, []

    def run(client):
        order = list(IMAGES) if client % 2 == 0 else list(IMAGES)[::-1]  # first clicks on both images at once
        try:
            annotate(server, client, order, concurrent, last_masks)
        except Exception as err:  # reported below with the client
            errors.append(f"{CLIENTS[client]}: {err!r}")

    with ThreadPoolExecutor(len(CLIENTS)) as pool:
        list(pool.map(run, range(len(CLIENTS))))
    assert not errors, "clicks failed under concurrency:\n" + "\n".join(errors) + f"\n{server.tail(30)}"

    alone = {}
    for client in range(len(CLIENTS)):  # the same clients' clicks, one request at a time
        annotate(server, client, list(IMAGES), alone, {})
    mixed = [f"{CLIENTS[c]} on {image}" for (c, image), digests in concurrent.items() if digests != alone[(c, image)]]
    assert not mixed, f"masks under concurrency differ from the same clicks run alone: {mixed}"

    uploads = {image: [] for image in IMAGES}
    barrier = threading.Barrier(len(CLIENTS))

    def save(client):
        for image in IMAGES:
            path = last_masks[(client, image)]
            uploads[image].append(hashlib.sha256(Path(path).read_bytes()).hexdigest())
            barrier.wait(timeout=60)  # every client saves the same image at the same moment
            server.client(CLIENTS[client]).save_label(image, path, tag="final")

    with ThreadPoolExecutor(len(CLIENTS)) as pool:
        list(pool.map(save, range(len(CLIENTS))))
    for image, ext in IMAGES.items():
        final = server.studies / "labels" / "final" / f"{image}{ext}"
        versions = sorted((server.studies / ".label_versions" / "final").glob(f"{image}.v*{ext}"))
        kept = [hashlib.sha256(p.read_bytes()).hexdigest() for p in [final, *versions]]
        assert sorted(kept) == sorted(uploads[image]), f"{image}: {len(uploads[image])} saves, {len(kept)} kept"


def test_info_and_other_images_answer_while_a_first_click_runs(server):
    """A first click on a big image takes seconds on a CPU; /info and a repeat click elsewhere must not wait."""
    server.infer("alpha", {"foreground": [[30, 32, 16]], "reset_state": True}, client_id="warm")
    done: list[str] = []
    lock = threading.Lock()

    def first_click():  # the params only (output=json): the big mask's download would blur the order
        params = json.dumps({"foreground": [[150, 150, 80]], "client_id": "big-reader"})
        url = f"{server.url}/infer/{MODEL}?image=big&output=json"
        assert requests.post(url, files={"params": (None, params)}, timeout=600).status_code == 200
        with lock:
            done.append("first click")

    thread = threading.Thread(target=first_click)
    thread.start()
    try:  # start only once the server is working on the first click (it logs the request before running it)
        while thread.is_alive() and "'image': 'big'" not in server.log.read_text(errors="replace"):
            time.sleep(0.05)
        while thread.is_alive():
            info = requests.get(f"{server.url}/info/", timeout=60)
            assert info.status_code == 200
            server.infer("alpha", {"foreground": [[30, 32, 16], [31, 32, 16]]}, client_id="warm")
            with lock:
                if "first click" not in done:
                    done.append("info + repeat click")
    finally:
        thread.join(timeout=300)
    assert done and done[0] == "info + repeat click", f"order of completion: {done}"
