"""The real ComfyUI ``main.py`` on 127.0.0.1 with this pack and the test node pack loaded.

Nothing in the ComfyUI install is written: custom nodes come in through a temporary
``--extra-model-paths-config``; input, output, temp and user folders are temporary too.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

from .host import REPO, comfyui_path

PACK_NAME = "sparse_context"
TESTPACK_NAME = "sparse_context_testpack"


class PromptFailed(AssertionError):
    pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    def __init__(self, extra_args: tuple[str, ...] = (), with_testpack: bool = True, cpu: bool = True):
        self.comfy = comfyui_path()
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.tmp = Path(tempfile.mkdtemp(prefix="sc-comfy-"))
        self.extra_args = extra_args
        self.with_testpack = with_testpack
        self.cpu = cpu  # False lets ComfyUI pick the GPU (the demo with a real model)
        self.proc: subprocess.Popen | None = None
        self.log_path = self.tmp / "server.log"

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self, timeout: float = 180.0) -> ComfyServer:
        nodes = self.tmp / "custom_nodes"
        nodes.mkdir()
        (nodes / PACK_NAME).symlink_to(REPO, target_is_directory=True)
        packs = [PACK_NAME]
        if self.with_testpack:
            (nodes / TESTPACK_NAME).symlink_to(REPO / "tests" / "comfy_testpack", target_is_directory=True)
            packs.append(TESTPACK_NAME)
        for d in ("input", "output", "temp", "user"):
            (self.tmp / d).mkdir()
        extra = self.tmp / "extra_model_paths.yaml"
        extra.write_text(f"sparse_context_tests:\n  custom_nodes: {nodes}\n", encoding="utf-8")
        cmd = [
            sys.executable, "main.py", *(["--cpu"] if self.cpu else []), "--listen", "127.0.0.1", "--port", str(self.port),
            "--extra-model-paths-config", str(extra),
            "--disable-all-custom-nodes", "--whitelist-custom-nodes", *packs,
            "--input-directory", str(self.tmp / "input"), "--output-directory", str(self.tmp / "output"),
            "--temp-directory", str(self.tmp / "temp"), "--user-directory", str(self.tmp / "user"),
            "--database-url", "sqlite:///:memory:", "--disable-api-nodes", *self.extra_args,
        ]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.pop("PYTHONPATH", None)
        self._log = open(self.log_path, "w", encoding="utf-8")  # noqa: SIM115  (closed in stop)
        self.proc = subprocess.Popen(cmd, cwd=self.comfy, stdout=self._log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode} during start:\n{self.log()}")
            try:
                self.get("/system_stats")
                return self
            except OSError:
                time.sleep(0.3)
        self.stop()
        raise RuntimeError(f"ComfyUI did not answer within {timeout}s:\n{self.log()}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if getattr(self, "_log", None):
            self._log.close()

    def __enter__(self) -> ComfyServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def log(self, tail: int = 200) -> str:
        try:
            lines = self.log_path.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            return "<no server log>"
        return "\n".join(lines[-tail:])

    # -- HTTP ----------------------------------------------------------------------------------
    def _request(self, path: str, data: dict | None = None, timeout: float = 30.0):
        body = None if data is None else json.dumps(data).encode()
        req = urllib.request.Request(self.url + path, data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
        return json.loads(raw) if raw else None

    def get(self, path: str, timeout: float = 30.0):
        return self._request(path, timeout=timeout)

    def post(self, path: str, data: dict, timeout: float = 30.0):
        return self._request(path, data, timeout)

    def object_info(self) -> dict:
        return self.get("/object_info", timeout=120)

    def submit(self, prompt: dict) -> str:
        """POST an API-format graph; returns its prompt id, or raises with ComfyUI's validation errors."""
        try:
            answer = self.post("/prompt", {"prompt": prompt, "client_id": uuid.uuid4().hex})
        except urllib.error.HTTPError as err:
            detail = err.read().decode(errors="replace")
            raise PromptFailed(f"/prompt refused the graph ({err.code}): {detail}") from err
        return answer["prompt_id"]

    def queue(self, prompt: dict) -> tuple[str | None, dict | None]:
        """POST an API-format graph (floats as JSON allows them: ``NaN`` / ``Infinity`` literals, which the
        server's parser accepts). Returns ``(prompt_id, None)``, or ``(None, refusal)`` with ComfyUI's 400
        answer (``error`` + ``node_errors``) parsed."""
        try:
            return self.post("/prompt", {"prompt": prompt, "client_id": uuid.uuid4().hex})["prompt_id"], None
        except urllib.error.HTTPError as err:
            if err.code != 400:
                raise
            return None, json.loads(err.read())

    def outcome(self, prompt_id: str, timeout: float = 300.0, poll: float = 0.2) -> dict:
        """Wait for a queued prompt and return its history entry, failed or not."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            entry = (self.get(f"/history/{prompt_id}") or {}).get(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None:
                return entry
            if self.proc.poll() is not None:
                raise PromptFailed(f"ComfyUI died while running the prompt:\n{self.log()}")
            time.sleep(poll)
        raise PromptFailed(f"prompt {prompt_id} did not finish in {timeout}s:\n{self.log(80)}")

    def wait(self, prompt_id: str, timeout: float = 300.0) -> dict:
        """Poll ``/history`` until the prompt finished; returns its history entry."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            history = self.get(f"/history/{prompt_id}")
            entry = history.get(prompt_id) if history else None
            if entry and entry.get("status", {}).get("completed") is not None:
                status = entry["status"]
                if status.get("status_str") != "success":
                    raise PromptFailed(f"prompt failed: {json.dumps(status.get('messages'), indent=1)}\n"
                                       f"--- server log ---\n{self.log(80)}")
                return entry
            if self.proc.poll() is not None:
                raise PromptFailed(f"ComfyUI died while running the prompt:\n{self.log()}")
            time.sleep(0.2)
        raise PromptFailed(f"prompt {prompt_id} did not finish in {timeout}s:\n{self.log(80)}")

    def run(self, prompt: dict, timeout: float = 300.0) -> dict:
        return self.wait(self.submit(prompt), timeout)

    def execution_error(self, prompt: dict, timeout: float = 300.0) -> dict:
        """Run a graph that must fail at execution; returns ComfyUI's execution_error message."""
        pid = self.submit(prompt)
        try:
            self.wait(pid, timeout)
        except PromptFailed:
            entry = self.get(f"/history/{pid}")[pid]
            for kind, msg in entry["status"]["messages"]:
                if kind == "execution_error":
                    return msg
            raise
        raise AssertionError("the graph was expected to fail but succeeded")

    def output_path(self, image: dict) -> Path:
        """Where an image of a history entry lies (``--temp-directory`` gets a ``temp`` folder of its own)."""
        base = self.tmp / "output" if image.get("type") == "output" else self.tmp / "temp" / "temp"
        return base / image.get("subfolder", "") / image["filename"]
