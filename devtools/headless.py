"""This node pack inside a real ComfyUI, in-process and headless: the one ComfyUI start of the tests
(``devtools.harness``), the benches and the demos. ``rt = start(base_dir)`` (once per process), then
``rt.run_prompt(prompt)`` runs an API-format prompt through ``execution.PromptExecutor``.

``start`` does what ComfyUI's ``main.py`` does for a headless run and nothing more: the ComfyUI tree first on
``sys.path`` (``$COMFYUI_PATH`` or ``.comfyui/ComfyUI``, so the top-level module ``nodes`` is ComfyUI's ``nodes.py``,
never this repository's ``nodes/``); ``args.cpu`` and ``args.base_directory`` set before ``folder_paths`` or
``comfy.model_management`` are imported (models/, input/, output/, temp/, user/ under ``base_dir``, as
``main.py --base-directory``); the built-in extra nodes, then this pack through ``nodes.load_custom_node(<repo
root>)`` as ComfyUI loads each folder of ``custom_nodes/``, failing loudly where ComfyUI only logs; a progress hook
like ``main.py``'s, which records progress and lets Cancel work.
"""
import asyncio
import dataclasses
import logging
import os
import sys
import uuid
from pathlib import Path
from typing import Any, Callable

REPO_ROOT = Path(__file__).resolve().parent.parent
_RUNTIME: "ComfyRuntime | None" = None


# ``make setup`` writes the ComfyUI it set up for a venv into this file of the venv, so that the venv's python
# finds its own ComfyUI (each CI lane has its venv and its ComfyUI: .venv + .comfyui/ComfyUI, .venv-033 + ...).
VENV_COMFYUI_RECORD = "syncdiffusion-comfyui.txt"


def comfyui_path() -> Path:
    """The ComfyUI tree used: ``$COMFYUI_PATH`` when set, else the one ``make setup`` recorded in the running
    venv, else ``.comfyui/ComfyUI`` (the default lane's)."""
    env = os.environ.get("COMFYUI_PATH")
    record = Path(sys.prefix) / VENV_COMFYUI_RECORD
    if env:
        path = Path(env).expanduser().resolve()
    elif record.is_file() and record.read_text().strip():
        path = Path(record.read_text().strip())
    else:
        path = REPO_ROOT / ".comfyui" / "ComfyUI"
    if not (path / "nodes.py").is_file() or not (path / "comfy").is_dir():
        raise RuntimeError(
            f"No ComfyUI at {path}. Run `make setup` (fetches ComfyUI into .comfyui/) "
            "or set COMFYUI_PATH to an existing ComfyUI checkout.")
    return path


def comfyui_version(path: Path | None = None) -> str | None:
    """The version a ComfyUI tree declares in its ``comfyui_version.py`` (None when it has none). For reports
    and setup checks only: the harness picks ComfyUI APIs by looking at them, never by this string."""
    import re
    f = (path or comfyui_path()) / "comfyui_version.py"
    if not f.is_file():
        return None
    m = re.search(r"""__version__\s*=\s*["']([^"']+)["']""", f.read_text(errors="replace"))
    return m.group(1) if m else None


class PromptValidationError(AssertionError):
    """``execution.validate_prompt`` rejected the prompt."""

    def __init__(self, error: dict, node_errors: dict):
        self.error = error
        self.node_errors = node_errors
        lines = [f"{error.get('message')}: {error.get('details')}"]
        for nid, ne in node_errors.items():
            for r in ne.get("errors", []):
                lines.append(f"  node {nid} ({ne.get('class_type')}): {r.get('message')}: {r.get('details')}")
        super().__init__("prompt failed validation\n" + "\n".join(lines))


class PromptExecutionError(RuntimeError):
    """A node raised while the prompt executed. ``exception_type`` is the qualified name of the
    original exception (e.g. ``'ValueError'``), ``exception_message`` its text, ``node_id`` and
    ``node_type`` the failing node."""

    def __init__(self, data: dict):
        self.data = data
        self.node_id = data.get("node_id")
        self.node_type = data.get("node_type")
        self.exception_type = data.get("exception_type", "")
        self.exception_message = data.get("exception_message", "")
        tb = "".join(data.get("traceback") or [])
        super().__init__(f"node {self.node_id} ({self.node_type}) raised {self.exception_type}: "
                         f"{self.exception_message}\n{tb}")


@dataclasses.dataclass
class PromptResult:
    """What a prompt produced: ``outputs[node_id]`` (the node's output slots), ``ui[node_id]`` (SaveImage's
    ``{"images": [...]}``), the executor's ``(event, data)`` messages and the ``(node_id, value, total)`` progress."""
    prompt_id: str
    prompt: dict
    outputs: dict[str, tuple]
    ui: dict[str, dict]
    messages: list[tuple[str, Any]]
    progress: list[tuple[str | None, float, float]]
    success: bool
    interrupted: bool
    output_dir: Path

    def __getitem__(self, node_id: str) -> tuple:
        return self.outputs[str(node_id)]

    def image_files(self, node_id: str | None = None) -> list[Path]:
        """Paths of the images that output nodes (SaveImage...) wrote, optionally of one node."""
        files = []
        for nid, ui in self.ui.items():
            if node_id is not None and nid != str(node_id):
                continue
            for img in (ui or {}).get("images", []):
                if img.get("type", "output") == "output":
                    files.append(self.output_dir / img.get("subfolder", "") / img["filename"])
        return files


class ServerStub:
    """What ``execution.PromptExecutor`` and the progress handlers need from ``server.PromptServer``."""

    def __init__(self):
        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None
        self.sockets_metadata: dict = {}
        self.messages: list[tuple[str, Any]] = []

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data))

    def queue_updated(self):
        pass


class ComfyRuntime:
    """A started headless ComfyUI with this pack loaded (one per process; get it from ``start``)."""

    def __init__(self, base_dir: Path, comfy_dir: Path):
        self.base_dir = base_dir
        self.comfy_dir = comfy_dir
        import nodes  # ComfyUI's nodes.py
        import execution
        import folder_paths
        self.nodes = nodes
        self.execution = execution
        self.folder_paths = folder_paths
        self.pack_node_ids: list[str] = []
        self.pack_module = None
        self.server = ServerStub()
        self._progress: list[tuple[str | None, float, float]] = []
        self._on_progress: Callable[[str | None, float, float], None] | None = None

    # ------------------------------------------------------------------ paths
    @property
    def models_dir(self) -> Path:
        return Path(self.folder_paths.models_dir)

    @property
    def output_dir(self) -> Path:
        return Path(self.folder_paths.get_output_directory())

    @property
    def input_dir(self) -> Path:
        return Path(self.folder_paths.get_input_directory())

    def model_folder(self, kind: str) -> Path:
        """The first (default) folder ComfyUI searches for models of ``kind`` (``checkpoints``, ``vae``...)."""
        path = Path(self.folder_paths.get_folder_paths(kind)[0])
        path.mkdir(parents=True, exist_ok=True)
        return path

    def add_model_folder(self, kind: str, path: Path | str) -> None:
        self.folder_paths.add_model_folder_path(kind, str(path))

    # ------------------------------------------------------------------ nodes
    def register_nodes(self, mapping: dict[str, type], display: dict[str, str] | None = None) -> None:
        """Register extra (test-only) node classes, V1-style, into ComfyUI's registry."""
        for name, cls in mapping.items():
            cls.RELATIVE_PYTHON_MODULE = getattr(cls, "RELATIVE_PYTHON_MODULE", "custom_nodes.syncdiffusion_test_helpers")
            self.nodes.NODE_CLASS_MAPPINGS[name] = cls
        self.nodes.NODE_DISPLAY_NAME_MAPPINGS.update(display or {})

    def node_class(self, node_type: str) -> type:
        return self.nodes.NODE_CLASS_MAPPINGS[node_type]

    def is_output_node(self, node_type: str) -> bool:
        return getattr(self.node_class(node_type), "OUTPUT_NODE", False) is True

    # ------------------------------------------------------------------ execution
    def validate(self, prompt: dict) -> tuple[bool, dict | None, list, dict]:
        return asyncio.run(self.execution.validate_prompt(str(uuid.uuid4()), prompt, None))

    def run_prompt(self, prompt: dict, *, raise_on_error: bool = True, extra_data: dict | None = None,
                   interrupt_after_progress: int | None = None,
                   on_progress: Callable[[str | None, float, float], None] | None = None) -> PromptResult:
        """Validate an API-format ``prompt`` with ``execution.validate_prompt``, then execute it with a fresh
        ``execution.PromptExecutor``. A prompt without output nodes gets a test sink on its leaf nodes' outputs.
        ``interrupt_after_progress=n`` presses Cancel after the n-th progress update (``interrupted=True``, nothing
        raised). Raises ``PromptValidationError`` or ``PromptExecutionError`` (unless ``raise_on_error=False``).
        """
        prompt = {str(k): {"class_type": v["class_type"], "inputs": dict(v.get("inputs", {})),
                           **({"_meta": v["_meta"]} if "_meta" in v else {})}
                  for k, v in prompt.items()}
        self._attach_sink_if_needed(prompt)
        ok, error, good_outputs, node_errors = self.validate(prompt)
        if not ok or node_errors:
            raise PromptValidationError(error or {"message": "some outputs failed validation", "details": ""},
                                        node_errors)
        prompt_id = str(uuid.uuid4())
        self._progress = []
        count = [0]

        def progress_cb(node_id, value, total):
            count[0] += 1
            if on_progress is not None:
                on_progress(node_id, value, total)
            if interrupt_after_progress is not None and count[0] >= interrupt_after_progress:
                self.nodes.interrupt_processing(True)

        self._on_progress = progress_cb
        self.server = ServerStub()
        executor = new_executor(self.execution, self.server)
        self.server.last_prompt_id = prompt_id
        try:
            executor.execute(prompt, prompt_id, extra_data or {}, good_outputs)
        finally:
            self._on_progress = None
            self.nodes.interrupt_processing(False)
        messages = list(executor.status_messages)
        outputs = {}
        for nid, entry in zip(prompt, cache_get_all(executor.caches.outputs, list(prompt))):
            if entry is None:
                continue
            outs = entry.outputs if hasattr(entry, "outputs") else entry
            outputs[nid] = tuple(o[0] if isinstance(o, list) and len(o) == 1 else o for o in outs)
        result = PromptResult(
            prompt_id=prompt_id, prompt=prompt, outputs=outputs,
            ui=dict(getattr(executor, "history_result", {}).get("outputs", {})),
            messages=messages, progress=list(self._progress),
            success=executor.success and any(e == "execution_success" for e, _ in messages),
            interrupted=any(e == "execution_interrupted" for e, _ in messages),
            output_dir=self.output_dir)
        if raise_on_error:
            errors = [d for e, d in messages if e == "execution_error"]
            if errors:
                raise PromptExecutionError(errors[0])
        return result

    def _attach_sink_if_needed(self, prompt: dict) -> None:
        if any(self.is_output_node(v["class_type"]) for v in prompt.values()
               if v["class_type"] in self.nodes.NODE_CLASS_MAPPINGS):
            return
        if SINK_NODE not in self.nodes.NODE_CLASS_MAPPINGS:
            self.register_nodes({SINK_NODE: _make_sink_class(self)})
        consumed = {str(v[0]) for node in prompt.values() for v in node["inputs"].values()
                    if isinstance(v, list) and len(v) == 2}
        n = 0
        for nid, node in list(prompt.items()):
            if nid in consumed or node["class_type"] not in self.nodes.NODE_CLASS_MAPPINGS:
                continue
            for slot in range(len(self.node_class(node["class_type"]).RETURN_TYPES)):
                prompt[f"_sink{n}"] = {"class_type": SINK_NODE, "inputs": {"value": [nid, slot]}}
                n += 1

    def _progress_hook(self, value, total, preview_image, prompt_id=None, node_id=None):
        from comfy_execution.utils import get_executing_context
        from comfy_execution.progress import get_progress_state
        import comfy.model_management
        ctx = get_executing_context()
        if node_id is None and ctx is not None:
            node_id = ctx.node_id
        if prompt_id is None and ctx is not None:
            prompt_id = ctx.prompt_id
        self._progress.append((node_id, value, total))
        if self._on_progress is not None:
            self._on_progress(node_id, value, total)
        # As main.py's hook does: this is where a pressed Cancel surfaces inside a sampler.
        comfy.model_management.throw_exception_if_processing_interrupted()
        if node_id is not None:
            get_progress_state().update_progress(node_id, value, total, preview_image)
        self.server.send_sync("progress", {"value": value, "max": total, "prompt_id": prompt_id, "node": node_id})


# Every key that some ComfyUI's PromptExecutor reads from cache_args ("lru" and "ram" in 0.3.75, "ram_inactive"
# added later; the executor indexes the dict directly, so a missing key is a KeyError). Zeros: no caching across
# prompts (each run_prompt has its own executor anyway), no RAM-pressure release.
CACHE_ARGS = {"lru": 0, "ram": 0, "ram_inactive": 0}


def new_executor(execution, server):
    """A fresh ``execution.PromptExecutor`` that caches nothing across prompts."""
    return execution.PromptExecutor(server, cache_type=False, cache_args=dict(CACHE_ARGS))


def cache_get_all(cache, node_ids: list[str]) -> list:
    """``cache.get(node_id)`` for each id. The executor's caches answer directly in some ComfyUI versions and
    with a coroutine (``async def get``) in others; awaitables are awaited, in one event loop."""
    import inspect
    values = [cache.get(nid) for nid in node_ids]
    pending = [i for i, v in enumerate(values) if inspect.isawaitable(v)]
    if pending:
        async def wait_all():
            return await asyncio.gather(*(values[i] for i in pending))
        for i, v in zip(pending, asyncio.run(wait_all())):
            values[i] = v
    return values


SINK_NODE = "SyncDiffTest_Sink"


def _make_sink_class(rt: ComfyRuntime) -> type:
    from comfy.comfy_types import IO

    class SyncDiffTestSink:
        """Test-only output node: accepts anything, so a prompt without output nodes still executes."""
        CATEGORY = "_for_testing/syncdiffusion"
        RETURN_TYPES = ()
        OUTPUT_NODE = True
        FUNCTION = "run"

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"value": (IO.ANY, {})}}

        def run(self, value):
            return {}

    return SyncDiffTestSink


def _prepare_sys_path(comfy_dir: Path) -> None:
    existing = sys.modules.get("nodes")
    if existing is not None:
        f = getattr(existing, "__file__", "") or ""
        if Path(f).resolve() != (comfy_dir / "nodes.py").resolve():
            raise RuntimeError(
                f"A module named 'nodes' is already imported from {f!r}, not ComfyUI's nodes.py. "
                "This pack's nodes/ folder must only be imported as part of the pack (through "
                "ComfyUI's load_custom_node), never as a top-level 'nodes' module.")
    p = str(comfy_dir)
    if p in sys.path:
        sys.path.remove(p)
    sys.path.insert(0, p)


_BOOT: dict = {}


def bootstrap(base_dir: Path | str | None = None, *, cpu: bool = True, pytorch_attention: bool = True,
              log_level: int | None = logging.WARNING) -> Path:
    """The cheap half of ``start``: ComfyUI first on ``sys.path``, ``args.cpu`` and ``args.base_directory`` set
    before anything imports ``comfy.model_management`` or ``folder_paths`` (the tests call it from
    ``pytest_configure``). Idempotent; returns the base directory. ``pytorch_attention`` is
    ``--use-pytorch-cross-attention``, ComfyUI's default on NVIDIA GPUs; with ``--cpu`` alone ComfyUI picks its
    sub-quadratic attention, 2-3x slower on a CPU."""
    if _BOOT:
        if base_dir is not None and Path(base_dir).resolve() != _BOOT["base_dir"]:
            raise RuntimeError(f"ComfyUI already bootstrapped in this process with base {_BOOT['base_dir']}")
        return _BOOT["base_dir"]
    comfy_dir = comfyui_path()
    if base_dir is None:
        import tempfile
        base_dir = tempfile.mkdtemp(prefix="syncdiff-comfy-")
    base_dir = Path(base_dir).resolve()
    for sub in ("models", "input", "output", "temp", "user", "custom_nodes"):
        (base_dir / sub).mkdir(parents=True, exist_ok=True)
    _prepare_sys_path(comfy_dir)
    if log_level is not None:
        logging.getLogger().setLevel(log_level)
    for mod in ("comfy.model_management", "folder_paths"):
        if mod in sys.modules:
            raise RuntimeError(f"{mod} was imported before devtools.headless.bootstrap() could set --cpu and "
                               "the base directory; call bootstrap() first")
    from comfy.cli_args import args
    args.cpu = args.cpu or cpu
    if pytorch_attention and not (args.use_split_cross_attention or args.use_quad_cross_attention):
        args.use_pytorch_cross_attention = True
    args.base_directory = str(base_dir)
    _BOOT.update(base_dir=base_dir, comfy_dir=comfy_dir)
    return base_dir


def start(base_dir: Path | str | None = None, *, cpu: bool = True, load_pack: bool = True,
          pytorch_attention: bool = True, log_level: int | None = logging.WARNING) -> ComfyRuntime:
    """Start ComfyUI headless in this process (idempotent). ``base_dir``: ComfyUI's base directory (default: a
    fresh temp folder); ``log_level``: the root logger's level (ComfyUI logs a lot at INFO; None leaves it)."""
    global _RUNTIME
    base_dir = bootstrap(base_dir, cpu=cpu, pytorch_attention=pytorch_attention, log_level=log_level)
    if _RUNTIME is not None:
        return _RUNTIME
    import comfy.model_management  # noqa: F401  (after args.cpu)
    import comfy.utils
    # As main.py does, import ComfyUI's top-level `utils` package before `nodes`: nodes.py puts
    # ComfyUI/comfy/ first on sys.path, after which `import utils` would find comfy/utils.py instead.
    import utils.extra_config  # noqa: F401
    rt = ComfyRuntime(base_dir, _BOOT["comfy_dir"])
    rt.folder_paths.set_temp_directory(str(base_dir / "temp"))
    asyncio.run(rt.nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    comfy.utils.set_progress_bar_global_hook(rt._progress_hook)
    if load_pack:
        load_this_pack(rt)
    _RUNTIME = rt
    return rt


def load_this_pack(rt: ComfyRuntime) -> list[str]:
    """Load the repository as ComfyUI loads a folder of custom_nodes/; the node ids the pack declares."""
    nodes = rt.nodes
    ok = asyncio.run(nodes.load_custom_node(str(REPO_ROOT), ignore=set(), module_parent="custom_nodes"))
    if not ok:
        raise RuntimeError(f"ComfyUI failed to load the pack from {REPO_ROOT} (see the log above: "
                           "load_custom_node only logs the exception)")
    module_name = str(REPO_ROOT).replace(".", "_x_")
    module = sys.modules.get(module_name)
    rt.pack_module = module

    async def node_ids():
        ext = module.comfy_entrypoint()
        if asyncio.iscoroutine(ext):
            ext = await ext
        return [cls.GET_SCHEMA().node_id for cls in await ext.get_node_list()]
    ids = asyncio.run(node_ids())
    missing = [i for i in ids if i not in nodes.NODE_CLASS_MAPPINGS]
    if missing:
        raise RuntimeError(f"pack declared nodes that ComfyUI did not register: {missing}")
    rt.pack_node_ids = ids
    return ids


