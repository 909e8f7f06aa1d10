"""report.html in a real browser (headless Chromium): it renders, shows the checklist and plots, logs no errors.

Chromium is installed with apt-get when it is missing; if that fails the test fails (it never
skips silently). A deliberately broken page checks that console errors would be caught at all.
"""

import os
import re
import subprocess
from pathlib import Path

import pytest

from opd.report.html import write_report
from tests.report.runs import build_models, distill_run

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--enable-logging=stderr", "--v=0"]
PAGE_ERROR = re.compile(r"CONSOLE|Uncaught")


def ensure_chromium() -> str:
    if Path(CHROMIUM).exists():
        return CHROMIUM
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = "apt-get install -y chromium || (apt-get update && apt-get install -y chromium)"
    try:
        done = subprocess.run(["sh", "-c", cmd], env=env, capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.fail(f"could not install chromium: {exc}")
    if done.returncode != 0 or not Path(CHROMIUM).exists():
        pytest.fail(f"could not install chromium (apt-get exit {done.returncode}): {done.stderr[-2000:]}")
    return CHROMIUM


def chromium(page: Path, tmp: Path, *args: str) -> subprocess.CompletedProcess:
    profile = tmp / f"profile-{len(list(tmp.glob('profile-*')))}"
    return subprocess.run([ensure_chromium(), *FLAGS, f"--user-data-dir={profile}", *args, page.resolve().as_uri()],
                          capture_output=True, text=True, timeout=180)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    root = tmp_path_factory.mktemp("browser")
    paths, dirs = build_models(root)
    return write_report(distill_run(root / "run", paths, dirs))


def test_report_renders_in_chromium_without_page_errors(report, tmp_path):
    shot = report.parent / "report.png"  # kept next to the report, to look at
    done = chromium(report, tmp_path, f"--screenshot={shot}", "--window-size=1200,3000")
    assert done.returncode == 0, done.stderr[-2000:]
    assert shot.exists() and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
    assert not PAGE_ERROR.search(done.stderr), done.stderr

    dom = chromium(report, tmp_path, "--dump-dom")
    assert dom.returncode == 0 and not PAGE_ERROR.search(dom.stderr), dom.stderr
    html = dom.stdout
    assert html.count('<span class="badge ') == 6 and "Review checklist" in html
    assert len(re.findall(r'<img [^>]*src="data:image/png;base64,', html)) >= 3
    assert 'id="failures"' in html and 'id="manifest"' in html


def test_a_page_error_would_be_caught(tmp_path):
    bad = tmp_path / "bad.html"
    bad.write_text("<html><body><script>console.error('boom'); notDefined();</script></body></html>")
    done = chromium(bad, tmp_path, "--dump-dom")
    assert PAGE_ERROR.search(done.stderr) and "Uncaught ReferenceError" in done.stderr
