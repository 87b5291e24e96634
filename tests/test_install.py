"""Install hygiene: an installed gwtf claims one top-level name; the repo's models/, launch/ and benchmarks/ folders
install as gwtf.models, gwtf.launch and gwtf.benchmarks, so they never clash with a user's own `models.py`."""

import importlib.metadata
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_the_distribution_claims_only_gwtf():
    assert importlib.metadata.distribution("gwtf").read_text("top_level.txt").split() == ["gwtf"]


def test_outside_the_repo_gwtf_imports_and_generic_names_stay_free(tmp_path):
    (tmp_path / "models.py").write_text("MINE = True\n")  # a user's own module named like the repo's folder
    code = (
        "import models, gwtf.models.presets, gwtf.launch.cli, gwtf.benchmarks.harness.report, importlib.util as u;"
        "assert models.MINE;"
        "assert all(u.find_spec(n) is None for n in ('launch', 'benchmarks'));"
        "print(gwtf.models.presets.__file__)"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert Path(out.stdout.strip()).resolve().parent == REPO / "models"  # the repo keeps its folders
