"""Test and benchmark helpers for the MONAI Label app: a deterministic stand-in checkpoint and the real server.

The app does not ship these: tests and ``benchmarks/bench_monailabel_*.py`` import them from here.

``make_cube_checkpoint``: a stand-in model file (no training, < 1 s to build); ``make_random_checkpoint``: a model
file with random weights. Both describe their network and the default preprocessing at the preset's crop size, as
the app needs (``scripts.model_file``).

``make_cube_checkpoint`` sets the weights of an SGP-SAM network by hand so that its output does not depend on the
image or the prompts and is a cube of positive logits at the CENTRE of the input crop (16^3 voxels for the tiny
preset's 64^3 crop, 32^3 for 128^3): every residual branch (encoder blocks, SGPM fusion, two-way transformer
attention and MLPs) is zeroed so it passes its input through; the position embedding carries the distance ``r`` to
the crop centre (as a ratio that LayerNorm keeps) through the neck; the mask decoder's upscaling and hypernetwork
turn it into ``logit = f(r) - tau``. The engine centres a new lesion's crop on its first click, so the mask is a
cube around the click that stays inside one window: a model that "segments something around a click" for
geometry tests, with exactly the FLOPs of a real network of that preset for timing.
"""

from __future__ import annotations

import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import requests
import SimpleITK as sitk
import torch
from scripts.model_file import Preprocessing, save_model_file
from scripts.modeling import PRESETS, build_sgp_sam


def _gelu(x: float) -> float:
    return 0.5 * x * (1 + math.erf(x / math.sqrt(2)))


def _save(net, path: str | os.PathLike, preset: str, preprocessing: dict | None) -> str:
    return save_model_file(net, Preprocessing(roi_size=PRESETS[preset]["img_size"], **(preprocessing or {})), path)


def make_random_checkpoint(
    path: str | os.PathLike, preset: str = "tiny", sgpm: bool = True, preprocessing: dict | None = None
) -> str:
    """A model file with the preset's randomly initialised network (seeded)."""
    torch.manual_seed(0)
    return _save(build_sgp_sam(preset, sgpm=sgpm), path, preset, preprocessing)


def make_cube_checkpoint(
    path: str | os.PathLike, preset: str = "tiny", sgpm: bool = True, preprocessing: dict | None = None
) -> str:
    """SGP-SAM whose mask is the central 2x2x2 tokens' cube of the crop, whatever the image (module docstring)."""
    torch.manual_seed(0)
    net = build_sgp_sam(preset, sgpm=sgpm)
    zeroed = ("out_proj.weight", "out_proj.bias", "attn.proj.weight", "attn.proj.bias", "lin2.weight", "lin2.bias")
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith(zeroed):
                p.zero_()  # every residual branch adds 0: blocks/transformer layers pass their input through
        enc = net.image_encoder
        enc.patch_embed.proj.weight.zero_()
        enc.patch_embed.proj.bias.zero_()
        g = enc.pos_embed.shape[1]
        idx = torch.arange(g, dtype=torch.float32) - (g - 1) / 2
        r = torch.sqrt(idx[:, None, None] ** 2 + idx[None, :, None] ** 2 + idx[None, None, :] ** 2)
        pos = torch.zeros_like(enc.pos_embed)
        pos[0, ..., 0], pos[0, ..., 1], pos[0, ..., 2], pos[0, ..., 3] = r, -r, 1.0, -1.0  # LN keeps r as a ratio
        enc.pos_embed.copy_(pos)
        conv1, conv2 = enc.neck[0], enc.neck[2]
        conv1.weight.zero_()
        conv2.weight.zero_()
        for c in range(4):
            conv1.weight[c, c] = 1.0
            conv2.weight[c, c, 1, 1, 1] = 1.0
        pe = net.prompt_encoder
        pe.no_mask_embed.weight.zero_()
        pe.mask_downscaling[-1].weight.zero_()
        pe.mask_downscaling[-1].bias.zero_()
        dec = net.mask_decoder
        up1, up2 = dec.output_upscaling[0], dec.output_upscaling[3]
        for layer in (up1, up2):
            layer.weight.zero_()
            layer.bias.zero_()
        up1.weight[0, 0], up1.weight[0, 1], up1.weight[2, 2], up1.weight[2, 3] = 1.0, -1.0, 1.0, -1.0
        up2.weight[2, 0] = 1.0  # channel 0: decreasing in the distance to the crop centre
        up2.bias[1] = 1.0  # channel 1: constant, the threshold's reference
        # channel 0 after the decoder = gelu(gelu(sqrt(C/2) / sqrt(r^2 + 1))), C = up1's output channels; threshold
        # halfway between the central tokens (r = sqrt(3)/2) and their face neighbours (r = sqrt(11)/2)
        half_c = up1.weight.shape[1] / 2
        level = [_gelu(_gelu(math.sqrt(half_c / (r2 + 1)))) for r2 in (0.75, 2.75)]
        tau = sum(level) / 2
        gelu_1 = _gelu(1.0)
        for mlp in dec.output_hypernetworks_mlps:
            mlp.layers[-1].weight.zero_()
            mlp.layers[-1].bias.zero_()
            mlp.layers[-1].bias[0], mlp.layers[-1].bias[1] = 1.0, -tau / gelu_1
    return _save(net, path, preset, preprocessing)


# ----------------------------------------------------------------------------------------------------------------
# the real server on 127.0.0.1
# ----------------------------------------------------------------------------------------------------------------
REPO_ROOT = Path(__file__).resolve().parents[1]
APP_DIR = REPO_ROOT / "apps" / "sgpsam_label"
MODEL = "sgpsam"
DEAD_PROXY = "http://127.0.0.1:9"  # offline: anything reaching for the internet fails at once


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class AppServer:
    """``monailabel start_server --app apps/sgpsam_label`` as a subprocess in its own session (killed as a group).

    Args:
        root: working folder (server log, MONAI Label's upload sessions, client downloads, the server's temp
            folder ``tmp``: uploads wait there, and a test can see what is left behind).
        studies: the studies folder (datastore).
        conf: ``--conf`` pairs, e.g. ``{"checkpoint": path}`` (a model file).
        env: extra environment (e.g. ``MONAI_LABEL_AUTO_UPDATE_SCORING=false``).
    """

    def __init__(self, root: Path, studies: Path, conf: dict, env: dict | None = None, timeout: float = 150):
        from monailabel.client import MONAILabelClient  # noqa: F401  (fail here, not in a worker thread)

        self.root, self.studies = Path(root), Path(studies)
        (self.root / "client").mkdir(parents=True, exist_ok=True)
        self.tmp = self.root / "tmp"
        self.tmp.mkdir(exist_ok=True)
        self.url = f"http://127.0.0.1:{free_port()}"
        cli = Path(sys.executable).parent / "monailabel"
        cmd = [str(cli)] if cli.exists() else [sys.executable, "-m", "monailabel.main"]
        cmd += ["start_server", "--app", str(APP_DIR), "--studies", str(studies), "--host", "127.0.0.1"]
        cmd += ["--port", self.url.rsplit(":", 1)[1]]
        for key, value in conf.items():
            cmd += ["--conf", key, str(value)]
        full_env = {
            **os.environ,
            "MONAILABEL_PYEXE": sys.executable,
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            "MONAI_LABEL_SESSION_PATH": str(self.root / "sessions"),
            "HTTP_PROXY": DEAD_PROXY,
            "HTTPS_PROXY": DEAD_PROXY,
            "http_proxy": DEAD_PROXY,
            "https_proxy": DEAD_PROXY,
            "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost",
            "PYTHONUNBUFFERED": "1",
            "TMPDIR": str(self.tmp),
            **(env or {}),
        }
        self.log = self.root / "server.log"
        with open(self.log, "wb") as fh:
            self.proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=full_env, start_new_session=True)
        try:
            self._wait(timeout)
        except BaseException:
            self.stop()
            raise

    def _wait(self, timeout: float) -> None:
        deadline = time.time() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                if requests.get(f"{self.url}/info/", timeout=5).status_code == 200:
                    return
            except requests.RequestException:
                pass
            if time.time() > deadline:
                raise RuntimeError(f"server not answering /info after {timeout} s:\n{self.tail()}")
            time.sleep(0.5)

    def tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.proc.poll() is None

    def client(self, client_id: str | None = None):
        from monailabel.client import MONAILabelClient

        return MONAILabelClient(self.url, tmpdir=str(self.root / "client"), client_id=client_id)

    def infer(self, image: str, params: dict, client_id: str | None = None, session_id: str | None = None):
        """One click request through MONAI Label's client: (mask file, result params)."""
        return self.client(client_id).infer(MODEL, image, {"label": "lesion", **params}, session_id=session_id)

    def wait_idle(self, kind: str, timeout: float = 120) -> dict:
        """Wait until no ``train``/``scoring`` task runs; its last status ({} if none ever ran)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            response = requests.get(f"{self.url}/{kind}/", timeout=10)
            if response.status_code == 404:
                return {}
            status = response.json()
            if status.get("status") not in ("SUBMITTED", "RUNNING"):
                return status
            time.sleep(0.5)
        raise TimeoutError(f"{kind} still running after {timeout} s:\n{self.tail()}")

    def stop(self) -> None:
        """End the server and its scoring/training subprocesses (they share the session we started)."""
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(timeout=10)


# ----------------------------------------------------------------------------------------------------------------
# small images
# ----------------------------------------------------------------------------------------------------------------
def start_cube_app(root: Path, studies: Path) -> AppServer:
    """The app on ``studies`` serving the cube stand-in (``make_cube_checkpoint``), with scoring after training off."""
    ckpt = root / "cube.pt"
    make_cube_checkpoint(ckpt)
    conf = {"checkpoint": ckpt, "model_dir": root / "model"}
    return AppServer(root, studies, conf, env={"MONAI_LABEL_AUTO_UPDATE_SCORING": "false"})


def write_image(path, array: np.ndarray, spacing=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), direction=None) -> None:
    """Write an (i, j, k)-indexed array with ITK's geometry (LPS origin and direction), as Slicer reads it back."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(array, (2, 1, 0))))
    image.SetSpacing([float(v) for v in spacing])
    image.SetOrigin([float(v) for v in origin])
    if direction is not None:
        image.SetDirection([float(v) for v in np.asarray(direction, dtype=np.float64).ravel()])
    sitk.WriteImage(image, str(path))


def blob_image(shape=(48, 40, 24), centre=None, radius=5.0, seed=0) -> tuple[np.ndarray, np.ndarray]:
    """A noisy image with one bright ball: (image int16, label uint8), both (i, j, k)."""
    rng = np.random.default_rng(seed)
    centre = np.asarray(centre if centre is not None else [(n - 1) / 2 for n in shape], dtype=np.float64)
    grid = np.indices(shape, dtype=np.float64)
    dist = np.sqrt(sum((g - c) ** 2 for g, c in zip(grid, centre)))
    label = (dist <= radius).astype(np.uint8)
    image = (100 + 20 * rng.standard_normal(shape) + 300 * label).astype(np.int16)
    return image, label
