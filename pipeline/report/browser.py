"""The headless-browser check (`clipcurate render-check`): open report.html in Chromium as a reader would, count
images that failed to load, and screenshot the page."""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def find_browser() -> str | None:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    return None


_PROBE = """<script>
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var broken = imgs.filter(function (i) { return !(i.complete && i.naturalWidth > 0); })
                   .map(function (i) { return i.getAttribute('src').slice(0, 80); });
  var figs = imgs.filter(function (i) { return i.className === 'fig'; });
  var out = document.createElement('pre');
  out.id = 'clipcurate-probe';
  out.textContent = JSON.stringify({images: imgs.length, figures: figs.length,
    figures_loaded: figs.filter(function (i) { return i.naturalWidth > 0; }).length, broken: broken});
  document.body.appendChild(out);
});
</script>"""


def render_check(html_path: str, png_path: str | None = None, browser: str | None = None, timeout: int = 120) -> dict:
    """Open the report in headless Chromium as a reader would (file://, no server): count images that
    failed to load, and optionally screenshot the page to `png_path`. The probe runs on a copy of the
    page next to it (same relative links), so the report itself is never modified."""
    browser = browser or find_browser()
    if not browser:
        raise FileNotFoundError("no Chromium found: install it with 'sudo apt-get install -y chromium'")
    src = Path(html_path).resolve()
    page = src.read_text(encoding="utf-8")
    probe = src.with_name(f".probe-{os.getpid()}.html")
    probe.write_text(page.replace("</body>", _PROBE + "</body>"), encoding="utf-8")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files",
             "--hide-scrollbars", "--virtual-time-budget=10000"]
    try:
        with tempfile.TemporaryDirectory(prefix="clipcurate-chromium-") as profile:
            flags.append(f"--user-data-dir={profile}")
            dom = subprocess.run([browser, *flags, "--dump-dom", probe.as_uri()], capture_output=True, text=True,
                                 timeout=timeout, check=False)
            m = re.search(r'<pre id="clipcurate-probe">(.*?)</pre>', dom.stdout, re.S)
            if not m:
                raise RuntimeError(f"{browser} rendered no probe result (exit {dom.returncode}): "
                                   f"{dom.stderr.strip().splitlines()[-1:] or ''}")
            result = json.loads(html.unescape(m.group(1)))
            if png_path:
                png = Path(png_path).resolve()
                png.parent.mkdir(parents=True, exist_ok=True)
                subprocess.run([browser, *flags, "--window-size=1280,3000", f"--screenshot={png}", src.as_uri()],
                               capture_output=True, text=True, timeout=timeout, check=False)
                result["png"] = str(png) if png.exists() and png.stat().st_size > 0 else None
    finally:
        probe.unlink(missing_ok=True)
    result["browser"] = browser
    return result
