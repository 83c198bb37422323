"""SAELens itself loads our SAELens export and computes what we compute (``-m saelens``).

SAELens brings torch, which must not become a dependency of ours, so it runs in a scratch
virtual environment of its own: ``DICTLEARN_SAELENS_PYTHON`` names an interpreter that has
``sae_lens``, otherwise one is made under ``~/.cache/dictlearn/saelens-venv`` with a CPU build of
torch (a few minutes, once). Run with ``uv run --frozen pytest -m saelens``.
"""

from __future__ import annotations

import subprocess

import numpy as np
import pytest

from bench.peer_venv import peer_python
from dictlearn.data import ActivationDataset
from dictlearn.export import ExportConfig, export_sae, load_sae
from dictlearn.train.trainer import main as train_main
from tests.train.helpers import make_planted, tiny_config

pytestmark = pytest.mark.saelens

SAELENS_VERSION = "6.54.12"

_SCRIPT = """
import sys, numpy as np, torch
from sae_lens import SAE
sae = SAE.load_from_disk(sys.argv[1], device="cpu")
x = torch.from_numpy(np.load(sys.argv[2]))
with torch.no_grad():
    latents = sae.encode(x)
    recon = sae.decode(latents)
np.save(sys.argv[3], latents.numpy())
np.save(sys.argv[4], recon.numpy())
import sae_lens
print(type(sae).__name__, sae_lens.__version__, torch.__version__, torch.get_num_threads())
"""


def _saelens_python() -> str:
    return peer_python(
        "saelens", "sae_lens", "sae-lens", SAELENS_VERSION, "DICTLEARN_SAELENS_PYTHON"
    )


@pytest.mark.parametrize("arch", ["topk", "jumprelu", "batchtopk", "relu_l1"])
def test_saelens_loads_our_export_and_agrees(tmp_path, arch):
    data = tmp_path / "data"
    make_planted(data, offset_scale=3.0)
    cfg = tiny_config(tmp_path, data, sae={"architecture": arch}, train={"steps": 8})
    train_main(cfg)
    out = tmp_path / "export"
    export_sae(
        ExportConfig(source=f"{cfg.run.output_dir}/{cfg.run_name}", format="saelens", out=str(out))
    )
    x = ActivationDataset.open(str(data)).read_rows(0, 0, 512)
    np.save(tmp_path / "x.npy", x)
    done = subprocess.run(
        [
            _saelens_python(),
            "-c",
            _SCRIPT,
            str(out),
            str(tmp_path / "x.npy"),
            str(tmp_path / "latents.npy"),
            str(tmp_path / "recon.npy"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    print("SAELens:", done.stdout.strip())
    ours = load_sae(str(out))
    latents, recon = np.asarray(ours.encode(x)), np.asarray(ours.reconstruct(x))
    theirs_latents = np.load(tmp_path / "latents.npy")
    theirs_recon = np.load(tmp_path / "recon.npy")
    assert (latents > 0).sum() > 0  # something fires, so the comparison means something
    scale = np.abs(latents).max()
    np.testing.assert_allclose(theirs_latents, latents, rtol=1e-5, atol=1e-5 * scale)
    np.testing.assert_allclose(theirs_recon, recon, rtol=1e-5, atol=1e-5 * np.abs(recon).max())
