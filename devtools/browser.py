"""Headless Chromium (Debian's ``chromium`` + ``chromium-driver``) driving the real ComfyUI page, for browser tests.

:func:`ensure_chromium` installs the two packages with apt-get when they are missing and we are root (a fresh CI
machine), and otherwise says why it cannot. :class:`ComfyPage` opens the ComfyUI frontend at 1920x1080 and reads the
canvas through the frontend's own objects (``window.app``): templates opened from the template browser, node boxes
as the canvas draws them, widget values, previews, console errors.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

CHROMIUM_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run")
VIEWPORT = (1920, 1080)
BINARIES = (("chromium", "/usr/bin/chromium"), ("chromedriver", "/usr/bin/chromedriver"))


class BrowserUnavailable(Exception):
    """Chromium or its driver is missing and cannot be installed here; the message says why."""


def ensure_chromium() -> tuple[str, str]:
    """Paths of ``chromium`` and ``chromedriver``, installing Debian's packages first if they are missing."""
    found = [shutil.which(name) or (path if os.path.exists(path) else None) for name, path in BINARIES]
    if all(found):
        return found[0], found[1]
    if not shutil.which("apt-get"):
        raise BrowserUnavailable("chromium / chromedriver are missing and this system has no apt-get; install "
                                 "Chromium and its WebDriver to run the browser tests")
    if os.geteuid() != 0:
        raise BrowserUnavailable("chromium / chromedriver are missing; run `sudo apt-get install -y chromium "
                                 "chromium-driver` (the tests install them only when run as root)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "--no-install-recommends", "chromium",
                                         "chromium-driver"]):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
        if done.returncode != 0:
            raise BrowserUnavailable(f"`{' '.join(cmd)}` failed ({done.returncode}): {done.stderr[-1500:]}")
    return ensure_chromium()


# JavaScript helpers, run in the page. ``dm`` reads the canvas as the frontend sees it.
PAGE_HELPERS = """
window.dm = {
  boxes() {
    return app.graph._nodes.map(n => { const b = n.getBounding(); return [n.id, b[0], b[1], b[2], b[3]]; });
  },
  nodes() {
    return app.graph._nodes.map(n => ({id: n.id, type: n.type, title: n.title,
      registered: !!LiteGraph.registered_node_types[n.type], images: (n.imgs || []).length,
      widgets: (n.widgets || []).map(w => ({name: w.name, type: w.type, value: w.value,
        options: w.type === "combo" ? (typeof w.options.values === "function" ? w.options.values() : w.options.values)
                 : null, min: w.options?.min, max: w.options?.max}))}));
  },
  groups() { return app.graph._groups.map(g => ({title: g.title, bounding: [...g._bounding]})); },
  fit() {
    app.canvas.ds.fitToBounds(this.bounds()); app.canvas.setDirty(true, true);
    app.canvas.updateLowQualityThreshold?.();
    return {scale: app.canvas.ds.scale, lowQuality: app.canvas.ds.scale < (app.canvas._lowQualityZoomThreshold ?? 0.6),
            threshold: app.canvas._lowQualityZoomThreshold ?? 0.6};
  },
  bounds() {
    const b = this.boxes();
    const x0 = Math.min(...b.map(v => v[1])), y0 = Math.min(...b.map(v => v[2]));
    const x1 = Math.max(...b.map(v => v[1] + v[3])), y1 = Math.max(...b.map(v => v[2] + v[4]));
    return [x0, y0, x1 - x0, y1 - y0];
  },
  dialogs() {
    return [...document.querySelectorAll(".p-dialog")].map(d => d.innerText.slice(0, 300));
  },
  closeDialogs() { document.querySelectorAll(".p-dialog .p-dialog-close-button, .p-dialog-header-close")
                     .forEach(b => b.click()); },
};
"""


class ComfyPage:
    """One Chromium session on the ComfyUI page at ``url`` (a 1920x1080 viewport); ``close()`` ends it."""

    def __init__(self, url: str, chromium: str, driver: str):
        from selenium import webdriver
        from selenium.webdriver.chrome.options import Options
        from selenium.webdriver.chrome.service import Service

        self.url = url
        self.profile = tempfile.mkdtemp(prefix="dreamoving-chromium-")
        options = Options()
        for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={self.profile}", f"--window-size={VIEWPORT[0]},{VIEWPORT[1]}"):
            options.add_argument(flag)
        options.binary_location = chromium
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        self.driver = webdriver.Chrome(service=Service(driver), options=options)
        self.driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
            "width": VIEWPORT[0], "height": VIEWPORT[1], "deviceScaleFactor": 1, "mobile": False})
        self.console: list[dict] = []
        self.open_page()

    def open_page(self, timeout: float = 120) -> None:
        self.driver.get(self.url)
        self.wait("window.app && window.app.graph && window.app.canvas && window.app.extensionManager", timeout)
        self.js(PAGE_HELPERS)

    def js(self, script: str, *args):
        return self.driver.execute_script(script, *args)

    def wait(self, condition: str, timeout: float = 60, *args) -> None:
        """Until the JavaScript expression ``condition`` is truthy."""
        deadline = time.monotonic() + timeout
        while not self.js(f"try {{ return !!({condition}); }} catch (e) {{ return false; }}", *args):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the page never satisfied: {condition}")
            time.sleep(0.25)

    def read_console(self) -> list[dict]:
        """Browser console entries since the last call (also kept in ``console``)."""
        entries = self.driver.get_log("browser")
        self.console += entries
        return entries

    def open_template(self, module: str, name: str, shows: str | None = None) -> dict:
        """Open workflow ``name`` of custom-node pack ``module`` from the template browser (once its card shows the
        text ``shows``, if given); returns what its card showed (text, thumbnail width, thumbnail source)."""
        self.js("app.extensionManager.command.execute('Comfy.BrowseTemplates')")
        self.wait("document.querySelector('[data-testid=\"template-workflows-content\"]')")
        category = ("[...document.querySelectorAll('.p-dialog [role=button], .p-dialog span')]"
                    ".find(e => e.textContent.trim() === arguments[0])")
        self.wait(category, 30, module)
        self.js(f"const label = {category}; (label.closest('[role=button]') || label).click();", module)
        card_selector = f'[data-testid="template-workflow-{name}"]'
        self.wait("document.querySelector(arguments[0])", 30, card_selector)
        # the browser renders a card's thumbnail only once the card is in view (a user scrolls to it)
        self.js("document.querySelector(arguments[0]).scrollIntoView({block: 'center'})", card_selector)
        self.wait("(() => { const i = document.querySelector(arguments[0] + ' img');"
                  " return i && i.complete; })()", 30, card_selector)
        if shows:
            self.wait("document.querySelector(arguments[0]).innerText.includes(arguments[1])", 30, card_selector,
                      shows)
        card = self.js("""const c = document.querySelector(arguments[0]); const img = c.querySelector('img');
                          return {text: c.innerText, thumbnail: img ? img.naturalWidth : 0,
                                  src: img ? img.getAttribute('src') : null};""", card_selector)
        before = self.js("return app.graph._nodes.length ? app.graph._nodes.map(n => n.id).join() : ''")
        self.js("document.querySelector(arguments[0]).click()", card_selector)
        self.wait("!document.querySelector('[data-testid=\"template-workflows-content\"]')", 30)
        self.wait("app.graph._nodes.length > 0 && app.graph._nodes.map(n => n.id).join() !== arguments[0]", 30,
                  before)
        time.sleep(1.0)  # widgets, images and videos settle
        self.js(PAGE_HELPERS)
        return card

    def state(self) -> dict:
        return {"nodes": self.js("return dm.nodes()"), "boxes": self.js("return dm.boxes()"),
                "groups": self.js("return dm.groups()"), "dialogs": self.js("return dm.dialogs()")}

    def fit(self) -> dict:
        return self.js("return dm.fit()")

    def screenshot(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.driver.save_screenshot(str(path))
        return path

    def set_widgets(self, values: dict[tuple[str, str], object]) -> None:
        """Set ``(node type, widget name) -> value`` on every matching node, as a user would."""
        self.js("""for (const n of app.graph._nodes) for (const w of n.widgets || []) {
                     const key = n.type + '|' + w.name; if (key in arguments[0]) { w.value = arguments[0][key];
                     w.callback?.(w.value); } }""", {f"{t}|{n}": v for (t, n), v in values.items()})

    def queue(self, timeout: float = 600) -> dict:
        """Queue the open graph from the page (the frontend converts it itself) and wait until it ran; returns the
        history entry."""
        self.js("window.dm.done = null; window.dm.failed = null;"
                "api.addEventListener('execution_success', e => { window.dm.done = e.detail.prompt_id; });"
                "api.addEventListener('execution_error', e => { window.dm.failed = e.detail; });"
                .replace("api.", "app.api."))
        self.js("return app.queuePrompt(0, 1)")
        self.wait("window.dm.done || window.dm.failed", timeout)
        failed = self.js("return window.dm.failed")
        if failed:
            raise RuntimeError(f"the page's prompt failed: {json.dumps(failed)[:2000]}")
        time.sleep(1.5)  # previews load
        return {"prompt_id": self.js("return window.dm.done")}

    def close(self) -> None:
        self.driver.quit()
        shutil.rmtree(self.profile, ignore_errors=True)
