"""The real frontend: ComfyUI's server (``main.py --cpu``) with this pack, driven in headless Chromium (one server
and one browser for the module; the page helpers and checks are in ``frontend_page.py``).

Every example workflow, opened as a user opens it (Templates -> the pack's category -> the card), must show no
dialog, error toast or page error, no overlapping nodes, every pack widget in schema order with its saved value, its
note on screen, and ``app.graphToPrompt()`` equal to ``devtools/workflow.py``'s conversion; with its models renamed
away it must offer their download. Frontend 1.32 (ComfyUI 0.3.75) reports problems in dialogs, 1.49 (ComfyUI 0.33)
in an error overlay and an Errors panel; the test detects which it meets. Then one workflow, shrunk through the page
to a CPU-sized canvas, runs from the Run button, and two bad inputs typed into widgets must end in an error that
names the node and speaks pixels.

``scripts/setup_browser.py`` installs chromium and playwright when missing (a failure fails the test). Screenshots
and server logs of failing checks go to ``output/test-artifacts/frontend/`` (``$SYNCDIFF_TEST_ARTIFACTS``).
"""
import contextlib
import json
import shutil
import time

import pytest

from devtools import harness as h
import frontend_page as fp
from scripts import setup_browser
from devtools import models as tiny_models
from devtools import workflow as wc

pytestmark = pytest.mark.slow

WORKFLOWS = sorted((fp.ROOT / "example_workflows").glob("*.json"))
RUN_TIMEOUT_S = 240
# The workflow queued from the UI, and the sizes it is shrunk to (2 CPU cores): 3 windows, 2 steps, 1 sync step.
RUN_WORKFLOW = "syncdiffusion_panorama"
SHRINK = {"PanoramaLatent": {"width": 128, "height": 64, "batch_size": 1},
          "SyncDiffusionSampler": {"steps": 2, "window_size": 64, "stride": 32, "sync_steps": 1}}


def _ensure_browser():
    try:
        return setup_browser.ensure()
    except setup_browser.BrowserSetupError as e:
        pytest.fail(f"the browser test cannot run: {e}")


def test_browser_is_installed():
    """First, so that a machine where Chromium cannot be installed shows FAILED with the reason (the fixture below
    then errors every other test of this module with the same reason)."""
    assert _ensure_browser().is_file()


@pytest.fixture(scope="module")
def chromium():
    return _ensure_browser()


@pytest.fixture(scope="module")
def frontend_server(comfy, tmp_path_factory):
    """The server, launched first so that it boots while the models are written (it lists model folders only
    when asked). Users of it call ``wait_ready()``."""
    srv = fp.frontend_server(tmp_path_factory.mktemp("frontend-server"), comfy.models_dir)
    srv.launch()
    try:
        rt = h.runtime()
        # the tiny_sd15 fixture's file, written without loading it into this process (the server loads it)
        tiny_ckpt = rt.model_folder("checkpoints") / "tiny_sd15.safetensors"
        if not tiny_ckpt.exists():
            tiny_models.write_checkpoint(tiny_ckpt, family="sd15", seed=h.SEED)
        # input images in the server's folder and in this process's (the converter's LoadImage lists that one)
        for path in WORKFLOWS:
            for input_dir in (srv.base / "input", comfy.input_dir):
                h.provide_workflow_files(json.loads(path.read_text()), comfy.nodes.NODE_CLASS_MAPPINGS,
                                         comfy.models_dir, input_dir, tiny_ckpt)
        h.write_random_lpips_trunk()
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def ui(chromium, frontend_server, tmp_path_factory):
    from playwright.sync_api import sync_playwright
    shutil.rmtree(fp.ARTIFACTS, ignore_errors=True)
    profile = tmp_path_factory.mktemp("chromium-profile")
    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(profile), executable_path=str(chromium), headless=True, args=fp.CHROMIUM_ARGS, viewport=fp.VIEWPORT)
        try:
            page = context.pages[0] if context.pages else context.new_page()
            page.set_default_timeout(30_000)
            frontend_server.wait_ready()
            u = fp.UI(page, frontend_server)
            page.goto(frontend_server.url)
            page.wait_for_function("() => window.app && window.app.graph && window.app.canvas "
                                   "&& document.querySelector('button[aria-label=\"Templates\"]')", timeout=90_000)
            yield u
        finally:
            context.close()


@pytest.fixture(scope="module")
def object_info(frontend_server):
    frontend_server.wait_ready()
    return fp.get_json(frontend_server.url + "/object_info", timeout=60)


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_template_opens_cleanly(ui, object_info, comfy, path):
    name = path.stem
    with ui.artefacts_on_failure(f"open-{name}"):
        errors_before = len(ui.page_errors)
        wf = fp.open_template(ui, name)
        problems = []
        dialogs = ui.js(fp.OPEN_DIALOGS_JS)
        if dialogs:
            problems.append(f"dialogs open after loading: {dialogs}")
        toasts = ui.js(fp.ERROR_TOASTS_JS)
        if toasts:
            problems.append(f"error toasts after loading: {toasts}")
        if len(ui.page_errors) > errors_before:
            problems.append(f"uncaught page errors while loading: {ui.page_errors[errors_before:]}")
        geometry = ui.js(fp.GEOMETRY_JS)
        problems += fp.layout_problems(geometry)
        for note in ui.js(fp.NOTES_JS):
            if not note["shown"]:
                problems.append(f"note {note['id']} '{note['title']}' is not on screen when the workflow opens")
            elif note["overflow"] > 1:
                problems.append(f"note {note['id']} '{note['title']}': its text runs {note['overflow']:.0f} screen px "
                                "past the note's bottom")
        problems += fp.widget_problems(wf, geometry, object_info)
        ours = wc.convert(wf, comfy.nodes.NODE_CLASS_MAPPINGS).prompt
        problems += fp.prompt_problems(ui.js(fp.PROMPT_JS), ours)
        assert not problems, f"{name} in the frontend:\n  " + "\n  ".join(problems)


def test_missing_models_are_offered_for_download(ui):
    """A user without the models: every workflow's model files (renamed here to files the server does not have)
    are listed by the frontend's Missing Models dialog with a working Download button for the workflow's URL -- no
    'download not allowed', 'invalid directory' or suffix error (1.4x: rows of the Errors panel, each with its
    folder and an enabled Download button)."""
    problems = []
    with ui.artefacts_on_failure("missing-models"):
        for path in WORKFLOWS:
            wf = json.loads(path.read_text())
            text = json.dumps(wf)
            for m in wf.get("models") or []:
                text = text.replace(json.dumps(m["name"]), json.dumps("absent_" + m["name"]))
            absent = json.loads(text)
            ui.js("wf => app.loadGraphData(wf, true, true, 'missing-models-check')", absent)
            if not absent.get("models"):
                continue
            if fp.wait_for_error_report(ui) == "panel":  # 1.4x: the Errors panel's rows; the URL is only copied
                dialog = fp.open_error_details(ui, expect=tuple(m["name"] for m in absent["models"]))
                rows = ui.js(fp.MISSING_MODEL_ROWS_JS)
                for m in absent["models"]:
                    row = next((r for r in rows if r["label"] == f"Download {m['name']}"), None)
                    if row is None or m["directory"] not in row["text"]:
                        problems.append(f"{path.stem}: the Errors panel offers no download of {m['directory']} / "
                                        f"{m['name']}:\n{dialog}\n{rows}")
                    elif not row["enabled"]:
                        problems.append(f"{path.stem}: the download of {m['name']} is disabled: {row}")
                fp.close_dialogs(ui)
                continue
            dialog = "\n".join(ui.js(fp.OPEN_DIALOGS_JS))
            items = ui.js(fp.MISSING_MODELS_JS)
            for m in absent["models"]:
                label = f"{m['directory']} / {m['name']}"
                item = next((i for i in items if label in i["text"]), None)
                if item is None:
                    problems.append(f"{path.stem}: the Missing Models dialog does not list {label}:\n{dialog}")
                elif m["url"] not in item["downloads"]:
                    problems.append(f"{path.stem}: no download of {m['url']} offered for {label}: {item}")
            fp.close_dialogs(ui)
        assert not problems, "\n".join(problems)


def _shrink_values(wf: dict) -> dict[str, dict]:
    return {str(n["id"]): dict(SHRINK[n["type"]]) for n in wf["nodes"] if n["type"] in SHRINK}


IMAGE_ON_NODE_JS = """id => { const n = app.graph.getNodeById(id), img = n && n.imgs && n.imgs[0];
    return img && img.complete && img.naturalWidth ? {src: img.src, w: img.naturalWidth, h: img.naturalHeight} : null }"""


def test_shrunk_workflow_runs_from_the_ui(ui, comfy):
    with ui.artefacts_on_failure("run"):
        wf = fp.open_template(ui, RUN_WORKFLOW)
        shrink = _shrink_values(wf)
        ui.js(fp.SET_WIDGETS_JS, [shrink])
        # what the page will queue is the shrunk workflow, exactly as the pack's converter reads it
        expected = json.loads(json.dumps(wf))
        for n in expected["nodes"]:
            if str(n["id"]) in shrink:
                specs = [s for s in wc.node_inputs(comfy.nodes.NODE_CLASS_MAPPINGS[n["type"]]) if s.is_widget]
                n["widgets_values"] = {**wc.assign_widgets(n, specs).values, **shrink[str(n["id"])]}
        problems = fp.prompt_problems(ui.js(fp.PROMPT_JS), wc.convert(expected, comfy.nodes.NODE_CLASS_MAPPINGS).prompt)
        assert not problems, "\n".join(problems)

        save = next(n for n in wf["nodes"] if n["type"] == "SaveImage")
        fp.run_button(ui).click()
        deadline = time.monotonic() + RUN_TIMEOUT_S
        image = None
        while image is None and time.monotonic() < deadline:
            image = ui.js(IMAGE_ON_NODE_JS, save["id"])
            dialogs = ui.js(fp.OPEN_DIALOGS_JS)
            assert not dialogs, f"the run ended in a dialog: {dialogs}"
            ui.server.check_alive()
            time.sleep(0.5)
        assert image, f"no image on the Save Image node within {RUN_TIMEOUT_S} s:\n{ui.server.tail()}"
        assert (image["w"], image["h"]) == (SHRINK["PanoramaLatent"]["width"], SHRINK["PanoramaLatent"]["height"])
        assert "/view?" in image["src"] and "type=output" in image["src"], image["src"]
        saved = list((ui.server.base / "output").glob(f"{save['widgets_values'][0]}*.png"))
        assert saved, f"the image the page shows is not in the server's output folder: {image['src']}"


# What the user types after shrinking the workflow (window 64 px, stride 32 px, width 128 px), and the words the
# error dialog must contain besides the node's name.
BAD_INPUTS = {
    "stride_over_window": {"typed": {"SyncDiffusionSampler": {"stride": 96}}, "toggled": {},
                           "mentions": ["stride", "96 px", "64 px"]},
    "wrap_width_not_multiple_of_stride": {"typed": {"PanoramaLatent": {"width": 136}},
                                          "toggled": {"SyncDiffusionSampler": {"wrap": True}},
                                          "mentions": ["stride", "136 px", "32 px"]},
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_error_names_node_and_pixels(ui, case):
    bad = BAD_INPUTS[case]
    try:
        with ui.artefacts_on_failure(f"bad-input-{case}"):  # the screenshot shows the dialog
            wf = fp.open_template(ui, RUN_WORKFLOW)
            ui.js(fp.SET_WIDGETS_JS, [_shrink_values(wf)])
            ui.settle()
            for n in wf["nodes"]:
                for name, value in bad["typed"].get(n["type"], {}).items():
                    fp.type_into_widget(ui, n["id"], name, value)
                for name, value in bad["toggled"].get(n["type"], {}).items():
                    fp.click_toggle(ui, n["id"], name, value)
            text = fp.queue_and_wait_for_error_dialog(ui, RUN_TIMEOUT_S)
            sampler = next(n for n in wf["nodes"] if n["type"] == "SyncDiffusionSampler")
            names = {sampler.get("title") or "SyncDiffusion Sampler", "SyncDiffusionSampler"}
            assert any(nm in text for nm in names), f"the error does not name the node ({names}):\n{text}"
            assert "stride" in text and " px" in text, f"the error does not name the input in pixels:\n{text}"
            assert "latent px" not in text, f"the error speaks latent pixels; the widgets are in pixels:\n{text}"
            for words in bad["mentions"]:
                assert words in text, f"the error does not mention {words!r}:\n{text}"
    finally:
        with contextlib.suppress(Exception):  # a dialog left open shows up in the next test's checks
            fp.close_dialogs(ui)
