"""The real ComfyUI frontend in headless Chromium (Debian's ``chromium`` + ``chromedriver``), via Selenium.

Selenium Manager never runs: the driver is ``/usr/bin/chromedriver`` (or ``$CHROMEDRIVER``), so nothing
is downloaded. Install with ``apt-get install -y chromium chromium-driver`` (``scripts/test.sh`` does).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

CHROMIUM_ARGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
    "--disable-component-update", "--disable-sync", "--window-size=1600,1000",
)

# The frontend's dialogs: PrimeVue ``.p-dialog`` (frontend 1.3x) or Reka ``[role=dialog]`` (1.4x), matched by
# their text. Only visible ones count.
_DIALOG_ELEMENTS_JS = """
const dialogElements = () => Array.from(new Set(document.querySelectorAll('.p-dialog, [role="dialog"]')))
  .filter(e => e.offsetParent !== null || e.getClientRects().length > 0);
"""
_DIALOGS_JS = _DIALOG_ELEMENTS_JS + "return dialogElements().map(e => (e.innerText || '').trim());"

# Node types in the loaded graph and in every subgraph definition that the frontend does not know: no
# registered LiteGraph class, or the placeholder node LiteGraph puts in for one (it keeps the saved node in
# ``last_serialization``). ``has_errors`` is no evidence: frontends since 1.4x also set it on nodes whose model
# or image file is missing.
_UNKNOWN_TYPES_JS = """
const graphs = [window.app.graph];
const subs = window.app.graph.subgraphs;
if (subs && typeof subs.values === 'function') graphs.push(...subs.values());
const unknown = [];
let count = 0;
for (const g of graphs) {
  for (const n of (g._nodes || g.nodes || [])) {
    count += 1;
    const saved = n.last_serialization;
    if (saved || !(n.type in LiteGraph.registered_node_types)) unknown.push((saved && saved.type) || n.type);
  }
}
return {count: count, unknown: unknown};
"""


def chromium_paths() -> tuple[str, str] | None:
    """(chromium binary, chromedriver) if both are installed, else None."""
    binary = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    driver = os.environ.get("CHROMEDRIVER") or shutil.which("chromedriver") or "/usr/bin/chromedriver"
    if binary and Path(driver).is_file():
        return binary, driver
    return None


def start_chromium(profile_dir: Path | None = None):
    """A headless Chromium WebDriver with a throw-away profile. Caller quits it."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    paths = chromium_paths()
    if paths is None:
        raise RuntimeError("chromium/chromedriver not installed: apt-get install -y chromium chromium-driver")
    binary, driver = paths
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in CHROMIUM_ARGS:
        options.add_argument(arg)
    options.add_argument(f"--user-data-dir={profile_dir or tempfile.mkdtemp(prefix='sc-chromium-')}")
    return webdriver.Chrome(service=Service(driver), options=options)


class ComfyPage:
    """The ComfyUI frontend of one server, driven through its own ``window.app``."""

    def __init__(self, driver, url: str):
        self.driver = driver
        self.url = url.rstrip("/")

    def js(self, script: str, *args):
        return self.driver.execute_script(script, *args)

    def _wait(self, predicate, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            time.sleep(0.25)
        raise TimeoutError(f"timed out after {timeout}s waiting for {what}")

    # -- page ---------------------------------------------------------------------------------
    def open(self, timeout: float = 90.0) -> ComfyPage:
        """Load the UI, wait until the app and its node definitions are there, dismiss first-run UI."""
        self.driver.get(self.url + "/")
        self._wait(lambda: self.js("return !!(window.app && window.app.graph && window.LiteGraph "
                                   "&& Object.keys(LiteGraph.registered_node_types).length > 50)"),
                   timeout, "the ComfyUI frontend to start")
        self.dismiss_first_run()
        self._screenshot_settings()
        return self

    def _screenshot_settings(self) -> None:
        """Hide the minimap and draw node text at any zoom (low-quality mode off) (these are per-user UI settings)."""
        self.js("""
            const s = window.app.extensionManager && window.app.extensionManager.setting;
            if (!s) return;
            s.set('Comfy.Minimap.Visible', false);
            s.set('LiteGraph.Canvas.MinFontSizeForLOD', 1);
        """)

    def dismiss_first_run(self, settle: float = 6.0) -> None:
        """Close the Templates dialog (opened once on a fresh user) and the "Nodes 2.0" banner.

        The dialog opens a moment after the app is ready, so watch for ``settle`` seconds."""
        deadline = time.monotonic() + settle
        while time.monotonic() < deadline:
            closed_dialog = self.close_dialogs(("Templates",))
            closed_banner = self._close_banner()
            if closed_dialog and (closed_banner or not self._banner_present()):
                break
            time.sleep(0.3)
        self._wait(lambda: not [t for t in self.dialogs() if t.startswith("Templates")], 10, "the Templates dialog to close")

    def _banner_present(self) -> bool:
        return bool(self.js("return Array.from(document.querySelectorAll('span'))"
                            ".some(s => (s.innerText||'').startsWith('Introducing Nodes 2.0'))"))

    def _close_banner(self) -> bool:
        """Click the banner's close button (the last button in the banner's row); True if done."""
        return bool(self.js("""
            const span = Array.from(document.querySelectorAll('span'))
              .find(s => (s.innerText||'').startsWith('Introducing Nodes 2.0'));
            if (!span) return false;
            let row = span.parentElement;
            while (row && row.querySelectorAll('button').length < 2) row = row.parentElement;
            if (!row) return false;
            const buttons = row.querySelectorAll('button');
            buttons[buttons.length - 1].click();
            return true;
        """))

    def dialogs(self) -> list[str]:
        """Texts of the open frontend dialogs."""
        return list(self.js(_DIALOGS_JS))

    def close_dialogs(self, prefixes: tuple[str, ...] | None = None) -> bool:
        """Close open dialogs (those whose text starts with one of ``prefixes``, or all) with their own
        close button, and the error overlay of frontends 1.4x; True if any was closed."""
        closed = self.js(_DIALOG_ELEMENTS_JS + """
            const prefixes = arguments[0];
            let n = 0;
            for (const d of dialogElements()) {
              const text = (d.innerText || '').trim();
              if (prefixes !== null && !prefixes.some(p => text.startsWith(p))) continue;
              // a labelled close button (PrimeVue "Close", Reka "Close dialog"), PrimeVue's header close, or the
              // frontend's icon button (pi-times / lucide x)
              let btn = d.querySelector('button[aria-label="Close"], button[aria-label="Close dialog"], '
                                        + '.p-dialog-close-button, .p-dialog-header-close');
              if (!btn) {
                const icon = d.querySelector('button .pi-times, button [class*="lucide--x"]');
                btn = icon && icon.closest('button');
              }
              if (btn) { btn.click(); n += 1; }
            }
            const overlay = prefixes === null && document.querySelector('[data-testid="error-overlay-dismiss"]');
            if (overlay) { overlay.click(); n += 1; }
            return n;
        """, None if prefixes is None else list(prefixes))
        time.sleep(0.3)
        return bool(closed)

    # -- workflows ------------------------------------------------------------------------------
    def load_workflow(self, workflow: dict, name: str = "workflow", settle: float = 2.0) -> None:
        """Load a workflow as the UI does when a file is opened (UI format, or API format)."""
        script = """
            const [wf, name, done] = [arguments[0], arguments[1], arguments[arguments.length - 1]];
            const load = (wf.nodes !== undefined || wf.definitions !== undefined)
              ? window.app.loadGraphData(wf, true, true, name)
              : window.app.loadApiJson(wf, name);
            Promise.resolve(load).then(() => done(null), e => done(String(e && e.stack || e)));
        """
        self.driver.set_script_timeout(60)
        error = self.driver.execute_async_script(script, workflow, name)
        if error:
            raise RuntimeError(f"the frontend failed to load {name}: {error}")
        time.sleep(settle)  # dialogs render after the load promise resolves

    def load_template(self, pack: str, name: str, settle: float = 2.0) -> dict:
        """Fetch a pack's example workflow from the server's template route (as the template browser
        does) and load it; returns the workflow."""
        workflow = self.fetch_json(f"/api/workflow_templates/{pack}/{name}.json")
        self.load_workflow(workflow, name, settle)
        return workflow

    def missing_nodes_report(self) -> str | None:
        """What the frontend reports about missing node types after a load, or None.

        Frontends up to 1.3x open a dialog ("missing nodes"). From 1.4x on, a load that finds problems
        (missing nodes, model files or images) shows an error overlay whose "View details" opens the Errors
        tab of the right side panel; missing node types are its "Missing Node Packs" group. The panel is
        closed again afterwards (a per-user UI setting)."""
        for text in self.dialogs():
            if "missing nodes" in text.lower() or "missing node types" in text.lower():
                return text
        if not self.js("const b = document.querySelector('[data-testid=\"error-overlay-see-errors\"]');"
                       "if (b) b.click(); return !!b;"):
            return None  # no overlay: the load found no problem at all
        self._wait(lambda: self.js("return !!document.querySelector('[data-testid=\"errors-summary-hero\"]')"),
                   10, "the Errors tab of the right side panel")
        text = self.js("const g = document.querySelector('[data-testid=\"error-group-missing-node\"]');"
                       "return g ? g.innerText.trim() : null;")
        self.js("window.app.extensionManager.setting.set('Comfy.RightSidePanel.IsOpen', false)")
        time.sleep(0.3)
        return text

    def graph_node_types(self) -> dict:
        """``{"count": nodes in the graph, "unknown": types without a registered node class}``."""
        return dict(self.js(_UNKNOWN_TYPES_JS))

    def _await(self, expression: str, what: str, *args):
        """The value of a JavaScript promise ``expression`` (it may use ``arguments``), or raise with its error."""
        self.driver.set_script_timeout(60)
        answer = self.driver.execute_async_script(f"""
            const done = arguments[arguments.length - 1];
            Promise.resolve().then(() => {expression})
              .then(v => done({{ok: v === undefined ? null : v}}), e => done({{error: String(e && e.stack || e)}}));
        """, *args)
        if "error" in answer:
            raise RuntimeError(f"{what} failed: {answer['error']}")
        return answer["ok"]

    def fetch_json(self, path: str):
        """GET ``path`` from the server inside the page (as the frontend fetches templates)."""
        return self._await("fetch(arguments[0]).then(r => r.ok ? r.json() : Promise.reject('HTTP ' + r.status))",
                           f"GET {path}", path)

    def queued_prompt(self) -> dict:
        """The API prompt the frontend would queue for the loaded graph (``app.graphToPrompt().output``)."""
        return self._await("window.app.graphToPrompt().then(p => p.output)", "app.graphToPrompt()")

    def fit_view(self) -> None:
        """Zoom the canvas so that the whole graph is in view."""
        self.js("""
            const cmd = window.app.extensionManager && window.app.extensionManager.command;
            if (cmd && cmd.execute) { return cmd.execute('Comfy.Canvas.FitView'); }
            window.app.canvas.ds.reset();
        """)
        time.sleep(0.5)
        self.js("window.app.canvas.setDirty(true, true); window.app.canvas.draw(true, true);")
        time.sleep(0.3)

    def screenshot(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        if not self.driver.save_screenshot(str(path)):
            raise RuntimeError(f"could not save a screenshot to {path}")
        return path


def read_workflow(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))
