"""Plugin discovery end to end: a real third-party distribution, built and installed in a temp dir."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

PLUGIN_SRC = '''
import numpy as np
import typer
from segsem_cli import hookimpl
from segsem_cli.types import FeatureResult


class RingFallback:
    """Returns the layout polygon's bounding circle: a deliberately simple custom fallback."""

    name = "ring"
    description = "circle through the layout polygon's bounding box"

    def extract(self, image, features, **options):
        n = int(options.get("points", 64))
        out = []
        for f in features:
            (u0, v0), (u1, v1) = f.pixels.min(axis=0), f.pixels.max(axis=0)
            c, r = ((u0 + u1) / 2, (v0 + v1) / 2), max(u1 - u0, v1 - v0) / 2
            t = np.linspace(0, 2 * np.pi, n, endpoint=False)
            contour = np.stack([c[0] + r * np.cos(t), c[1] + r * np.sin(t)], axis=1)
            out.append(FeatureResult(f.feature_id, contour, self.name, 0.5))
        return out


@hookimpl
def register_fallbacks(register):
    register(RingFallback())


@hookimpl
def register_commands(app):
    @app.command("hello-ring")
    def hello_ring(name: str = "world"):
        """Say hello (example: segsem hello-ring --name fab)."""
        typer.echo(f"hello {name} from ring")
'''

DUP_SRC = '''
from segsem_cli import hookimpl


class Dup:
    name = "ring"
    description = "same name as another plugin"

    def extract(self, image, features, **options):
        return []


@hookimpl
def register_fallbacks(register):
    register(Dup())
'''

PYPROJECT = '''
[build-system]
requires = ["setuptools>=61"]
build-backend = "setuptools.build_meta"

[project]
name = "segsem-demo-plugin"
version = "1.2.3"
dependencies = []

[project.entry-points.segsem]
ring = "segsem_demo_plugin.ring"
dup = "segsem_demo_plugin.dup"
broken = "segsem_demo_plugin.broken"

[tool.setuptools]
packages = ["segsem_demo_plugin"]
'''


@pytest.fixture(scope="session")
def plugin_site(tmp_path_factory):
    """Build and install the demo plugin distribution into a private target folder."""
    src = tmp_path_factory.mktemp("plugin_src")
    pkg = src / "segsem_demo_plugin"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "ring.py").write_text(PLUGIN_SRC)
    (pkg / "dup.py").write_text(DUP_SRC)
    (pkg / "broken.py").write_text("raise ImportError('needs libfoo 9')\n")
    (src / "pyproject.toml").write_text(PYPROJECT)
    site = tmp_path_factory.mktemp("plugin_site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index", "--target", str(site), str(src)],
        check=True,
        capture_output=True,
    )
    return site


def run_cli(args, site, block="dup,broken", cwd=None):
    env = dict(os.environ, PYTHONPATH=str(site), COLUMNS="250", SEGSEM_BLOCK_PLUGINS=block)
    return subprocess.run([sys.executable, "-m", "segsem_cli", *args], env=env, capture_output=True, text=True, cwd=cwd)


def test_third_party_plugin_listed_with_distribution(plugin_site):
    r = run_cli(["plugins"], plugin_site)
    assert r.returncode == 0, r.stderr
    line = next(ln for ln in r.stdout.splitlines() if " ring " in ln)
    assert "fallback" in line and "segsem-demo-plugin" in line and "1.2.3" in line
    assert "warning" not in r.stderr.lower() or "segsem_demo" not in r.stderr


def test_plugin_command_runs(plugin_site):
    r = run_cli(["hello-ring", "--name", "fab"], plugin_site)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "hello fab from ring"


def test_block_plugins_env(plugin_site):
    r = run_cli(["plugins"], plugin_site, block="ring,dup,broken")
    assert r.returncode == 0
    assert " ring " not in r.stdout
    r = run_cli(["hello-ring"], plugin_site, block="segsem-demo-plugin")  # block by distribution name
    assert r.returncode != 0


def test_broken_plugin_warns_once_and_cli_works(plugin_site):
    r = run_cli(["plugins"], plugin_site, block="dup")
    assert r.returncode == 0
    warnings = [ln for ln in r.stderr.splitlines() if "broken" in ln]
    assert len(warnings) == 1
    assert "segsem plugin 'broken' (segsem-demo-plugin 1.2.3) failed to load: ImportError: needs libfoo 9" in warnings[0]
    assert " ring " in r.stdout


def test_duplicate_name_is_an_error(plugin_site):
    r = run_cli(["plugins"], plugin_site, block="broken")
    assert r.returncode == 2
    assert "fallback 'ring' is registered twice" in r.stderr
    assert "SEGSEM_BLOCK_PLUGINS" in r.stderr


def test_builtins_come_through_entry_points():
    from importlib import metadata

    eps = {ep.name: ep.value for ep in metadata.entry_points(group="segsem")}
    assert eps["exporters"] == "segsem_plugins.exporters"
    assert eps["threshold"] == "segsem_plugins.threshold"


def test_unknown_plugin_name_error():
    from segsem_cli.errors import SegsemError
    from segsem_cli.plugins import get_registry

    with pytest.raises(SegsemError, match=r"unknown fallback 'nope' \(available: "):
        get_registry().get("fallback", "nope")


def test_third_party_fallback_runs_in_extract(plugin_site, tmp_path):
    """The custom fallback is used by the real `segsem extract`, and its contours reach the export."""
    import csv
    import shutil

    root = Path(__file__).resolve().parents[1]
    data = root / "examples" / "data"
    shutil.copy(data / "img_0003.tif", tmp_path / "img_0003.tif")
    row = next(r for r in csv.DictReader((data / "manifest.csv").open()) if r["image"] == "img_0003.tif")
    (tmp_path / "m.csv").write_text(f"image,x_nm,y_nm,pixel_nm\nimg_0003.tif,{row['x_nm']},{row['y_nm']},1\n")
    out = tmp_path / "out"
    r = run_cli(["extract", str(tmp_path / "m.csv"), "--layout", str(root / "examples" / "opc_test.gds"),
                 "--fallback", "ring", "--fallback-opt", "points=16", "--export", "csv", "--out", str(out), "--no-overlays"],
                plugin_site)
    assert r.returncode == 0, r.stderr
    feats = list(csv.DictReader((out / "features.csv").open()))
    assert feats and all(f["source"] == "ring" and f["status"] == "ok" and float(f["confidence"]) == 0.5 for f in feats)
    rows = list(csv.DictReader((out / "contours.csv").open()))
    per_feature = {}
    for x in rows:
        per_feature.setdefault(x["feature_id"], []).append(x)
    assert set(per_feature) == {f["feature_id"] for f in feats}
    assert all(len(v) == 16 for v in per_feature.values())  # the plugin's option reached it
