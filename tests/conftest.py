import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import tools  # noqa: E402


@pytest.fixture(scope="session")
def toy_root(tmp_path_factory):
    """The full toy world at its default size, generated once for the whole test session."""
    root = tmp_path_factory.mktemp("toy") / "world"
    tools.generate_toy_world(root, size=128, seed=0)
    return root


@pytest.fixture(scope="session")
def toy(toy_root):
    return tools.load_dataset("toy", toy_root, 128)


def run_script(script, *args, cwd=ROOT, timeout=600):
    """Run a stage as a user would, from the repository root."""
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def run_torchrun(script, nproc, *args, cwd=ROOT, timeout=600):
    """Run a stage under torchrun, nproc processes on this machine (gloo on CPU). --standalone
    lets the rendezvous pick a free port, so tests running at once never clash."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                           str(nproc), str(ROOT / script) if not Path(script).is_absolute() else str(script),
                           *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
