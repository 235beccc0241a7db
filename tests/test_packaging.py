"""An installed (non-editable) package finds its Lua scripts: the wheel carries `lua/` as
`gateway/_lua`, and the settings fall back to it when there is no checkout beside it. The
operator page travels inside the package too."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

from gateway.settings import default_lua_dir

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_carries_lua(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
         "-w", str(tmp_path), str(ROOT)],
        check=True, capture_output=True,
    )
    (wheel,) = tmp_path.glob("flashclaim-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for script in (ROOT / "lua").glob("*.lua"):
        assert f"gateway/_lua/{script.name}" in names
    assert "gateway/static/admin.html" in names  # the operator page


def test_installed_layout_finds_lua(tmp_path: Path) -> None:
    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--target", str(site), str(ROOT)],
        check=True, capture_output=True,
    )
    code = "from gateway.settings import default_lua_dir; print(default_lua_dir())"
    out = subprocess.run([sys.executable, "-c", code], env={"PYTHONPATH": str(site)},
                         cwd=tmp_path, check=True, capture_output=True, text=True).stdout.strip()
    assert Path(out) == site / "gateway" / "_lua"
    assert (Path(out) / "claim.lua").is_file()
    assert default_lua_dir() == ROOT / "lua"  # in the checkout: lua/ beside the package
