"""Headless Chromium driven over the DevTools protocol (``websockets``; no selenium needed).

Used by the dashboard's browser test, the README screenshots (analyses/dashboard_screenshots.py),
the report's PDF export and geometry test (:meth:`Browser.open`, :meth:`Browser.plots_ready`,
:meth:`Browser.print_pdf`) and anything else that must see a page as a browser renders it.
``find_chromium()`` is None when no Chromium is installed (``make test`` installs Debian's ``chromium`` when it can).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path


def find_chromium() -> str | None:
    """The first Chromium (or Chrome) on PATH, or None."""
    return next((p for p in (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")) if p), None)


class Browser:
    """Headless Chromium driven over the DevTools protocol (``websockets``; no selenium needed)."""

    def __init__(self, profile: Path):
        import subprocess

        from websockets.sync.client import connect

        self.proc = subprocess.Popen([find_chromium() or "chromium", "--headless", "--no-sandbox", "--disable-gpu",
                                      "--disable-dev-shm-usage", f"--user-data-dir={profile}",
                                      "--remote-debugging-port=0", "about:blank"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            for line in self.proc.stderr:
                if "DevTools listening on " in line:
                    ws = line.split("DevTools listening on ", 1)[1].strip()
                    break
            else:
                raise RuntimeError("chromium did not start")
            self._conn = connect(ws, max_size=None, open_timeout=30)
            self.ws = self._conn.__enter__()
        except BaseException:
            self.proc.kill()
            self.proc.wait(timeout=30)
            raise
        self.n = 0

    def call(self, method: str, session: str | None = None, **params):
        self.n += 1
        msg = {"id": self.n, "method": method, "params": params, **({"sessionId": session} if session else {})}
        self.ws.send(json.dumps(msg))
        while True:
            r = json.loads(self.ws.recv(timeout=60))
            if r.get("id") == self.n:
                if "error" in r:
                    raise RuntimeError(r["error"])
                return r["result"]

    def screenshot(self, path: Path, width: int = 1400, height: int = 1000, full_page: bool = False) -> None:
        """Save a PNG of the page opened last (``full_page``: the whole document height, at most 16000 px)."""
        import base64
        import time

        path.parent.mkdir(parents=True, exist_ok=True)
        time.sleep(1.5)  # plotly draws after the script has finished
        self.set_size(width, height)
        if full_page:
            full = int(self.js("document.documentElement.scrollHeight") or height)
            self.set_size(width, min(max(full, height), 16000))
            time.sleep(0.5)
        data = self.call("Page.captureScreenshot", self.session, format="png")["data"]
        path.write_bytes(base64.b64decode(data))

    def set_size(self, width: int, height: int = 1000) -> None:
        """Emulate a browser window of ``width`` x ``height`` CSS pixels for the page opened last."""
        self.call("Emulation.setDeviceMetricsOverride", self.session, width=width, height=height,
                  deviceScaleFactor=1, mobile=False)

    def open(self, url: str, width: int = 1400, height: int = 1000, timeout: float = 90) -> None:
        """Open ``url`` (a static page, e.g. ``file:///.../report.html``) in a ``width`` x ``height`` window and
        wait until it has loaded."""
        import time

        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.set_size(width, height)
        self.call("Page.navigate", self.session, url=url)
        end = time.time() + timeout
        while self.js("document.readyState") != "complete" or self.js("location.href") == "about:blank":
            if time.time() > end:
                raise AssertionError(f"{url} did not load in {timeout:g} s")
            time.sleep(0.2)

    def plots_ready(self, timeout: float = 90, resize: bool = True) -> int:
        """Wait until every plotly figure of the page is drawn, resize them all to their containers (``resize``:
        after a window-size change or a print layout) and return how many there are."""
        drawn = ("(() => { const g = [...document.querySelectorAll('.plotly-graph-div')];"
                 " return g.every(d => d._fullLayout && d.querySelector('.main-svg')) ? g.length : 0; })()")
        n = self.js_when(drawn, timeout)
        if not resize:
            return int(n or 0)
        self.call("Runtime.evaluate", self.session, awaitPromise=True, returnByValue=True, expression=(
            "Promise.all([...document.querySelectorAll('.js-plotly-plot')].map(g => Plotly.Plots.resize(g)))"
            ".then(() => true)"))
        return int(n or 0)

    def print_pdf(self, path: Path, scale: float = 1.0, landscape: bool = False) -> None:
        """Print the page opened last to ``path`` (A4, backgrounds, CSS page breaks) with Page.printToPDF."""
        import base64

        data = self.call("Page.printToPDF", self.session, printBackground=True, preferCSSPageSize=True,
                         scale=scale, landscape=landscape, paperWidth=8.27, paperHeight=11.69)["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))

    def page_when(self, url: str, text: str, timeout: float = 90) -> tuple[str, str]:
        """Open ``url``; wait until its visible text contains ``text``; return (innerText, innerHTML)."""
        target = self.call("Target.createTarget", url=url)["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        return self.wait_for(text, timeout)

    def js(self, expression: str):
        """The value of a JavaScript expression on the page opened last."""
        return self.call("Runtime.evaluate", self.session, returnByValue=True, expression=expression)["result"].get(
            "value")

    def wait_for(self, text: str, timeout: float = 90) -> tuple[str, str]:
        """Wait until the page's visible text contains ``text`` and its script has finished; (innerText, innerHTML)."""
        import time

        end, body = time.time() + timeout, ("", "", "")
        js = ("(() => { const app = document.querySelector('[data-testid=stApp]'); const b = document.body;"
              " return [b ? b.innerText : '', b ? b.innerHTML : '', app ? app.dataset.testScriptState : '']; })()")
        while time.time() < end:
            body = tuple(self.js(js) or ("", "", ""))
            if text in body[0] and body[2] == "notRunning":  # the page script has finished
                return body[0], body[1]
            time.sleep(0.5)
        raise AssertionError(f"{text!r} never appeared (script {body[2]}): {body[0][-1500:]}")

    def js_when(self, expression: str, timeout: float = 90):
        """The first truthy value of a JavaScript expression, polled (widgets load lazily, a skeleton first)."""
        import time

        end = time.time() + timeout
        while not (value := self.js(expression)) and time.time() < end:
            time.sleep(0.5)
        return value

    def type_into(self, selector: str, text: str, timeout: float = 90) -> None:
        """Focus the first element matching ``selector`` (waiting for it: widgets load lazily, a skeleton first),
        select its content and type ``text`` over it."""

        found = self.js_when(f"(() => {{ const e = document.querySelector({json.dumps(selector)}); if (!e) return "
                             "false; e.focus(); e.select(); return true; })()", timeout)
        assert found, f"no {selector} on the page"
        self.call("Input.insertText", self.session, text=text)

    def click_button(self, label: str) -> None:
        """Click the first button whose visible text contains ``label``."""
        clicked = self.js("(() => { const b = [...document.querySelectorAll('button')].find(b => "
                          f"b.innerText.includes({json.dumps(label)})); if (!b) return false; b.click(); "
                          "return true; })()")
        assert clicked, f"no button {label!r} on the page"

    def close(self) -> None:
        try:
            self._conn.__exit__(None, None, None)
        finally:
            self.proc.terminate()
            self.proc.wait(timeout=30)
