"""A small client for ComfyUI's HTTP API: /prompt, /history, /ws, /interrupt, /object_info."""
from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable


class PromptRejected(Exception):
    """ComfyUI refused the graph at validation (HTTP 400)."""

    def __init__(self, body: dict):
        self.body = body
        self.error = body.get("error", {})
        self.node_errors: dict = body.get("node_errors", {})
        super().__init__(json.dumps(body)[:2000])


class ExecutionFailed(Exception):
    """A queued prompt failed while running; ``message`` is ComfyUI's exception message."""

    def __init__(self, data: dict):
        self.data = data
        self.message: str = data.get("exception_message", "")
        self.node_type: str = data.get("node_type", "")
        self.node_id = data.get("node_id")
        super().__init__(f"{self.node_type} (node {self.node_id}): {self.message}")


@dataclass
class RunResult:
    prompt_id: str
    outputs: dict
    events: list[dict] = field(default_factory=list)
    output_dir: Path | None = None

    def files(self, node_id: str, kind: str | None = None) -> list[Path]:
        """Paths of the files a node saved (``images``, ``gifs``, ``videos``...), in order."""
        found = []
        for key, items in self.outputs.get(str(node_id), {}).items():
            if kind is not None and key != kind:
                continue
            for item in items if isinstance(items, list) else []:
                if isinstance(item, dict) and "filename" in item and self.output_dir is not None:
                    found.append(self.output_dir / item.get("subfolder", "") / item["filename"])
        return found

    def progress(self) -> list[dict]:
        return [e["data"] for e in self.events if e.get("type") == "progress"]


class ComfyClient:
    """Talks to one ComfyUI server; a websocket thread records every event for this client's prompts."""

    def __init__(self, base_url: str, output_dir: Path | None = None):
        self.base_url = base_url.rstrip("/")
        self.output_dir = output_dir
        self.client_id = uuid.uuid4().hex
        self._events: list[dict] = []
        self._cond = threading.Condition()
        self._ws = None
        self._thread: threading.Thread | None = None
        self.on_event: Callable[[dict], None] | None = None

    # -- plain HTTP ---------------------------------------------------------------------------------------------
    def _request(self, method: str, path: str, body: Any = None, timeout: float = 60) -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base_url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                raw = resp.read()
                status = resp.status
        except urllib.error.HTTPError as err:
            raw, status = err.read(), err.code
        try:
            return status, json.loads(raw) if raw else None
        except json.JSONDecodeError:
            return status, raw.decode(errors="replace")

    def object_info(self, node_id: str | None = None) -> dict:
        status, body = self._request("GET", "/object_info" + (f"/{node_id}" if node_id else ""))
        if status != 200:
            raise RuntimeError(f"/object_info answered {status}: {body}")
        return body

    def post_prompt(self, graph: dict) -> tuple[int, dict]:
        return self._request("POST", "/prompt", {"prompt": graph, "client_id": self.client_id})

    def queue(self, graph: dict) -> str:
        self.connect()
        status, body = self.post_prompt(graph)
        if status != 200:
            raise PromptRejected(body if isinstance(body, dict) else {"error": {"message": str(body)}})
        return body["prompt_id"]

    def history(self, prompt_id: str) -> dict | None:
        status, body = self._request("GET", f"/history/{prompt_id}")
        return body.get(prompt_id) if status == 200 and body else None

    def interrupt(self) -> None:
        self._request("POST", "/interrupt", {})

    # -- websocket ----------------------------------------------------------------------------------------------
    def connect(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        import websocket

        url = self.base_url.replace("http", "ws", 1) + f"/ws?clientId={self.client_id}"
        self._ws = websocket.create_connection(url, timeout=30)
        self._ws.settimeout(None)
        self._thread = threading.Thread(target=self._listen, daemon=True)
        self._thread.start()

    def _listen(self) -> None:
        try:
            while True:
                msg = self._ws.recv()
                if not isinstance(msg, str):
                    continue  # binary preview frames
                event = json.loads(msg)
                if self.on_event is not None:
                    self.on_event(event)
                with self._cond:
                    self._events.append(event)
                    self._cond.notify_all()
        except Exception:  # socket closed
            with self._cond:
                self._cond.notify_all()

    def close(self) -> None:
        if self._ws is not None:
            try:
                self._ws.close()
            except Exception:
                pass

    def events_for(self, prompt_id: str) -> list[dict]:
        with self._cond:
            return [e for e in self._events if e.get("data", {}).get("prompt_id") == prompt_id
                    or (e.get("type") == "progress" and e.get("data", {}).get("prompt_id") in (None, prompt_id))]

    def wait(self, prompt_id: str, timeout: float = 300) -> RunResult:
        """Block until the prompt finished; raise ExecutionFailed on an execution error."""
        deadline = time.monotonic() + timeout
        while True:
            for event in self.events_for(prompt_id):
                if event.get("type") == "execution_error":
                    raise ExecutionFailed(event["data"])
                if event.get("type") == "execution_interrupted":
                    raise ExecutionFailed({"exception_message": "interrupted", **event["data"]})
            entry = self.history(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None:
                status = entry["status"]
                if status.get("status_str") == "error":
                    for name, data in status.get("messages", []):
                        if name in ("execution_error", "execution_interrupted"):
                            raise ExecutionFailed(data)
                    raise ExecutionFailed({"exception_message": json.dumps(status)})
                return RunResult(prompt_id, entry.get("outputs", {}), self.events_for(prompt_id), self.output_dir)
            if time.monotonic() > deadline:
                raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout}s")
            with self._cond:
                self._cond.wait(0.2)

    def run(self, graph: dict, timeout: float = 300) -> RunResult:
        return self.wait(self.queue(graph), timeout)
