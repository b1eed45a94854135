"""The package's entry points exactly as pyproject.toml declares them, for subprocesses.

vLLM finds plugins through installed package metadata. The shared test virtualenv may have been
installed from an older pyproject.toml; `write_dist_info` writes the metadata `pip install`
would write for this checkout (name, version, entry points) into a folder that goes first on
PYTHONPATH (or sys.path), so `importlib.metadata` finds this checkout's entry points first.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def write_dist_info(folder: Path) -> Path:
    """Write `<name>-<version>.dist-info` under `folder` and return `folder`."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    name, version = project["name"], project["version"]
    info = folder / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    groups = {"console_scripts": project.get("scripts", {}), **project.get("entry-points", {})}
    lines: list[str] = []
    for group, entries in groups.items():
        lines.append(f"[{group}]")
        lines += [f"{entry} = {target}" for entry, target in entries.items()]
        lines.append("")
    (info / "entry_points.txt").write_text("\n".join(lines))
    return folder
