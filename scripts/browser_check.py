"""Open the notebooks in JupyterLab in a real (headless) browser and check the committed outputs render.

What `make browser-check` runs. It starts JupyterLab on 127.0.0.1 (a random port and token, settings and
workspaces in a temporary folder, notebooks shown unwindowed so every output is in the page), then opens
each notebook in headless Chromium, driven over the DevTools protocol (websocket-client), and checks:

* every plotly output (``application/vnd.plotly.v1+json`` in the file) is drawn once the pointer enters it
  (jupyterlab-plotly shows the saved PNG until then): a ``.js-plotly-plot``
  whose ``svg.main-svg`` has a non-zero size and drawn marks (paths, points, heatmap images);
* every circuitsvis view (an HTML output naming circuitsvis) is visible (non-zero size, has content);
* no widget output shows "Error displaying widget", and no progress bar reads as unfinished (e.g. "0/49 [":
  the text JupyterLab falls back to when a notebook was saved without its widget state);
* the browser console logged no error and the page threw no exception.

A screenshot of each notebook (the whole notebook, the window grown to its height) goes to
build/browser-check/<notebook>.png, and the findings to build/browser-check/report.json.

    python scripts/browser_check.py                       # every notebook
    python scripts/browser_check.py notebooks/05_self_repair.ipynb
Exit status 1 if any notebook fails a check. Needs Chromium (BROWSER_PATH or chromium on PATH).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import websocket

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "build" / "browser-check"
PLOTLY = "application/vnd.plotly.v1+json"
WIDGET = "application/vnd.jupyter.widget-view+json"
LAB_SETTINGS = {
    # every cell in the DOM (JupyterLab 4 otherwise renders only the cells in view)
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
    # no news fetch from the internet (an offline machine would log it as an error)
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false", "checkForUpdates": False},
    # never write a notebook back (the server also only sees copies, see JupyterLab)
    "@jupyterlab/docmanager-extension/plugin.jupyterlab-settings": {"autosave": False},
}


def expected_outputs(path: Path) -> dict[str, int]:
    """What the committed file holds: plotly figures, circuitsvis views, widget outputs."""
    notebook = json.loads(path.read_text(encoding="utf-8"))
    counts = {"plotly": 0, "circuitsvis": 0, "widgets": 0}
    for cell in notebook["cells"]:
        for output in cell.get("outputs", []):
            data = output.get("data", {})
            counts["plotly"] += PLOTLY in data
            counts["widgets"] += WIDGET in data
            html = data.get("text/html", "")
            counts["circuitsvis"] += "circuitsvis" in ("".join(html) if isinstance(html, list) else html).lower()
    return counts


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(condition, timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


class JupyterLab:
    """JupyterLab on loopback with throwaway settings (nothing of the user's is read or written).

    It serves *copies* of the notebooks from the scratch folder: opening a notebook in JupyterLab can
    save it back (autosave, the "leave page?" prompt), which would rewrite the committed outputs'
    JSON formatting."""

    def __init__(self, scratch: Path, notebooks: list[Path]):
        self.port, self.token = _free_port(), secrets.token_hex(16)
        self.root = scratch / "served"
        (self.root / "notebooks").mkdir(parents=True)
        for notebook in notebooks:
            shutil.copy2(notebook, self.root / "notebooks" / notebook.name)
        settings = scratch / "lab-settings"
        for name, values in LAB_SETTINGS.items():
            (settings / name).parent.mkdir(parents=True, exist_ok=True)
            (settings / name).write_text(json.dumps(values))
        env = dict(os.environ, JUPYTER_CONFIG_DIR=str(scratch / "config"), JUPYTER_RUNTIME_DIR=str(scratch / "runtime"))
        self.log = (scratch / "jupyterlab.log").open("w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1",
             f"--ServerApp.port={self.port}", f"--IdentityProvider.token={self.token}",
             f"--ServerApp.root_dir={self.root}", f"--LabApp.user_settings_dir={settings}",
             f"--LabApp.workspaces_dir={scratch / 'workspaces'}", "--ServerApp.open_browser=False",
             *(["--allow-root"] if hasattr(os, "geteuid") and os.geteuid() == 0 else [])],
            stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=self.root)
        _wait(self._up, 120, "JupyterLab to start (see its log in the scratch folder)")

    def _up(self) -> bool:
        if self.process.poll() is not None:
            self.log.flush()
            tail = "".join(Path(self.log.name).read_text().splitlines(keepends=True)[-15:])
            raise RuntimeError(f"JupyterLab exited with {self.process.returncode}:\n{tail}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{self.port}/api/status?token={self.token}", timeout=2)
            return True
        except OSError:
            return False

    def url(self, notebook: Path) -> str:
        # A fresh workspace per notebook (?reset): only that notebook is open in the page.
        return (f"http://127.0.0.1:{self.port}/lab/workspaces/check-{notebook.stem}/tree/"
                f"notebooks/{notebook.name}?reset&token={self.token}")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


class Chromium:
    """Headless Chromium and one page, driven over the DevTools protocol."""

    def __init__(self, scratch: Path, width: int = 1400, height: int = 1000):
        binary = os.environ.get("BROWSER_PATH") or shutil.which("chromium") or shutil.which("chromium-browser") \
            or shutil.which("google-chrome")
        if not binary:
            sys.exit("No Chromium found: install one (Debian: apt-get install chromium) or set BROWSER_PATH.")
        profile = scratch / "chromium-profile"
        self.process = subprocess.Popen(
            [binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--no-first-run", "--no-default-browser-check", "--remote-debugging-port=0",
             f"--user-data-dir={profile}", f"--window-size={width},{height}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = profile / "DevToolsActivePort"
        port = _wait(lambda: port_file.exists() and port_file.read_text().split("\n")[0], 60, "Chromium's DevTools port")
        pages = _wait(lambda: [t for t in json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list"))
                               if t["type"] == "page"], 30, "a Chromium page")
        self.ws = websocket.create_connection(pages[0]["webSocketDebuggerUrl"], timeout=60, suppress_origin=True)
        self.next_id, self.events = 0, []
        for domain in ("Page", "Runtime", "Log"):
            self.send(f"{domain}.enable")
        self.width = width

    def send(self, method: str, **params):
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv())
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            self.events.append(message)

    def evaluate(self, expression: str):
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"page script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    def errors(self) -> list[str]:
        """Console errors and uncaught exceptions since the last call."""
        found = []
        for event in self.events:
            method, params = event.get("method"), event.get("params", {})
            if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                found.append("console: " + " ".join(str(a.get("value", a.get("description", ""))) for a in params["args"]))
            elif method == "Runtime.exceptionThrown":
                details = params["exceptionDetails"]
                found.append("exception: " + details.get("exception", {}).get("description", details.get("text", "")))
            elif method == "Log.entryAdded" and params["entry"]["level"] == "error" and not (
                    params["entry"].get("source") == "intervention" and "beforeunload" in params["entry"]["text"]):
                # (not counted: Chromium blocking JupyterLab's "leave page?" prompt when this check navigates
                # on; jupyterlab-plotly updates an output's PNG once it draws it, so the notebook is modified)
                found.append(f"log ({params['entry'].get('source')}): {params['entry']['text']} {params['entry'].get('url', '')}")
        self.events = []
        return found

    def grow(self, height: int) -> int:
        """Make the window ``height`` pixels tall (1000 to 30000), so a whole notebook is in view."""
        height = min(max(int(height), 1000), 30000)
        self.send("Emulation.setDeviceMetricsOverride", width=self.width, height=height, deviceScaleFactor=1, mobile=False)
        time.sleep(2)  # let JupyterLab re-lay-out for the taller window
        return height

    def screenshot(self, path: Path, height: int) -> None:
        self.grow(height)
        data = self.send("Page.captureScreenshot", format="png")["data"]
        path.write_bytes(base64.b64decode(data))

    def stop(self) -> None:
        try:
            self.ws.close()
        finally:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()


HOVER_PLOTS = r"""document.querySelectorAll('.jp-Notebook .jp-RenderedPlotly img.plot-img').forEach(
  img => img.dispatchEvent(new MouseEvent('mouseenter', {bubbles: false})))"""

# What the page shows, measured in the page.
RENDERED = r"""(() => {
  const visible = el => { const r = el.getBoundingClientRect(); return r.width > 0 && r.height > 0; };
  const plots = [...document.querySelectorAll('.jp-Notebook .js-plotly-plot')].map(p => {
    const svg = p.querySelector('svg.main-svg');
    const marks = p.querySelectorAll('.plot path, .plot image, .plot .point, .trace path, .heatmaplayer image').length;
    return {drawn: !!svg && visible(svg) && marks > 0, marks};
  });
  const outputs = [...document.querySelectorAll('.jp-Notebook .jp-OutputArea-output')];
  const cv = outputs.filter(o => o.innerHTML.toLowerCase().includes('circuitsvis') || o.querySelector('[id^="circuits-vis"]'))
                    .map(o => ({visible: visible(o) && o.children.length > 0}));
  const widgetErrors = outputs.filter(o => /Error displaying widget|model not found/i.test(o.textContent)).length;
  const widgets = document.querySelectorAll('.jp-Notebook .widget-hprogress, .jp-Notebook .jupyter-widgets.widget-hbox').length;
  // a progress bar shown as text (no widget state) that stopped short of its total, e.g. "0%| | 0/49 ["
  const unfinished = outputs.map(o => o.textContent.match(/(\d+)\/(\d+) \[/)).filter(m => m && m[1] !== m[2]).map(m => m[0]);
  const notebook = document.querySelector('.jp-Notebook');
  const scroller = document.querySelector('.jp-NotebookPanel .jp-WindowedPanel-outer') || notebook;
  return {cells: document.querySelectorAll('.jp-Notebook .jp-Cell').length, plots, cv, widgetErrors, widgets, unfinished,
          height: scroller ? scroller.scrollHeight : 0};
})()"""


def check_notebook(browser: Chromium, lab: JupyterLab, path: Path, timeout: float) -> dict:
    expected = expected_outputs(path)
    n_cells = len(json.loads(path.read_text(encoding="utf-8"))["cells"])
    browser.errors()
    browser.send("Emulation.clearDeviceMetricsOverride")
    browser.send("Page.navigate", url=lab.url(path))
    problems = []
    try:
        _wait(lambda: browser.evaluate(RENDERED)["cells"] >= n_cells, timeout, f"{path.name}'s {n_cells} cells")
        # The window as tall as the notebook: every output in view, and in the screenshot.
        browser.grow(browser.evaluate(RENDERED)["height"] + 300)
        # jupyterlab-plotly shows an output's saved PNG and draws the figure when the pointer enters it
        # (as a reader's would): send that event to every figure, then wait for the SVGs.
        browser.evaluate(HOVER_PLOTS)
        _wait(lambda: sum(p["drawn"] for p in browser.evaluate(RENDERED)["plots"]) >= expected["plotly"], timeout,
              f"{path.name}: {expected['plotly']} plotly figures drawn")
    except TimeoutError as error:
        problems.append(str(error))
    time.sleep(3)  # late console errors, widget rendering
    rendered = browser.evaluate(RENDERED)
    drawn = sum(p["drawn"] for p in rendered["plots"])
    if drawn != expected["plotly"]:
        problems.append(f"plotly: {drawn} of {expected['plotly']} figures drawn (as a non-empty SVG)")
    visible_cv = sum(v["visible"] for v in rendered["cv"])
    if visible_cv < expected["circuitsvis"]:
        problems.append(f"circuitsvis: {visible_cv} of {expected['circuitsvis']} views visible")
    if rendered["widgetErrors"]:
        problems.append(f"widgets: {rendered['widgetErrors']} of {expected['widgets']} widget outputs show "
                        "'Error displaying widget' (no saved widget state)")
    if rendered["unfinished"]:
        problems.append(f"progress bars: {len(rendered['unfinished'])} read as unfinished ({', '.join(rendered['unfinished'][:5])}): "
                        "the notebook was written without its widget state (re-run it with scripts/reproduce.py)")
    errors = browser.errors()
    problems += errors
    OUT.mkdir(parents=True, exist_ok=True)
    screenshot = OUT / f"{path.stem}.png"
    browser.screenshot(screenshot, rendered["height"] + 300)
    return {"notebook": path.name, "ok": not problems, "problems": problems, "expected": expected,
            "plotly_drawn": drawn, "circuitsvis_visible": visible_cv, "widget_errors": rendered["widgetErrors"],
            "widgets_drawn": rendered["widgets"], "unfinished_bars": rendered["unfinished"],
            "cells": rendered["cells"], "console_errors": len(errors), "screenshot": str(screenshot.relative_to(ROOT))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("notebooks", nargs="*", type=Path)
    parser.add_argument("--timeout", type=float, default=180, help="seconds to wait for one notebook to render")
    args = parser.parse_args()
    notebooks = [p.resolve() for p in args.notebooks] or sorted((ROOT / "notebooks").glob("*.ipynb"))
    results = []
    with tempfile.TemporaryDirectory(prefix="browser-check-") as scratch:
        lab = JupyterLab(Path(scratch), notebooks)
        try:
            browser = Chromium(Path(scratch))
            try:
                for path in notebooks:
                    started = time.monotonic()
                    result = check_notebook(browser, lab, path, args.timeout)
                    result["seconds"] = round(time.monotonic() - started, 1)
                    results.append(result)
                    status = "ok" if result["ok"] else "FAILED"
                    print(f"{status:6} {path.name}: {result['plotly_drawn']}/{result['expected']['plotly']} plotly, "
                          f"{result['circuitsvis_visible']}/{result['expected']['circuitsvis']} circuitsvis, "
                          f"{result['console_errors']} console errors ({result['seconds']} s) -> {result['screenshot']}")
                    for problem in result["problems"]:
                        print(f"       - {problem[:500]}")
            finally:
                browser.stop()
        finally:
            lab.stop()
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "report.json").write_text(json.dumps(results, indent=1) + "\n")
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
