"""The real ComfyUI frontend in headless Chromium, for ``tests/comfy/test_frontend.py``: the server, the page, what the
page is asked (JavaScript run in it), and the checks of what it answers.

The JavaScript reads ComfyUI frontend 1.32's globals (``app``, ``LiteGraph``) and its DOM (PrimeVue dialogs,
``data-testid`` template cards, litegraph's ``.graphdialog`` value prompt).
"""
import contextlib
import json
import math
import os
import time
from pathlib import Path

from devtools import workflow as wc
from devtools.server import LINK_NAME, Server
from devtools.server import get as get_json  # noqa: F401  (test_frontend uses fp.get_json)

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = Path(os.environ.get("SYNCDIFF_TEST_ARTIFACTS") or ROOT / "output" / "test-artifacts" / "frontend")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1600, "height": 1000}


class PageProblem(AssertionError):
    pass


# ----------------------------------------------------------------------------- server

# The models folders the server lists from the tests' models directory (what the example workflows load).
MODEL_FOLDERS = ("checkpoints", "controlnet", "diffusion_models", "text_encoders", "vae", "lpips")


def frontend_server(base: Path, models_dir: Path) -> Server:
    """A server whose default user has already seen the first-run template dialog (without that the frontend opens
    the template browser by itself on the first visit, racing the test), listing the example workflows' folders."""
    return Server(base, models_dir, folders=MODEL_FOLDERS, settings={"Comfy.TutorialCompleted": True})


# ----------------------------------------------------------------------------- page

class UI:
    """The page, plus what it reported: console errors, uncaught exceptions."""

    def __init__(self, page, server: Server):
        self.page = page
        self.server = server
        self.console_errors: list[str] = []
        self.page_errors: list[str] = []
        page.on("console", lambda m: self.console_errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: self.page_errors.append(str(e)))

    def js(self, script: str, arg=None):
        return self.page.evaluate(script, arg)

    def settle(self) -> None:
        """Two animation frames: the canvas has drawn the graph (and sized its nodes) at least once."""
        self.js("() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")

    @contextlib.contextmanager
    def artefacts_on_failure(self, name: str):
        """Keep a screenshot and the server log when the body raises; name them in the failure message."""
        try:
            yield
        except BaseException as e:
            if isinstance(e, (KeyboardInterrupt, SystemExit)):
                raise
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            shot = ARTIFACTS / f"{name}.png"
            log = ARTIFACTS / f"{name}.server.log"
            try:
                self.page.screenshot(path=str(shot))
            except Exception as shot_error:  # the page may be gone; the log still helps
                shot = f"(no screenshot: {shot_error})"
            log.write_text(self.server.tail(200_000))
            console = [m for m in self.console_errors if not m.startswith("Failed to load resource")]
            extra = "\n".join(self.page_errors[-5:] + console[-10:]) or "(none)"
            raise PageProblem(f"{e}\n\nartefacts: {shot}\n           {log}\nlast page errors:\n{extra}") from e


# Dialogs as the frontend draws them: PrimeVue's (1.32) and the role=dialog ones of later frontends (1.49).
DIALOG_SELECTOR = '.p-dialog, [role="dialog"]'
OPEN_DIALOGS_JS = "() => Array.from(document.querySelectorAll('" + DIALOG_SELECTOR + """'))
    .filter((d, i, all) => !all.some(o => o !== d && o.contains(d)))
    .filter(d => d.offsetParent !== null || d.getClientRects().length)
    .map(d => d.innerText.trim().slice(0, 1500))"""
ERROR_TOASTS_JS = """() => Array.from(document.querySelectorAll('.p-toast-message-error'))
    .map(t => t.innerText.trim().slice(0, 500))"""

GEOMETRY_JS = """() => {
  const T = LiteGraph.NODE_TITLE_HEIGHT, ctx = app.canvas.ctx;
  const nodes = app.graph._nodes.map(n => {
    const collapsed = !!(n.flags && n.flags.collapsed);
    const w = collapsed ? (n._collapsed_width || LiteGraph.NODE_COLLAPSED_WIDTH) : n.size[0];
    const body = collapsed ? 0 : n.size[1];
    const rects = [{part: 'node', x: n.pos[0], y: n.pos[1] - T, w: w, h: body + T}];
    // LGraphNode.drawBadges: right-aligned, gap 2, bottom 2 px above the title bar
    const badges = (n.badges || []).map(b => typeof b === 'function' ? b() : b).filter(b => b.text || b.icon);
    if (badges.length && !collapsed) {
      const gap = 2, widths = badges.map(b => b.getWidth(ctx));
      const total = widths.reduce((a, b) => a + b + gap, 0), bh = Math.max(...badges.map(b => b.height));
      const left = n.badgePosition === 'top-left' ? 0 : w - total;
      rects.push({part: 'badge ' + badges.map(b => b.text).join(','), x: n.pos[0] + left, y: n.pos[1] - T - gap - bh,
                  w: total, h: bh});
    }
    const widgets = (n.widgets || []).map(wd => ({name: wd.name, value: wd.value, type: wd.type, hidden: !!wd.hidden,
      y: wd.last_y ?? wd.y, h: wd.computedHeight || (wd.computeSize ? wd.computeSize(n.size[0])[1] : 0) ||
      LiteGraph.NODE_WIDGET_HEIGHT}));
    return {id: String(n.id), type: n.type, title: n.title, mode: n.mode, size: [n.size[0], n.size[1]],
            pos: [n.pos[0], n.pos[1]], rects, widgets, min_size: n.computeSize ? Array.from(n.computeSize()) : null};
  });
  const groups = (app.graph._groups || []).map(g => {
    const b = Array.from(g._bounding || [g.pos[0], g.pos[1], g.size[0], g.size[1]]);
    return {title: g.title, x: b[0], y: b[1], w: b[2], h: b[3], title_h: g.titleHeight};
  });
  return {nodes, groups};
}"""

PROMPT_JS = "async () => (await app.graphToPrompt()).output"

# The notes (DOM widgets): on screen when the workflow opens, and their text not cut off.
NOTES_JS = """() => app.graph._nodes.filter(n => n.type === 'MarkdownNote' || n.type === 'Note').map(n => {
  const el = (n.widgets || []).map(w => w.element || w.inputEl).find(e => e);
  if (!el) return {id: String(n.id), title: n.title, shown: false};
  let r = el.getBoundingClientRect();
  if (!r.width) {  // frontends from 1.4x fit a template to the screen and, zoomed out, draw no DOM widgets
    const [l, t] = app.canvasPosToClientPos([n.pos[0], n.pos[1]]);
    const [ri, b] = app.canvasPosToClientPos([n.pos[0] + n.size[0], n.pos[1] + n.size[1]]);
    return {id: String(n.id), title: n.title, overflow: 0, lod: true,
            shown: l >= 0 && t >= 0 && ri <= innerWidth && b <= innerHeight};
  }
  let bottom = 0;
  for (const c of el.querySelectorAll('p,li,h1,h2,h3,h4,pre,blockquote')) bottom = Math.max(bottom, c.getBoundingClientRect().bottom);
  if (el.tagName === 'TEXTAREA') bottom = r.top + el.scrollHeight;
  return {id: String(n.id), title: n.title, shown: r.width > 0 && r.height > 0 && r.left >= 0 && r.top >= 0 &&
          r.right <= innerWidth && r.bottom <= innerHeight, overflow: bottom - r.bottom};
})"""

SET_WIDGETS_JS = """([values]) => {
  for (const [id, widgets] of Object.entries(values)) {
    const node = app.graph.getNodeById(Number(id));
    for (const [name, value] of Object.entries(widgets)) {
      const w = node.widgets.find(w => w.name === name);
      if (!w) throw new Error(`node ${id} has no widget ${name}`);
      w.value = value;
      if (w.callback) w.callback(w.value, app.canvas, node);
    }
  }
  app.graph.setDirtyCanvas(true, true);
}"""


def open_template(ui: UI, name: str, tries: int = 3) -> dict:
    """Open example workflow ``name`` from the template browser, as a user does; returns the file's JSON.

    A dialog a failed test left open is closed first, so one failure does not fail every test after it. The card is
    clicked again when the dialog stays open: on a loaded machine the category's card list can re-render between
    the lookup and the click, and a click on the replaced card does nothing."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    wf = json.loads((ROOT / "example_workflows" / f"{name}.json").read_text())
    page = ui.page
    if ui.js(OPEN_DIALOGS_JS):
        close_dialogs(ui)
    page.get_by_role("button", name="Templates", exact=True).click()
    dialog = page.locator(DIALOG_SELECTOR).filter(has=page.locator('[data-testid^="template-workflow-"]')).last
    dialog.wait_for()
    dialog.get_by_text(LINK_NAME, exact=True).first.click()
    card = dialog.locator(f'[data-testid="template-workflow-{name}"]')
    for attempt in range(tries):
        if not dialog.is_visible():
            break
        card.click()
        try:
            dialog.wait_for(state="hidden", timeout=20_000)
        except PlaywrightTimeout:
            if attempt == tries - 1:
                raise
    ids = sorted(str(n["id"]) for n in wf["nodes"])
    page.wait_for_function("ids => JSON.stringify(app.graph._nodes.map(n => String(n.id)).sort()) === "
                           "JSON.stringify(ids)", arg=ids)
    ui.settle()
    return wf


def rects_overlap(a: dict, b: dict) -> bool:
    return a["x"] < b["x"] + b["w"] and b["x"] < a["x"] + a["w"] and a["y"] < b["y"] + b["h"] and b["y"] < a["y"] + a["h"]


def layout_problems(geometry: dict) -> list[str]:
    """Overlapping drawn rectangles (node incl. title bar, badge), widgets drawn outside their node, nodes
    straddling a group's border or covering its title."""
    problems = []
    nodes = geometry["nodes"]
    for i, a in enumerate(nodes):
        for b in nodes[i + 1:]:
            for ra in a["rects"]:
                for rb in b["rects"]:
                    if rects_overlap(ra, rb):
                        problems.append(f"node {a['id']} '{a['title']}' ({ra['part']} {_fmt(ra)}) overlaps node "
                                        f"{b['id']} '{b['title']}' ({rb['part']} {_fmt(rb)})")
        for w in a["widgets"]:
            if w["y"] is not None and w["y"] + w["h"] > a["size"][1] + 0.5:
                problems.append(f"node {a['id']} '{a['title']}': widget {w['name']} drawn at y {w['y']}..{w['y'] + w['h']}"
                                f" outside the node's body (height {a['size'][1]})")
    for g in geometry["groups"]:
        title_bar = {"x": g["x"], "y": g["y"], "w": g["w"], "h": g["title_h"]}
        for n in nodes:
            for r in n["rects"]:
                inside = (g["x"] <= r["x"] and r["x"] + r["w"] <= g["x"] + g["w"] and g["y"] <= r["y"]
                          and r["y"] + r["h"] <= g["y"] + g["h"])
                if rects_overlap(r, g) and not inside:
                    problems.append(f"node {n['id']} '{n['title']}' ({r['part']} {_fmt(r)}) straddles the border of "
                                    f"group '{g['title']}' {_fmt(g)}")
                elif rects_overlap(r, title_bar):
                    problems.append(f"node {n['id']} '{n['title']}' ({r['part']}) covers the title of group "
                                    f"'{g['title']}'")
    return problems


def _fmt(r: dict) -> str:
    return f"[{r['x']:g}, {r['y']:g}, {r['w']:g}x{r['h']:g}]"


def same(a, b) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b or a == b and type(a) is type(b)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def widget_problems(wf: dict, geometry: dict, object_info: dict) -> list[str]:
    """Every pack node shows every widget of its schema, in order, with the value saved in the file."""
    problems = []
    drawn = {n["id"]: n for n in geometry["nodes"]}
    for saved in wf["nodes"]:
        info = object_info.get(saved["type"])
        if info is None or info.get("python_module") != f"custom_nodes.{LINK_NAME}":
            continue
        node = drawn[str(saved["id"])]
        expected_names = []
        for section in ("required", "optional"):
            for name in info.get("input_order", {}).get(section, []):
                spec = info["input"][section][name]
                typ, opts = spec[0], (spec[1] if len(spec) > 1 else {})
                if isinstance(typ, list) or typ in wc.WIDGET_TYPES and not opts.get("forceInput"):
                    expected_names.append(name)
                    if opts.get("control_after_generate"):
                        expected_names.append("control_after_generate")
        names = [w["name"] for w in node["widgets"]]
        values = [w["value"] for w in node["widgets"]]
        label = f"node {saved['id']} ({saved['type']}, '{node['title']}')"
        if names != expected_names:
            problems.append(f"{label}: widgets {names}, the schema has {expected_names}")
        hidden = [w["name"] for w in node["widgets"] if w["hidden"]]
        if hidden:
            problems.append(f"{label}: widgets not shown: {hidden}")
        if not same(values, list(saved.get("widgets_values") or [])):
            problems.append(f"{label}: widget values {values} differ from the saved {saved.get('widgets_values')}")
    return problems


def prompt_problems(frontend: dict, ours: dict) -> list[str]:
    """Where the frontend's API prompt and workflow_convert's differ (``_meta`` titles only where the file sets
    one: the frontend adds a title to every node)."""
    problems = []
    if sorted(frontend) != sorted(ours):
        problems.append(f"node ids: the frontend's prompt has {sorted(frontend)}, workflow_convert {sorted(ours)}")
    for nid in sorted(set(frontend) & set(ours), key=int):
        f, o = frontend[nid], ours[nid]
        if f["class_type"] != o["class_type"]:
            problems.append(f"node {nid}: class_type {f['class_type']} vs {o['class_type']}")
        if not (set(f["inputs"]) == set(o["inputs"]) and all(same(f["inputs"][k], o["inputs"][k]) for k in o["inputs"])):
            diff = {k: (f["inputs"].get(k, "<absent>"), o["inputs"].get(k, "<absent>"))
                    for k in set(f["inputs"]) | set(o["inputs"]) if not same(f["inputs"].get(k), o["inputs"].get(k))}
            problems.append(f"node {nid} ({o['class_type']}) inputs differ (frontend, workflow_convert): {diff}")
        if "_meta" in o and f.get("_meta", {}).get("title") != o["_meta"]["title"]:
            problems.append(f"node {nid}: title {f.get('_meta')} vs {o['_meta']}")
    return problems

MISSING_MODELS_JS = """() => Array.from(document.querySelectorAll('.comfy-missing-models li, .comfy-missing-models [role=option]'))
    .map(li => ({text: li.innerText, downloads: Array.from(li.querySelectorAll('button'))
                 .filter(b => b.innerText.startsWith('Download') && !b.disabled).map(b => b.title)}))"""
# Frontends from 1.4x: no dialog; an error overlay whose "View details" opens the Errors panel. There a missing model
# is a row with its file name, its folder and a Download button (the URL is only copied, never shown).
ERROR_OVERLAY_JS = """() => { const o = document.querySelector('[data-testid="error-overlay"]');
    return o && o.getClientRects().length ? o.innerText.trim() : null }"""
ERRORS_PANEL_JS = """() => { let p = document.querySelector('[data-testid="panel-tab-errors"]');
    while (p && !/Errors? detected/.test(p.innerText)) p = p.parentElement;
    return p ? p.innerText.trim() : null }"""
MISSING_MODEL_ROWS_JS = """() => Array.from(document.querySelectorAll('[data-testid="missing-model-download"]')).map(b => {
    let row = b.parentElement;
    while (row.parentElement && row.innerText.split('\\n').filter(l => l.trim()).length < 3) row = row.parentElement;
    return {text: row.innerText, label: b.getAttribute('aria-label') || '', enabled: !b.disabled} })"""


def wait_for_error_report(ui: UI, timeout_s: float = 30) -> str:
    """Whichever way this frontend reports a problem: "dialog" (1.32) or "panel" (1.4x: overlay and Errors panel)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if ui.js(OPEN_DIALOGS_JS):
            return "dialog"
        if ui.js(ERROR_OVERLAY_JS) or ui.js(ERRORS_PANEL_JS):
            return "panel"
        time.sleep(0.25)
    raise PageProblem(f"neither a dialog nor an error overlay within {timeout_s} s")


def run_button(ui: UI):
    """The Run button (1.4x also names its queue-mode menu "Run"; there the button is ``queue-button``)."""
    by_role = ui.page.get_by_role("button", name="Run", exact=True)
    return by_role if by_role.count() == 1 else ui.page.locator('[data-testid="queue-button"]')


def open_error_details(ui: UI, expect: tuple[str, ...] = (), timeout_s: float = 30) -> str:
    """1.4x: the error overlay's and the Errors panel's text, once the panel holds every string of ``expect`` and its
    text has stopped changing (the error report fills in after the panel opens). Opens the panel from the overlay
    unless it is open already (then the frontend shows no overlay)."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    deadline = time.monotonic() + timeout_s
    overlay = None
    last, stable_since = None, time.monotonic()
    while time.monotonic() < deadline:
        if ui.js(ERROR_OVERLAY_JS):
            overlay = ui.js(ERROR_OVERLAY_JS)
            try:  # the overlay re-renders while the report fills in: a detached button is clicked next round
                ui.page.locator('[data-testid="error-overlay-see-errors"]').click(timeout=2_000)
            except PlaywrightTimeout:
                pass
        text = ui.js(ERRORS_PANEL_JS)
        if text != last:
            last, stable_since = text, time.monotonic()
        elif text and all(e in text for e in expect) and time.monotonic() - stable_since >= 1.0:
            return f"{overlay or ''}\n{text}"
        time.sleep(0.25)
    raise PageProblem(f"the Errors panel did not show {list(expect)} within {timeout_s} s: {last}")


def queue_and_wait_for_error_dialog(ui: UI, timeout_s: float) -> str:
    """Click Run; the text of the dialog (1.32) or of the error overlay and its details (1.4x) the run ends in."""
    run_button(ui).click()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        dialogs = ui.js(OPEN_DIALOGS_JS)
        if dialogs:
            return "\n".join(dialogs)
        if ui.js(ERROR_OVERLAY_JS):
            return open_error_details(ui)
        ui.server.check_alive()
        time.sleep(0.25)
    raise PageProblem(f"no error dialog within {timeout_s} s; toasts: {ui.js(ERROR_TOASTS_JS)}")


def close_dialogs(ui: UI) -> None:
    dismiss = ui.page.locator('[data-testid="error-overlay-dismiss"]')
    if ui.js(ERROR_OVERLAY_JS) and dismiss.count():
        dismiss.first.click()
    ui.page.keyboard.press("Escape")
    ui.page.wait_for_function(f"() => ({OPEN_DIALOGS_JS})().length === 0")

WIDGET_POINT_JS = """([id, name]) => {
  const n = app.graph.getNodeById(id), w = n.widgets.find(w => w.name === name);
  const y = w.last_y ?? w.y, h = w.computedHeight || LiteGraph.NODE_WIDGET_HEIGHT;
  return app.canvasPosToClientPos([n.pos[0] + n.size[0] / 2, n.pos[1] + y + h / 2]);
}"""
WIDGET_VALUE_JS = "([id, name]) => app.graph.getNodeById(id).widgets.find(w => w.name === name).value"


def widget_point(ui: UI, node_id: int, name: str) -> tuple[float, float]:
    x, y = ui.js(WIDGET_POINT_JS, [node_id, name])
    if not (0 < x < VIEWPORT["width"] and 0 < y < VIEWPORT["height"]):
        raise PageProblem(f"widget {name} of node {node_id} is off screen at ({x:.0f}, {y:.0f})")
    return x, y


def type_into_widget(ui: UI, node_id: int, name: str, value: int) -> None:
    """What a user does: double-click the number widget, type the value into the prompt, Enter."""
    x, y = widget_point(ui, node_id, name)
    ui.page.mouse.dblclick(x, y)
    field = ui.page.locator(".graphdialog input").last
    field.wait_for()
    field.fill(str(value))
    field.press("Enter")
    got = ui.js(WIDGET_VALUE_JS, [node_id, name])
    if got != value:
        raise PageProblem(f"typed {value} into {name} of node {node_id}; the widget holds {got}")


def click_toggle(ui: UI, node_id: int, name: str, want: bool) -> None:
    """Click a toggle widget until it shows ``want`` (one click)."""
    if ui.js(WIDGET_VALUE_JS, [node_id, name]) != want:
        ui.page.mouse.click(*widget_point(ui, node_id, name))
    got = ui.js(WIDGET_VALUE_JS, [node_id, name])
    if got is not want:
        raise PageProblem(f"clicked {name} of node {node_id}: it is {got}, not {want}")
