"""A train run of the MONAI Label app killed mid-epoch, then started again, while annotators keep clicking.

One real server (127.0.0.1, tiny preset, ``cube`` weights) with three labelled synthetic cases. Training runs in
MONAI Label's subprocess; the test kills that process with SIGKILL once the first epoch is reported (the run is
then inside its second epoch), the way a crash or an out-of-memory kill ends it.
"""

from __future__ import annotations

import hashlib
import os
import signal
import threading
import time

import pytest
import requests
from app_testing import MODEL, blob_image, start_cube_app, write_image
from scripts.checkpoint import load_weights
from scripts.modeling import build_sgp_sam

pytestmark = pytest.mark.timeout(900)

CASES = ("case0", "case1")
SHAPE = (48, 40, 24)
EPOCHS = 4


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("app_training")
    studies = root / "studies"
    (studies / "labels" / "final").mkdir(parents=True)
    for n, name in enumerate(CASES):
        image, label = blob_image(SHAPE, centre=[20 + 3 * n, 20, 12], radius=5, seed=n)
        write_image(studies / f"{name}.nrrd", image, (1.5, 1.5, 2.0))
        write_image(studies / "labels" / "final" / f"{name}.nrrd", label, (1.5, 1.5, 2.0))
    srv = start_cube_app(root, studies)
    yield srv
    srv.stop()


def labels_digest(studies) -> dict[str, str]:
    folder = studies / "labels" / "final"
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def train_stats(server) -> dict:
    return requests.get(f"{server.url}/info/", timeout=30).json()["train_stats"][MODEL]


def wait_for(condition, what: str, server, timeout: float = 400):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.3)
    pytest.fail(f"timed out waiting for {what}:\n{server.tail(60)}")


def test_killed_training_leaves_model_and_labels_intact_and_restarts_cleanly(server):
    labels_before = labels_digest(server.studies)
    clicks, stop = [], threading.Event()

    def annotate():  # an annotator who keeps clicking through the whole test
        while not stop.is_set():
            try:
                _, params = server.infer("case0", {"foreground": [[20, 20, 12]], "reset_state": True}, "reader")
                clicks.append(("ok", params["model_version"]))
            except Exception as err:  # collected; asserted below
                clicks.append(("error", repr(err)))
            stop.wait(1.0)

    annotator = threading.Thread(target=annotate)
    annotator.start()
    try:
        seen = []
        task = server.client().train_start(MODEL, {"max_epochs": EPOCHS})
        assert task.get("status") in ("SUBMITTED", "RUNNING"), task

        def first_epoch_done():
            stats = train_stats(server)
            seen.append(stats)
            return stats if stats.get("status") == "RUNNING" and stats.get("epoch", 0) >= 1 else None

        stats = wait_for(first_epoch_done, "the first epoch", server)
        os.kill(stats["pid"], signal.SIGKILL)
        running = [s for s in seen if s.get("status") == "RUNNING"]
        assert all("total_time" not in s and s["total_epochs"] == EPOCHS for s in running), running
        assert all(isinstance(s.get("best_metric", 0.0), float) for s in running), "best_metric must be a number"
        assert server.wait_idle("train", 120).get("status") == "ERROR"
        stats = train_stats(server)
        assert stats["status"] == "INTERRUPTED" and 1 <= stats["epoch"] < EPOCHS, stats
        published = server.root / "model" / "model.pt"
        load_weights(build_sgp_sam("tiny"), published)  # the served model is whole

        task = server.client().train_start(MODEL, {"max_epochs": 1})
        status = server.wait_idle("train", 400)
        assert status.get("status") == "DONE", f"{status}\n{server.tail(60)}"
        stats = train_stats(server)
        assert stats["status"] == "DONE" and stats["epoch"] == 1 and stats["pretrained"] == "model.pt", stats
        assert "total_time" in stats and "current_time" not in stats
        load_weights(build_sgp_sam("tiny"), published)
    finally:
        stop.set()
        annotator.join(timeout=120)
    errors = [c for c in clicks if c[0] == "error"]
    assert clicks and not errors, f"clicks failed while training ran or was killed: {errors[:5]}"
    assert labels_digest(server.studies) == labels_before, "a saved label changed or disappeared"
    datastore = server.client().datastore()
    assert all("final" in datastore["objects"][name]["labels"] for name in CASES)
