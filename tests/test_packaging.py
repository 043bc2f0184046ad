"""Packaging metadata: what ComfyUI Manager / the Comfy Registry read. pyproject.toml is parsed with ComfyUI's
own config parser (the one load_custom_node uses), requirements.txt never pulls torch."""
from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FORBIDDEN = {"torch", "torchvision", "torchaudio"}


def _req_names(lines) -> list[str]:
    names = []
    for raw in lines:
        line = raw.split("#", 1)[0].strip()
        if line:
            names.append(re.split(r"[<>=!~;\[\s]", line, maxsplit=1)[0].lower().replace("_", "-"))
    return names


def test_requirements_never_pull_torch():
    names = _req_names((ROOT / "requirements.txt").read_text().splitlines())
    assert "lpips" in names
    assert not FORBIDDEN & set(names)


def test_pyproject_fits_the_comfy_registry(comfy):
    from comfy_config import config_parser
    cfg = config_parser.extract_node_configuration(str(ROOT))
    assert cfg.project.name == "syncdiffusion" and "comfyui" not in cfg.project.name.lower()
    assert re.fullmatch(r"\d+\.\d+\.\d+", cfg.project.version)
    assert cfg.project.description
    assert cfg.project.license.file and (ROOT / cfg.project.license.file).is_file()
    assert cfg.project.urls.repository.startswith("https://")
    assert cfg.tool_comfy.publisher_id and cfg.tool_comfy.display_name
    deps = _req_names(cfg.project.dependencies)
    assert not FORBIDDEN & set(deps)
    # the registry installs [project].dependencies, ComfyUI Manager requirements.txt: keep them the same
    assert sorted(deps) == sorted(_req_names((ROOT / "requirements.txt").read_text().splitlines()))


def test_pytest_settings_and_license():
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    opts = data["tool"]["pytest"]["ini_options"]
    assert opts["testpaths"] == ["tests"] and opts["pythonpath"] == ["."]
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")
