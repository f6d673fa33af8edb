"""The GPU bench runs on a machine with torch but no Dagster, faiss, s3fs, Ray or torchvision: it must import there."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

BLOCKED = ("dagster", "faiss", "s3fs", "ray", "torchvision", "autofaiss")
PROBE = f"""
import importlib.abc, sys
class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {BLOCKED!r} or name.startswith("dagster_"):
            raise ImportError("not on the device machine: " + name)
sys.meta_path.insert(0, Refuse())
sys.path.insert(0, "bench")
import embed_bench, gpu_fallback_check
from backfill.feed import Preprocessor
assert not Preprocessor(32, 100, "cuda").gpu_decode  # torchvision refused: PIL decodes
assert not [m for m in sys.modules if m.split(".")[0] in {BLOCKED!r}]
print("ok")
"""


def test_gpu_bench_imports_with_only_torch_numpy_pyarrow_pillow_fsspec():
    result = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_the_probe_refuses_faiss():
    result = subprocess.run(
        [sys.executable, "-c", PROBE.replace('print("ok")', "import backfill.index")],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0 and "not on the device machine: faiss" in result.stderr
