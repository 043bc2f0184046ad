"""Packaging metadata: what ComfyUI Manager / the Comfy Registry read. pyproject.toml is parsed with ComfyUI's
own config parser (the one load_custom_node uses), requirements.txt never pulls torch."""
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
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
    assert opts["testpaths"] == ["tests"] and opts["pythonpath"] == [".", "tests"]
    assert any(m.startswith("gpu:") for m in opts["markers"])
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")


def test_requires_comfyui_is_a_lower_bound_comfyui_reads(comfy):
    """requires-comfyui is what the Registry/Manager show; ComfyUI's parser reads it, and the ComfyUI this suite
    runs on satisfies it (setup refuses older ones; CI runs the oldest lane it can get and 0.33)."""
    from comfy_config import config_parser
    from devtools import headless as comfy_headless
    cfg = config_parser.extract_node_configuration(str(ROOT))
    m = re.fullmatch(r">=(\d+)\.(\d+)\.(\d+)", cfg.project.supported_comfyui_version)
    assert m, cfg.project.supported_comfyui_version
    running = comfy_headless.comfyui_version(comfy.comfy_dir)
    assert running is not None
    assert tuple(int(x) for x in running.split(".")[:3]) >= tuple(int(x) for x in m.groups())


def test_owner_only_values_are_marked_as_such():
    """The publishing values only the repository's owner can know are placeholders, and say so where they are
    and in the README's Install section (so nobody publishes them by accident)."""
    text = (ROOT / "pyproject.toml").read_text()
    for key in ("Repository", "Issues", "PublisherId", "Icon"):
        assert key in text
    assert text.count("OWNER TO FILL IN") >= 3
    readme = (ROOT / "README.md").read_text()
    install = readme.split("## Install", 1)[1].split("\n## ", 1)[0]
    assert "OWNER TO FILL IN" in install and "PublisherId" in install
    assert "not published yet" in install and "python3.11" in install
