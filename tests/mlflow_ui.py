"""The real MLflow UI in headless Chromium (Playwright driving Debian's /usr/bin/chromium).

``MlflowUI(store_uri)`` starts ``mlflow server`` on 127.0.0.1 over an
experiment's store; :meth:`MlflowUI.rows` types nothing: it opens the runs
page with the README's filter in the URL (what the search box writes), expands
every parent and returns the run names shown, as a reviewer sees them.
"""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any

from tests.tunelab.test_mlflow_server import _free_port

CHROMIUM = Path("/usr/bin/chromium")
#: MLflow 3.x's expand button of a parent run (its run-name cell renderer).
_EXPAND = "button[data-component-id$='runnamecellrenderer.tsx_46']"


def browser_available() -> bool:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return False
    return CHROMIUM.exists()


class MlflowUI:
    """``mlflow server`` over ``store_uri`` and a headless Chromium, for one test."""

    def __init__(self, store_uri: str, artifacts: Path) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1"]
        cmd += ["--port", str(self.port), "--backend-store-uri", store_uri]
        cmd += ["--artifacts-destination", str(artifacts), "--workers", "1"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self._pw: Any = None
        self._browser: Any = None

    def __enter__(self) -> MlflowUI:
        deadline = time.monotonic() + 180  # a loaded machine: poll, never a fixed sleep
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        else:
            self.close()
            raise RuntimeError("mlflow server did not answer /health within 180 s")
        from playwright.sync_api import sync_playwright

        self._pw = sync_playwright().start()
        self._browser = self._pw.chromium.launch(
            executable_path=str(CHROMIUM), args=["--no-sandbox"]
        )
        return self

    def rows(self, experiment_id: str, search: str) -> tuple[str, list[str]]:
        """(the page's heading, every run name shown) for ``search`` with parents expanded."""
        context = self._browser.new_context(viewport={"width": 1600, "height": 1000})
        try:  # a fresh context: no expanded-rows state left from an earlier page
            page = context.new_page()
            query = urllib.parse.quote(search)
            page.goto(f"{self.url}/#/experiments/{experiment_id}/runs?searchFilter={query}")
            page.get_by_text("matching runs").wait_for(timeout=120_000)
            expand = page.locator(_EXPAND)
            if search:
                expand.first.wait_for(timeout=120_000)
            for i in range(expand.count()):
                expand.nth(i).click()
            cells = page.locator("[role=gridcell] a")
            cells.nth(expand.count()).wait_for(timeout=120_000)  # the first child row
            heading = page.locator("h2, h1").first.inner_text()
            return heading, cells.all_inner_texts()
        finally:
            context.close()

    def close(self) -> None:
        if self._browser is not None:
            self._browser.close()
        if self._pw is not None:
            self._pw.stop()
        self.proc.terminate()
        self.proc.wait(timeout=30)

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
