"""Install hygiene: an installed gwtf claims one top-level name; the repo's models/, launch/ and benchmarks/ folders
install as gwtf.models, gwtf.launch and gwtf.benchmarks, so they never clash with a user's own `models.py`; the wheel
carries the package data (the dashboard's page and vendored libraries)."""

import importlib.metadata
import shutil
import subprocess
import sys
import zipfile
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


def test_the_wheel_ships_the_dashboard_page_and_its_vendored_libraries(tmp_path):
    """`gwtf dashboard` serves its page and the chart and graph libraries from the package (no CDN): a wheel built
    from a copy of the sources (the build leaves nothing in the repo) holds every static file, licenses included."""
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(REPO / "setup.py", src)
    for folder in ("gwtf", "models", "launch", "benchmarks"):
        shutil.copytree(REPO / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    argv = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "-q",
        "-w",
        str(tmp_path),
        str(src),
    ]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    (wheel,) = tmp_path.glob("gwtf-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    static = REPO / "gwtf" / "dashboard" / "static"
    shipped = {f"gwtf/dashboard/static/{p.relative_to(static).as_posix()}" for p in static.rglob("*") if p.is_file()}
    assert shipped <= names, sorted(shipped - names)
    for name in ("uPlot.iife.min.js", "uPlot.LICENSE", "cytoscape.min.js", "cytoscape.LICENSE"):
        assert f"gwtf/dashboard/static/vendor/{name}" in names
    assert "gwtf/launch/dashboard.py" in names
