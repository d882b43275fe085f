"""The book in a real browser: a small book (every chapter in _toc.yml run on a few photos) rendered by
jupyter-book and opened in headless Chromium with no network.

Checked on every page: it loads (HTTP 200, no JavaScript exception), every <img> is present and decodes
(in the browser, naturalWidth > 0, and with PIL), no cell output holds an error or a traceback, every
navigation link resolves to a built page, and nothing outside 127.0.0.1 is requested. A probe page with
math checks that MathJax renders from the book's own files. A screenshot of the summary page (else the last
chapter) goes to _build/browser-test/.

Chromium comes from Debian (``make test`` installs it where it can); without it the test skips.
"""
from __future__ import annotations

import base64
import functools
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urldefrag, urljoin, urlparse

import numpy as np
import papermill as pm
import pytest
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
SHOTS = REPO / "_build" / "browser-test"
BROWSERS = ("chromium", "chromium-browser", "google-chrome")

# Papermill parameters for a small book; each notebook gets the ones its parameters cell defines.
# One thread: on a shared 2-core machine torch's default of two is many times slower.
TINY = {"layers": ["blocks.6"], "bootstrap": 50, "max_epochs": 2, "max_images": None, "threads": 1, "image_size": 128,
        "mappings": ["identity", "additive", "linear", "local_linear", "mlp"]}
PER_CHAPTER = {"geometric": {"manipulations": ["mirror_h", "hue_shift_60"]},
               "masking": {"manipulations": ["mask_big_square_center"]},
               # object masks fail on some of the 8 test photos; 24 default photos give every part an object
               "semantic": {"manipulations": ["object_recolor"], "images": "default", "max_images": 24},
               "layers": {"layers": ["blocks.4", "blocks.6"], "manipulations": ["mirror_h", "mask_big_square_center"]}}
# JavaScript errors that every jupyter-book 1.0.4 page has, upstream of this project: sphinx-thebe 0.3.1 adds its
# inline config script twice, so the second "const THEBE_JS_URL" is a SyntaxError. Thebe is off in _config.yml
# (launch_buttons.thebe: false) and nothing else on the page depends on that script. Any other error fails.
KNOWN_UPSTREAM_ERRORS = ("Identifier 'THEBE_JS_URL' has already been declared",)
MATH_PROBE = "# Math probe\n\nInline $\\|W - I\\|_F^2$ and display:\n\n$$\ny = W x + b\n$$\n"


def _browser() -> str | None:
    return next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)


def toc_files(toc: dict) -> list[str]:
    """Returns every ``file`` in a jupyter-book _toc.yml, in reading order (root first)."""
    out = [toc["root"]]

    def walk(node):
        if isinstance(node, dict):
            if "file" in node:
                out.append(node["file"])
            for key in ("parts", "chapters", "sections"):
                for child in node.get(key, []):
                    walk(child)

    walk(toc)
    return out


def _parameter_names(notebook: Path) -> set[str]:
    """Returns the parameters the chapter takes (its one definition in the package), empty for pages without."""
    from featmap.run.presets import PRESETS, defaults

    return set(defaults(notebook.stem)) if notebook.stem in PRESETS else set()


class CDP:
    """A minimal Chrome DevTools Protocol client over --remote-debugging-pipe (fd 3 in, fd 4 out)."""

    def __init__(self, exe: str, profile: Path):
        to_browser, self._out = os.pipe()
        self._in, from_browser = os.pipe()

        def wire():  # runs in the child before exec: its fd 3 reads our commands, fd 4 writes replies
            os.dup2(to_browser, 3)
            os.dup2(from_browser, 4)

        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--no-default-browser-check", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--disable-extensions", "--disable-default-apps", "--metrics-recording-only",
                 "--disable-features=Translate,OptimizationHints,MediaRouter", "--mute-audio", "--hide-scrollbars",
                 # Nothing may reach the network: every proxied request goes to a closed port, every host
                 # name fails to resolve; 127.0.0.1 (the book's server) is an address, never proxied.
                 "--proxy-server=127.0.0.1:9", "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
                 f"--user-data-dir={profile}", "--remote-debugging-pipe", "about:blank"]
        self.proc = subprocess.Popen([exe, *flags], pass_fds=(3, 4), preexec_fn=wire, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        os.close(to_browser)
        os.close(from_browser)
        self._buf, self._id, self.events, self.session = b"", 0, [], None

    def _read_message(self, deadline: float) -> dict:
        while b"\0" not in self._buf:
            if time.monotonic() > deadline:
                raise TimeoutError("Chromium did not answer in time")
            chunk = os.read(self._in, 1 << 20)
            if not chunk:
                raise RuntimeError(f"Chromium closed the pipe (exit code {self.proc.poll()})")
            self._buf += chunk
        message, self._buf = self._buf.split(b"\0", 1)
        return json.loads(message)

    def send(self, method: str, timeout: float = 30, **params) -> dict:
        self._id += 1
        command = {"id": self._id, "method": method, "params": params}
        if self.session and not method.startswith("Target."):
            command["sessionId"] = self.session
        os.write(self._out, json.dumps(command).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            message = self._read_message(deadline)
            if message.get("id") == self._id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            self.events.append(message)

    def wait_for(self, method: str, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        for i, event in enumerate(self.events):
            if event.get("method") == method:
                return self.events.pop(i)
        while True:
            message = self._read_message(deadline)
            if message.get("method") == method:
                return message
            self.events.append(message)

    def evaluate(self, expression: str, timeout: float = 30):
        result = self.send("Runtime.evaluate", timeout=timeout, expression=expression, returnByValue=True,
                           awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"page script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
        os.close(self._in)
        os.close(self._out)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def small_book(tmp_path_factory, photo_dir) -> tuple[Path, list[str]]:
    """Builds the book with every _toc.yml chapter run on a few photos; returns its html folder and pages."""
    root = tmp_path_factory.mktemp("book")
    stage = root / "stage"
    (stage / "book").mkdir(parents=True)
    shutil.copy(REPO / "_config.yml", stage)
    toc = yaml.safe_load((REPO / "_toc.yml").read_text())
    files = toc_files(toc)
    with pytest.MonkeyPatch.context() as env:  # the kernels inherit these: nothing touches the real caches
        env.setenv("FEATMAP_CACHE", str(root / "cache"))
        env.setenv("FEATMAP_RESULTS", str(root / "results"))
        for md in (REPO / "book").glob("*.md"):
            shutil.copy(md, stage / "book")
        shutil.copytree(REPO / "book" / "_ext", stage / "book" / "_ext")
        for name in files:
            notebook = REPO / f"{name}.ipynb"
            if not notebook.is_file():
                continue
            wanted = {**TINY, "images": str(photo_dir), **PER_CHAPTER.get(Path(name).name, {})}
            names = _parameter_names(notebook)
            pm.execute_notebook(str(notebook), str(stage / f"{name}.ipynb"), cwd=str(stage / "book"),
                                parameters={k: v for k, v in wanted.items() if k in names}, progress_bar=False)
    (stage / "book" / "math_probe.md").write_text(MATH_PROBE)  # the book may have no math of its own yet
    toc.setdefault("chapters", []).append({"file": "book/math_probe"})
    (stage / "_toc.yml").write_text(yaml.safe_dump(toc, sort_keys=False))
    jupyter_book = Path(sys.executable).parent / "jupyter-book"  # the venv's, beside this Python
    build = subprocess.run([str(jupyter_book), "build", str(stage), "--path-output", str(root), "--warningiserror",
                            "--keep-going"], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stdout[-4000:] + build.stderr[-4000:]
    return root / "_build" / "html", files + ["book/math_probe"]


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    exe = _browser()
    if exe is None:
        pytest.skip("no Chromium installed (make test installs Debian's chromium where apt-get and root allow): "
                    "the book was not checked in a browser")
    cdp = CDP(exe, tmp_path_factory.mktemp("profile"))
    try:
        target = cdp.send("Target.createTarget", url="about:blank")["targetId"]
        cdp.session = cdp.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Page", "Network", "Runtime"):
            cdp.send(f"{domain}.enable")
        cdp.send("Emulation.setDeviceMetricsOverride", width=1280, height=900, deviceScaleFactor=1, mobile=False)
        yield cdp
    finally:
        cdp.close()


@pytest.fixture(scope="module")
def server(small_book):
    html, _ = small_book
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                            functools.partial(_QuietHandler, directory=str(html)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()


PAGE_FACTS = """(async () => {
  if (window.MathJax && MathJax.startup && MathJax.startup.promise) { await MathJax.startup.promise; }
  const imgs = [...document.images];
  await Promise.all(imgs.map(i => i.complete ? null : new Promise(r => { i.onload = i.onerror = r; })));
  const outputs = [...document.querySelectorAll('.cell_output, .output')];
  return {
    title: document.title,
    images: imgs.map(i => ({src: i.currentSrc || i.src, width: i.naturalWidth, complete: i.complete})),
    nav: [...document.querySelectorAll('.bd-sidebar a[href], nav a[href], .prev-next-area a[href]')]
           .map(a => a.href),
    resources: [...document.querySelectorAll(
                  'script[src], link[href][rel~=stylesheet], link[href][rel~=preload], img[src], iframe[src]')]
               .map(e => e.src || e.href),
    errors: outputs.filter(o => o.matches('.traceback, .error, .output_error')
                              || /Traceback \\(most recent call last\\)|\\w+Error: /.test(o.textContent))
                   .map(o => o.textContent.slice(0, 300)),
    math: {nodes: document.querySelectorAll('.math').length,
           rendered: document.querySelectorAll('mjx-container').length,
           failed: document.querySelectorAll('mjx-merror').length},
  };
})()"""


def _open(cdp: CDP, url: str) -> tuple[dict, list[dict]]:
    """Navigates to ``url``; returns the page facts and the network and script events of the load."""
    cdp.events.clear()
    cdp.send("Page.navigate", url=url)
    cdp.wait_for("Page.loadEventFired")
    facts = cdp.evaluate(PAGE_FACTS, timeout=60)
    return facts, list(cdp.events)


def test_every_page_loads_offline_with_its_figures_math_and_navigation(browser, small_book, server):
    html, files = small_book
    pages = {f"{server}{name}.html" for name in files}
    problems, figures, math_pages = [], 0, 0
    for url in sorted(pages):
        facts, events = _open(browser, url)
        requests = {e["params"]["requestId"]: e["params"]["request"]["url"] for e in events
                    if e.get("method") == "Network.requestWillBeSent"}
        for e in events:
            method, params = e.get("method"), e.get("params", {})
            if method == "Network.requestWillBeSent":
                requested = urlparse(params["request"]["url"])
                if requested.scheme not in ("data", "blob", "about") and requested.hostname != "127.0.0.1":
                    problems.append(f"{url}: requested {params['request']['url']} (network use)")
            elif method == "Network.responseReceived" and params["response"]["status"] >= 400 \
                    and not params["response"]["url"].endswith("/favicon.ico"):  # the browser's own guess
                problems.append(f"{url}: {params['response']['url']} answered {params['response']['status']}")
            elif method == "Network.loadingFailed" and not params.get("canceled"):
                problems.append(f"{url}: {requests.get(params['requestId'], params.get('type'))} failed to load: "
                                f"{params.get('errorText')}")
            elif method == "Runtime.exceptionThrown":
                details = params["exceptionDetails"]
                if any(known in details.get("exception", {}).get("description", "") for known in KNOWN_UPSTREAM_ERRORS):
                    continue
                problems.append(f"{url}: JavaScript exception {details.get('text')} "
                                f"{details.get('exception', {}).get('description', '')[:300]} at {details.get('url')}")
        if not facts["title"]:
            problems.append(f"{url}: no title")
        for img in facts["images"]:
            figures += 1
            if not img["complete"] or img["width"] == 0:
                problems.append(f"{url}: image {img['src']} did not decode in the browser")
            elif img["src"].startswith(server):
                file = html / urlparse(img["src"]).path.lstrip("/")
                with Image.open(file) as decoded:
                    decoded.load()  # raises on a truncated or corrupt figure
        problems += [f"{url}: external resource {r}" for r in facts["resources"]
                     if urlparse(r).scheme in ("http", "https") and urlparse(r).hostname != "127.0.0.1"]
        problems += [f"{url}: cell output with an error: {text!r}" for text in facts["errors"]]
        if facts["math"]["nodes"]:
            math_pages += 1
            if facts["math"]["rendered"] < facts["math"]["nodes"] or facts["math"]["failed"]:
                problems.append(f"{url}: math not rendered: {facts['math']}")
        for link in facts["nav"]:
            target = urldefrag(urljoin(url, link))[0]
            if target.startswith(server):
                if not (html / urlparse(target).path.lstrip("/")).is_file():
                    problems.append(f"{url}: navigation link {link} leads nowhere")
            elif urlparse(target).scheme in ("http", "https"):
                pass  # a link out (e.g. a licence) is not a load; only loads are network use
    assert not problems, "\n".join(problems)
    assert figures >= sum(1 for f in files if (REPO / f"{f}.ipynb").is_file())  # every chapter draws figures
    assert math_pages >= 1  # at least the probe: MathJax ran from the book's own _static

    summary = next((f for f in files if Path(f).name == "summary"), files[-2])  # [-1] is the math probe
    browser.send("Page.navigate", url=f"{server}{summary}.html")
    browser.wait_for("Page.loadEventFired")
    browser.evaluate("document.fonts.ready.then(() => true)")
    shot = base64.b64decode(browser.send("Page.captureScreenshot", format="png", captureBeyondViewport=True)["data"])
    SHOTS.mkdir(parents=True, exist_ok=True)
    out = SHOTS / f"{Path(summary).name}.png"
    out.write_bytes(shot)
    (html / out.name).write_bytes(shot)
    with Image.open(out) as png:
        assert png.size[0] == 1280 and png.size[1] >= 900
        assert len(np.unique(np.asarray(png.convert("L").resize((64, 64))))) > 8  # not a blank page
