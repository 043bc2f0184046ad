"""The real ComfyUI server (``main.py --cpu``) in a subprocess, with this pack in its custom_nodes folder as a user
installs it, driven over HTTP as the browser drives it: the one server launcher of the server, fuzz, repeated-run
and frontend tests."""
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

from devtools import headless

ROOT = Path(__file__).resolve().parent.parent
STARTUP_TIMEOUT_S = 300  # generous: a busy 2-core CI machine
LINK_NAME = "comfyui-syncdiffusion"


class ServerError(AssertionError):
    """The server did not start, died, or did not answer in time."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str, timeout: float = 10.0):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read().decode())


def post(url: str, payload, timeout: float = 30.0, raw: bytes | None = None):
    """POST JSON (or ``raw`` bytes); returns (status, body as JSON, or as text when it is not JSON)."""
    data = raw if raw is not None else json.dumps(payload).encode()
    req = urllib.request.Request(url, data=data, method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, body = r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        status, body = e.code, e.read().decode()
    try:
        return status, json.loads(body or "{}")
    except json.JSONDecodeError:
        return status, body


#: For servers that run many small prompts on a shared 2-core machine: torch on one thread. With two, each op's
#: threads wait for a busy core (the tiny model's sync run took 5-10x longer under load).
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


class Server:
    """``Server(base, models_dir).start()``; ``.url``, ``.proc``, ``.base`` (output/ under it), ``.tail()``.

    ``models_dir``'s ``folders`` are the server's extra model paths; ``settings`` (a dict) become the default user's
    ``comfy.settings.json`` (the frontend reads them); ``launch()`` then ``wait_ready()`` let the caller prepare
    other things while the server starts (``start()`` does both)."""

    def __init__(self, base: Path, models_dir: Path, extra_args: tuple = (), env: dict | None = None,
                 folders: tuple = ("checkpoints", "lpips"), settings: dict | None = None):
        self.base = base
        self.extra_env = dict(env or {})
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        for sub in ("custom_nodes", "output", "input", "temp", "user/default"):
            (base / sub).mkdir(parents=True, exist_ok=True)
        # The pack as a user installs it: a folder (here a link to this checkout) in custom_nodes/.
        (base / "custom_nodes" / LINK_NAME).symlink_to(ROOT, target_is_directory=True)
        if settings is not None:
            (base / "user" / "default" / "comfy.settings.json").write_text(json.dumps(settings))
        extra = base / "extra_model_paths.yaml"
        extra.write_text("syncdiffusion_tests:\n"
                         f"    base_path: {models_dir}\n"
                         + "".join(f"    {folder}: {folder}\n" for folder in folders))
        self.log_path = base / "server.log"
        self.cmd = [sys.executable, str(headless.comfyui_path() / "main.py"),
                    "--cpu", "--use-pytorch-cross-attention", "--listen", "127.0.0.1", "--port", str(self.port),
                    "--base-directory", str(base),
                    "--output-directory", str(base / "output"), "--input-directory", str(base / "input"),
                    "--temp-directory", str(base / "temp"), "--user-directory", str(base / "user"),
                    "--extra-model-paths-config", str(extra),
                    "--database-url", "sqlite:///:memory:", "--disable-auto-launch", "--log-stdout", *extra_args]
        self.proc = None
        self.log = None
        self.client_id = str(uuid.uuid4())

    @property
    def output(self) -> Path:
        return self.base / "output"

    def launch(self) -> None:
        """Start ``main.py`` (``wait_ready`` waits for it to answer)."""
        env = {**{k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}, **self.extra_env}
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.cmd, cwd=self.base, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerError(f"ComfyUI exited with {self.proc.returncode} during startup:\n{self.tail()}")
            try:
                get(self.url + "/system_stats", timeout=2)
                return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                time.sleep(0.5)
        raise ServerError(f"ComfyUI did not answer within {STARTUP_TIMEOUT_S} s:\n{self.tail()}")

    def start(self) -> "Server":
        self.launch()
        self.wait_ready()
        return self

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)
        if self.log:
            self.log.close()

    def tail(self, n: int = 6000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return "(no log)"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def check_alive(self) -> None:
        """Raise ``ServerError`` (with the log's tail) when the server has died."""
        if not self.alive():
            raise ServerError(f"the server died (exit {self.proc.returncode if self.proc else None}):\n{self.tail()}")

    # ------------------------------------------------------------------ prompts
    def submit(self, prompt: dict, extra_data: dict | None = None, timeout: float = 30.0):
        """POST /prompt; returns (status, body)."""
        payload = {"prompt": prompt, "client_id": self.client_id, **({"extra_data": extra_data} if extra_data else {})}
        return post(self.url + "/prompt", payload, timeout=timeout)

    def wait(self, prompt_id: str, timeout: float, poll: float = 0.1) -> dict | None:
        """The history entry of ``prompt_id`` once it finished (success or error), or None after ``timeout`` s.
        Raises ServerError when the server dies meanwhile."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            hist = get(f"{self.url}/history/{prompt_id}")
            entry = hist.get(prompt_id)
            if entry is not None and entry.get("status", {}).get("completed") is not None \
                    and entry["status"].get("status_str") in ("success", "error"):
                return entry
            if not self.alive():
                raise ServerError(f"the server died while running prompt {prompt_id}:\n{self.tail()}")
            time.sleep(poll)
        return None

    def run(self, prompt: dict, timeout: float, extra_data: dict | None = None) -> dict:
        """Submit and wait; the finished history entry (an AssertionError when refused or not finished in time)."""
        status, body = self.submit(prompt, extra_data)
        assert status == 200 and not body.get("node_errors"), f"/prompt refused the prompt: {body}"
        entry = self.wait(body["prompt_id"], timeout)
        assert entry is not None, f"prompt did not finish in {timeout} s:\n{self.tail()}"
        return entry

    def interrupt(self):
        post(self.url + "/interrupt", {})

    def queue_empty(self) -> bool:
        q = get(self.url + "/queue")
        return not q.get("queue_running") and not q.get("queue_pending")


def running(base: Path, models_dir: Path, env: dict | None = None, before_start=None):
    """A started :class:`Server` for a pytest fixture to yield (``yield from running(...)``): a start that fails
    fails the test with the server's reason; the server stops afterwards in any case. ``before_start(server)`` runs
    before it starts (to add to its folders or settings)."""
    import pytest

    srv = Server(base, models_dir, env=env)
    try:
        if before_start is not None:
            before_start(srv)
        try:
            srv.start()
        except ServerError as e:
            pytest.fail(str(e))
        yield srv
    finally:
        srv.stop()


def saved_files(server: Server, entry: dict) -> list[Path]:
    """The output files a finished prompt's history entry lists."""
    files = []
    for out in entry.get("outputs", {}).values():
        for img in out.get("images", []):
            if img.get("type", "output") == "output":
                files.append(server.output / img.get("subfolder", "") / img["filename"])
    return files


def process_stats(pid: int, samples: int = 3, gap_s: float = 0.05) -> dict:
    """Resident memory (bytes), open file descriptors and threads of process ``pid``. Descriptors and threads are the
    least of a few samples ``gap_s`` apart: a leak stays, while the socket of a request being answered comes and
    goes."""
    import psutil

    p = psutil.Process(pid)
    fds, threads = [], []
    for i in range(samples):
        if i:
            time.sleep(gap_s)
        fds.append(p.num_fds())
        threads.append(p.num_threads())
    return {"rss": p.memory_info().rss, "fds": min(fds), "threads": min(threads)}
