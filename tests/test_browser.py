"""End to end in a real browser: JupyterLab on 127.0.0.1, headless Debian chromium driven by playwright, runs
nbs/inspect_losses.ipynb, moves the smoothing slider and checks that the plot image changes.

Needs Debian's chromium at /usr/bin/chromium (`apt-get install -y chromium`) and the playwright python package
(in kd_lib's dev extras). No `playwright install`: the system chromium is driven through `executable_path`.
Skipped when either is missing, unless KD_REQUIRE_BROWSER=1 (CI), which makes that a failure.
The screenshot is saved in the pytest tmp dir and copied to runs/browser_test/inspect_losses.png.
"""
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path('/usr/bin/chromium')
CHROMIUM_ARGS = ['--headless=new', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
                 '--disable-background-networking', '--disable-component-update', '--disable-sync']
HOW_TO_ENABLE = 'to run it: `apt-get install -y chromium` and `pip install playwright` (in .[dev]); never `playwright install`'


def _requirements() -> str | None:
    "Why the test cannot run here, or None."
    if not CHROMIUM.exists(): return f'{CHROMIUM} is missing; {HOW_TO_ENABLE}'
    try: import playwright.sync_api  # noqa: F401
    except ImportError: return f'playwright is not installed; {HOW_TO_ENABLE}'
    if shutil.which('jupyter-lab', path=str(Path(sys.executable).parent)) is None: return 'jupyterlab is not installed in this venv (pip install -e ".[dev]")'
    return None


SKIP_REASON = _requirements()
REQUIRED = os.environ.get('KD_REQUIRE_BROWSER') == '1'  # CI sets it: a missing browser is then a failure, not a skip
pytestmark = pytest.mark.skipif(SKIP_REASON is not None and not REQUIRED, reason=f'browser test skipped: {SKIP_REASON}')


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _wait_for_server(url: str, proc: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None: raise RuntimeError(f'jupyter lab exited with {proc.returncode}:\n{log.read_text()[-3000:]}')
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200: return
        except OSError: time.sleep(0.3)
    raise TimeoutError(f'jupyter lab did not answer {url} in {timeout} s:\n{log.read_text()[-3000:]}')


def _stop_server(proc: subprocess.Popen, base: str, token: str) -> None:
    "Shut down the server's kernels through its API, then stop the server by its pid."
    import json
    try:
        with urllib.request.urlopen(f'{base}/api/kernels?token={token}', timeout=5) as r: kernels = json.load(r)
        for k in kernels:
            urllib.request.urlopen(urllib.request.Request(f"{base}/api/kernels/{k['id']}?token={token}", method='DELETE'), timeout=10)
    except OSError: pass
    proc.terminate()  # SIGTERM to this pid only
    try: proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=5)


@pytest.fixture
def jupyter_lab(tmp_path):
    "JupyterLab on 127.0.0.1 with a random token, serving a copy of inspect_losses.ipynb (so the repo is never saved into)."
    work = tmp_path/'lab'
    work.mkdir()
    shutil.copy(ROOT/'nbs'/'inspect_losses.ipynb', work)
    port, token = _free_port(), secrets.token_hex(16)
    env = {**os.environ, 'JUPYTER_CONFIG_DIR': str(tmp_path/'jupyter_config'), 'JUPYTER_RUNTIME_DIR': str(tmp_path/'jupyter_runtime'),
           'IPYTHONDIR': str(tmp_path/'ipython')}
    env.pop('IN_TEST', None)
    cmd = [str(Path(sys.executable).parent/'jupyter-lab'), '--no-browser', '--ip', '127.0.0.1', f'--port={port}', '--port-retries=0',
           f'--ServerApp.token={token}', f'--ServerApp.root_dir={work}', '--LabApp.news_url=None',
           '--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate', f'--LabApp.workspaces_dir={tmp_path/"workspaces"}',
           f'--LabApp.user_settings_dir={tmp_path/"settings"}', '--ServerApp.open_browser=False']
    if hasattr(os, 'geteuid') and os.geteuid() == 0: cmd.append('--allow-root')
    log = tmp_path/'jupyter_lab.log'
    with open(log, 'wb') as out:
        proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=out, stderr=subprocess.STDOUT)
    base = f'http://127.0.0.1:{port}'
    try:
        _wait_for_server(f'{base}/api/status?token={token}', proc, log)
        yield base, token
    finally:
        _stop_server(proc, base, token)


def _dismiss_dialogs(page) -> None:
    "Click through the first-open kernel dialog and the news toast when they show up."
    for target in (page.locator('.jp-Dialog button.jp-mod-accept'), page.locator('.jp-toast-button', has_text='No')):
        if not target.count(): continue
        try: target.first.click(timeout=5_000)
        except Exception: pass  # it closed or moved while we clicked (toasts animate): the next call sees it again


def _run_all_cells(page, tries: int = 4) -> None:
    "Run → Run All Cells, retried while the kernel is still connecting (a click then is lost)."
    started = "[...document.querySelectorAll('.jp-InputArea-prompt')].some(e => /\\[(\\*|\\d+)\\]/.test(e.textContent))"
    for _ in range(tries):
        page.wait_for_selector('.jp-Notebook-ExecutionIndicator[data-status="idle"]')
        _dismiss_dialogs(page)  # on a loaded machine the kernel dialog can open after the kernel went idle
        try:
            page.locator('.lm-MenuBar-itemLabel', has_text='Run').first.click(timeout=10_000)
            page.locator('.lm-Menu-itemLabel', has_text='Run All Cells').first.click(timeout=10_000)
            page.wait_for_function(started, timeout=8_000)
            return
        except Exception:
            page.keyboard.press('Escape')
            _dismiss_dialogs(page)
    raise AssertionError('Run All Cells did not start the notebook')


def test_inspect_losses_in_chromium(jupyter_lab, tmp_path):
    assert SKIP_REASON is None, f'KD_REQUIRE_BROWSER=1 but {SKIP_REASON}'
    from playwright.sync_api import sync_playwright
    base, token = jupyter_lab
    shot = tmp_path/'inspect_losses.png'
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={'width': 1400, 'height': 1000})
            page.set_default_timeout(45_000)
            page.goto(f'{base}/lab/tree/inspect_losses.ipynb?token={token}')
            page.wait_for_selector('.jp-Notebook')
            page.wait_for_selector('.jp-Notebook-ExecutionIndicator[data-status="idle"], .jp-Dialog', timeout=45_000)
            _dismiss_dialogs(page)
            _run_all_cells(page)
            image = page.locator('img.widget-image').first
            image.wait_for(state='visible', timeout=60_000)
            page.wait_for_function("document.querySelector('img.widget-image').naturalWidth > 0")
            # the notebook's last cell moves the slider itself: wait until the kernel is done
            page.wait_for_selector('.jp-Notebook-ExecutionIndicator[data-status="idle"]', timeout=60_000)
            _dismiss_dialogs(page)
            image.scroll_into_view_if_needed()
            before_src, before_png = image.get_attribute('src'), image.screenshot()
            handle = page.locator('.widget-slider .noUi-handle').first
            handle.focus()
            for _ in range(5): page.keyboard.press('ArrowLeft')
            page.wait_for_function("src => document.querySelector('img.widget-image').src !== src", arg=before_src, timeout=30_000)
            page.wait_for_function("document.querySelector('img.widget-image').complete")
            image.scroll_into_view_if_needed()
            assert image.screenshot() != before_png, 'the plot image did not change after moving the slider'
            page.screenshot(path=str(shot))
        except Exception:
            page.screenshot(path=str(tmp_path/'failure.png'))  # what the browser showed, for the failure report
            raise
        finally:
            browser.close()
    assert shot.stat().st_size > 10_000
    keep = ROOT/'runs'/'browser_test'
    keep.mkdir(parents=True, exist_ok=True)
    shutil.copy(shot, keep/'inspect_losses.png')
