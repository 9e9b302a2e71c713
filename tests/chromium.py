"""Headless Chromium (Debian's ``chromium``) driven over its DevTools protocol, for tests of pages.

It records what a page does (console messages, exceptions, network requests), evaluates
JavaScript in it and takes screenshots; the browser is stopped, with every process under it, by
PID when the block ends.
"""

from __future__ import annotations

import base64
import contextlib
import json
import queue
import re
import shutil
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

from odl_fed.deploy.processes import stop_tree

__all__ = ["Chromium", "chromium_or_reason"]


def chromium_or_reason() -> tuple[str | None, str]:
    """The browser's path, or None and why there is none (a test prints it when it skips)."""
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path, ""
    return None, ("no chromium here; `make setup` installs Debian's chromium where apt-get and root are at hand "
                  "(apt-get install chromium)")


class Chromium:
    def __init__(self, profile_dir: Path, *, width: int = 1100, height: int = 1000):
        executable, reason = chromium_or_reason()
        if executable is None:
            raise RuntimeError(reason)
        self.process = subprocess.Popen(
            [executable, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
             "--disable-extensions", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", "--disable-default-apps", "--remote-debugging-port=0",
             f"--user-data-dir={profile_dir}", f"--window-size={width},{height}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.width, self.height = width, height
        self.events: list[dict] = []
        self._id = 0
        self._socket = None
        self._closing = contextlib.ExitStack()
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: [lines.put(line) for line in self.process.stderr], daemon=True).start()
        deadline = time.monotonic() + 60
        port = None
        while port is None and time.monotonic() < deadline:
            try:
                match = re.search(r"DevTools listening on ws://[^:]+:(\d+)/", lines.get(timeout=1))
                port = int(match.group(1)) if match else None
            except queue.Empty:
                if self.process.poll() is not None:
                    break
        if port is None:
            self.close()
            raise RuntimeError("chromium did not open its DevTools port within 60 s")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as answer:
            page = next(t for t in json.load(answer) if t["type"] == "page")
        from websockets.sync.client import connect

        self._socket = self._closing.enter_context(connect(page["webSocketDebuggerUrl"], max_size=None,
                                                            open_timeout=30))
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.call(f"{domain}.enable")
        self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)

    def call(self, method: str, timeout: float = 60, **params) -> dict:
        self._id += 1
        self._socket.send(json.dumps({"id": self._id, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while True:
            message = json.loads(self._socket.recv(timeout=max(deadline - time.monotonic(), 0.1)))
            if message.get("id") == self._id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            self.events.append(message)

    def open(self, url: str, timeout: float = 60) -> None:
        """Navigate and wait for the load event."""
        self.events.clear()
        self.call("Page.navigate", url=url)
        deadline = time.monotonic() + timeout
        while not any(e.get("method") == "Page.loadEventFired" for e in self.events):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} did not load within {timeout} s")
            try:
                self.events.append(json.loads(self._socket.recv(timeout=1)))
            except TimeoutError:
                continue

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    def errors(self) -> list[str]:
        """Console errors and uncaught exceptions seen since the page was opened."""
        found = []
        for event in self.events:
            method, params = event.get("method"), event.get("params", {})
            if method == "Runtime.exceptionThrown":
                found.append(str(params.get("exceptionDetails", {}).get("text")))
            elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                found.append(" ".join(str(a.get("value")) for a in params.get("args", [])))
            elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
                found.append(str(params["entry"].get("text")))
        return found

    def requests(self) -> list[str]:
        """The URLs the page requested since it was opened (its own document included)."""
        return [e["params"]["request"]["url"] for e in self.events if e.get("method") == "Network.requestWillBeSent"]

    def screenshot(self, path: Path, *, full_page: bool = False) -> Path:
        params = {"format": "png"}
        if full_page:
            height = int(self.evaluate("document.documentElement.scrollHeight"))
            params["clip"] = {"x": 0, "y": 0, "width": self.width, "height": height, "scale": 1}
            params["captureBeyondViewport"] = True
        data = self.call("Page.captureScreenshot", **params)["data"]
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> list[int]:
        try:
            self._closing.close()
        except Exception:  # the browser may already have dropped the connection
            pass
        return stop_tree(self.process.pid)

    def __enter__(self) -> Chromium:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
