"""The book in a real browser: the run's small book (tests/conftest.py: every notebook in _toc.yml run on tiny
parameters and rendered by jupyter-book) opened in headless Chromium, driven by Playwright, with no network.

Every page is opened once (module fixture ``visits``); each test then checks one thing on every page:

- it loads: HTTP 200 for everything it asks, no JavaScript exception, a title, nothing requested off 127.0.0.1;
- every <img> decodes (in the browser, naturalWidth > 0, and with PIL), and every chapter draws figures;
- no cell output holds an error or a traceback; no docutils error message is rendered;
- no stderr output, warning or progress-bar text in any cell output (shown or folded);
- the page does not scroll sideways: neither the document nor the content column is wider than its box (code and
  tables may scroll inside their own box);
- chapter pages (every notebook page): a key-findings block (class ``key-findings``) is shown before the first
  code-cell input that is shown (a folded hide-input / hide-cell cell is not shown);
- cells are folded where the notebook tags them (hide-input, hide-output, hide-cell): as many rendered cells
  carry each tag as the executed notebook has, and each is folded;
- every navigation link resolves to a built page; math renders with the book's own MathJax (a probe page);
- a full-page screenshot of every page lands in _build/browser-test/ (not blank).

Chromium is the system's (Debian's, installed by ``make browser``), launched by Playwright through
``executable_path``: Playwright downloads nothing. Without a Chromium the tests skip, saying so.
"""
from __future__ import annotations

import functools
import http.server
import json
import re
import shutil
import threading
from pathlib import Path
from urllib.parse import urldefrag, urljoin, urlparse

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
SHOTS = REPO / "_build" / "browser-test"
BROWSERS = ("chromium", "chromium-browser", "google-chrome")
VIEWPORT = {"width": 1280, "height": 900}
# JavaScript errors that every jupyter-book 1.0.4 page has, upstream of this project: sphinx-thebe 0.3.1 adds its
# inline config script twice, so the second "const THEBE_JS_URL" is a SyntaxError. Thebe is off in _config.yml
# (launch_buttons.thebe: false) and nothing else on the page depends on that script. Any other error fails.
KNOWN_UPSTREAM_ERRORS = ("Identifier 'THEBE_JS_URL' has already been declared",)
# Nothing may reach the network: every proxied request goes to a closed port, every host name fails to resolve;
# 127.0.0.1 (the book's server) is an address, never proxied.
OFFLINE_FLAGS = ["--disable-gpu", "--disable-dev-shm-usage", "--no-first-run", "--no-default-browser-check",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-extensions", "--disable-default-apps", "--metrics-recording-only", "--mute-audio",
                 "--disable-features=Translate,OptimizationHints,MediaRouter", "--hide-scrollbars",
                 "--proxy-server=127.0.0.1:9", "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"]
# Text no reader should see in a cell output: warnings, progress bars (tqdm's "45%|####  |" and its rates).
LOG_TEXT = r"Warning|tqdm|%\||\d ?it/s|\d ?s/it"
FOLD_TAGS = ("hide-input", "hide-output", "hide-cell")


def system_chromium() -> str | None:
    return next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


# Marks every browser test: it skips, saying why, before the small book is built for it.
needs_chromium = pytest.mark.skipif(
    system_chromium() is None, reason=f"no Chromium on PATH ({', '.join(BROWSERS)}; `make browser` installs Debian's "
                                      "chromium where apt-get and root allow): the book was not checked in a browser")


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:  # the system's Chromium: Playwright downloads no browser
        chromium = playwright.chromium.launch(executable_path=system_chromium(), headless=True, args=OFFLINE_FLAGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture(scope="module")
def server(small_book):
    assert small_book.build_ok, "jupyter-book could not build the small book:\n" + small_book.build_log
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                            functools.partial(_QuietHandler, directory=str(small_book.html)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()


# Everything the checks need from one page, read once it has loaded (images decoded, MathJax typeset, fonts in).
PAGE_FACTS = """async (logText) => {
  if (window.MathJax && MathJax.startup && MathJax.startup.promise) { await MathJax.startup.promise; }
  const imgs = [...document.images];
  await Promise.all(imgs.map(i => i.complete ? null : new Promise(r => { i.onload = i.onerror = r; })));
  await document.fonts.ready;
  const shown = e => !!e && e.checkVisibility({visibilityProperty: true, opacityProperty: true})
                    && e.getClientRects().length > 0;
  const describe = e => e.tagName.toLowerCase() + (e.id ? '#' + e.id : '')
                        + [...e.classList].slice(0, 4).map(c => '.' + c).join('');
  const outputs = [...document.querySelectorAll('.cell_output, .output')];
  const logPattern = new RegExp(logText);
  const logLines = [];
  for (const o of document.querySelectorAll('.cell_output')) {
    for (const line of o.textContent.split('\\n')) {
      if (logPattern.test(line)) { logLines.push(line.trim().slice(0, 160)); }
    }
  }
  // The page must not scroll sideways, nor the content column; boxes inside it may scroll on their own.
  const root = document.scrollingElement || document.documentElement;
  const columns = ['main', '.bd-main', '.bd-content', '.bd-article-container', 'article.bd-article']
    .map(s => document.querySelector(s)).filter(e => e);
  const overflow = [root, ...new Set(columns)]
    .filter(e => e.scrollWidth > e.clientWidth + 1)
    .map(e => ({box: e === root ? 'document' : describe(e), scrollWidth: e.scrollWidth, clientWidth: e.clientWidth}));
  const article = document.querySelector('article.bd-article') || document.querySelector('main') || document.body;
  const right = article.getBoundingClientRect().right;
  const scrollsOnItsOwn = e => {
    for (let a = e.parentElement; a && a !== article; a = a.parentElement) {
      if (['auto', 'scroll', 'hidden', 'clip'].includes(getComputedStyle(a).overflowX)) { return true; }
    }
    return false;
  };
  // Figures shown smaller than drawn shrink their text; tables wider than their box hide columns.
  const figures = imgs.filter(i => i.closest('.cell_output') && i.naturalWidth > 0)
    .map(i => ({src: (i.currentSrc || i.src).split('/').pop(), natural: i.naturalWidth,
                shown: Math.round(i.getBoundingClientRect().width)}));
  // A table fits the column, or sits in a box of its own that fits and scrolls sideways; anything else is clipped.
  const scroller = e => {
    for (let a = e.parentElement; a && a !== article; a = a.parentElement) {
      if (['auto', 'scroll'].includes(getComputedStyle(a).overflowX)) { return a; }
    }
    return null;
  };
  const tables = [...article.querySelectorAll('.cell_output table, .output table')]
    .map(t => { const box = scroller(t) || t;
                return {text: t.textContent.trim().slice(0, 60), width: Math.round(box.getBoundingClientRect().width),
                        right: box.getBoundingClientRect().right, scrolls: box !== t}; })
    .filter(t => t.right > right + 1);
  const wide = overflow.length ? [...article.querySelectorAll('*')]
    .filter(e => e.getBoundingClientRect().right > right + 1 && !scrollsOnItsOwn(e))
    .slice(0, 5).map(e => describe(e) + ` (${Math.round(e.getBoundingClientRect().width)} px)`) : [];
  // Code cells: which are folded (hide-*), and the first input a reader sees.
  const cells = [...document.querySelectorAll('.cell')];
  const folds = {};
  for (const tag of %(fold_tags)s) {
    folds[tag] = cells.filter(c => c.classList.contains('tag_' + tag)).map(c => ({
      input: shown(c.querySelector('.cell_input')), output: shown(c.querySelector('.cell_output')),
      hasInput: !!c.querySelector('.cell_input'), hasOutput: !!c.querySelector('.cell_output'),
      text: (c.querySelector('.cell_input') || c).textContent.trim().slice(0, 80)}));
  }
  const firstInput = [...document.querySelectorAll('.cell .cell_input')].find(shown);
  const findings = document.querySelector('.key-findings');
  return {
    title: document.title,
    images: imgs.map(i => ({src: i.currentSrc || i.src, width: i.naturalWidth, complete: i.complete,
                            figure: !!i.closest('.cell_output')})),
    nav: [...document.querySelectorAll('.bd-sidebar a[href], nav a[href], .prev-next-area a[href]')]
           .map(a => a.href),
    resources: [...document.querySelectorAll(
                  'script[src], link[href][rel~=stylesheet], link[href][rel~=preload], img[src], iframe[src]')]
               .map(e => e.src || e.href),
    errors: outputs.filter(o => o.matches('.traceback, .error, .output_error')
                              || /Traceback \\(most recent call last\\)|\\w+Error: /.test(o.textContent))
                   .map(o => o.textContent.slice(0, 300)),
    systemMessages: [...document.querySelectorAll('.system-message, .problematic')]
                      .map(e => e.textContent.trim().slice(0, 200)),
    stderr: [...document.querySelectorAll('.stderr, .output_stderr')].map(e => e.textContent.trim().slice(0, 160)),
    logLines,
    overflow, wide, figures, tables,
    folds,
    findings: {present: !!findings, shown: shown(findings),
               beforeFirstInput: !!findings && (!firstInput
                 || !!(findings.compareDocumentPosition(firstInput) & Node.DOCUMENT_POSITION_FOLLOWING)),
               firstInput: firstInput ? firstInput.textContent.trim().slice(0, 100) : null},
    math: {nodes: document.querySelectorAll('.math').length,
           rendered: document.querySelectorAll('mjx-container').length,
           failed: document.querySelectorAll('mjx-merror').length},
  };
}""" % {"fold_tags": json.dumps(list(FOLD_TAGS))}


@pytest.fixture(scope="module")
def visits(browser, small_book, server) -> dict[str, dict]:
    """Opens every page once; returns page -> its facts (PAGE_FACTS), the load's problems and its screenshot."""
    context = browser.new_context(viewport=VIEWPORT, device_scale_factor=1, service_workers="block")
    page = context.new_page()
    seen: dict[str, list] = {"requests": [], "failed": [], "bad_status": [], "exceptions": []}

    def answered(response):
        if response.status >= 400 and not response.url.endswith("/favicon.ico"):  # the browser's own guess
            seen["bad_status"].append(f"{response.url} answered {response.status}")

    page.on("request", lambda request: seen["requests"].append(request.url))
    page.on("requestfailed", lambda request: seen["failed"].append(f"{request.url}: {request.failure}"))
    page.on("response", answered)
    page.on("pageerror", lambda error: seen["exceptions"].append(f"{error.name}: {error.message}"[:400]))
    shutil.rmtree(SHOTS, ignore_errors=True)
    SHOTS.mkdir(parents=True)
    out = {}
    try:
        for name in small_book.pages:
            for events in seen.values():
                events.clear()
            url = f"{server}{name}.html"
            response = page.goto(url, wait_until="load")
            facts = page.evaluate(PAGE_FACTS, LOG_TEXT)
            shot = SHOTS / f"{Path(name).name}.png"
            page.screenshot(path=str(shot), full_page=True)
            out[name] = {"url": url, "status": response.status if response else None, "facts": facts,
                         "shot": shot, **{k: list(v) for k, v in seen.items()}}
    finally:
        context.close()
    return out


def _fail_if(problems: list[str]) -> None:
    assert not problems, f"{len(problems)} problem(s):\n" + "\n".join(problems)


@needs_chromium
def test_every_page_loads_offline(visits, server):
    problems = []
    for name, v in visits.items():
        if v["status"] != 200:
            problems.append(f"{name}: answered {v['status']}")
        if not v["facts"]["title"]:
            problems.append(f"{name}: no title")
        for url in v["requests"]:
            requested = urlparse(url)
            if requested.scheme not in ("data", "blob", "about") and requested.hostname != "127.0.0.1":
                problems.append(f"{name}: requested {url} (network use)")
        problems += [f"{name}: {r} (external resource)" for r in v["facts"]["resources"]
                     if urlparse(r).scheme in ("http", "https") and urlparse(r).hostname != "127.0.0.1"]
        problems += [f"{name}: {s}" for s in v["bad_status"]]
        problems += [f"{name}: failed to load {f}" for f in v["failed"] if "ERR_ABORTED" not in f]
        problems += [f"{name}: JavaScript exception {e}" for e in v["exceptions"]
                     if not any(known in e for known in KNOWN_UPSTREAM_ERRORS)]
    _fail_if(problems)


def _figure_outputs(notebook: dict) -> int:
    """Returns how many images the notebook's rendered cells output (removed cells and outputs are not rendered)."""
    return sum("image/png" in o.get("data", {}) or "image/jpeg" in o.get("data", {})
               for c in notebook["cells"] if c["cell_type"] == "code"
               and not {"remove-cell", "remove-output"} & set(c.get("metadata", {}).get("tags", []))
               for o in c.get("outputs", []))


@needs_chromium
def test_every_figure_decodes(visits, small_book, server):
    """Every <img> decodes, in the browser and with PIL; every chapter shows its figures (at least one)."""
    problems = []
    for name, v in visits.items():
        images = v["facts"]["images"]
        for img in images:
            if not img["complete"] or img["width"] == 0:
                problems.append(f"{name}: image {img['src']} did not decode in the browser")
            elif img["src"].startswith(server):
                with Image.open(small_book.html / urlparse(img["src"]).path.lstrip("/")) as decoded:
                    decoded.load()  # raises on a truncated or corrupt figure
        if small_book.is_notebook(name):
            shown = sum(img["figure"] for img in images)
            expected = _figure_outputs(json.loads((small_book.stage / f"{name}.ipynb").read_text()))
            if shown < max(1, expected):
                problems.append(f"{name}: {shown} figures in the page, {expected} in the executed notebook")
    _fail_if(problems)


@needs_chromium
def test_no_error_outputs(visits):
    problems = []
    for name, v in visits.items():
        problems += [f"{name}: cell output with an error: {text!r}" for text in v["facts"]["errors"]]
        problems += [f"{name}: docutils error in the page: {text!r}" for text in v["facts"]["systemMessages"]]
    _fail_if(problems)


@needs_chromium
def test_no_stderr_warning_or_progress_text(visits):
    """Nothing but results in the pages: no stderr stream, no warning, no progress bar."""
    problems = []
    for name, v in visits.items():
        problems += [f"{name}: stderr output: {text!r}" for text in v["facts"]["stderr"]]
        problems += [f"{name}: log text in an output: {line!r}" for line in v["facts"]["logLines"]]
    _fail_if(problems)


@needs_chromium
def test_no_horizontal_overflow(visits):
    """Pages fit: neither the document nor the content column scrolls sideways at 1280 px."""
    problems = []
    for name, v in visits.items():
        for box in v["facts"]["overflow"]:
            problems.append(f"{name}: {box['box']} is {box['scrollWidth']} px wide in {box['clientWidth']} px"
                            + (f"; too wide: {', '.join(v['facts']['wide'])}" if v["facts"]["wide"] else ""))
    _fail_if(problems)


MIN_FIGURE_SCALE = 0.9  # a figure shown at less than this share of its drawn width has text under its set size


@needs_chromium
def test_figures_are_shown_at_their_size_and_tables_fit(visits):
    """Legible at a glance: no figure is shrunk to fit the page (its text would fall under the size it was drawn
    at), and every table fits the content column or scrolls sideways in a box that does (never clipped: a reader
    would miss its right-hand columns)."""
    problems = []
    for name, v in visits.items():
        problems += [f"{name}: figure {f['src']} drawn {f['natural']} px wide, shown at {f['shown']} px"
                     for f in v["facts"]["figures"] if f["shown"] < MIN_FIGURE_SCALE * f["natural"]]
        problems += [f"{name}: table {t['text']!r} ({'its scroll box ' if t['scrolls'] else ''}{t['width']} px) "
                     "runs past the content column" for t in v["facts"]["tables"]]
    _fail_if(problems)


@needs_chromium
def test_key_findings_before_the_first_code(visits, small_book):
    """Answers first: every chapter shows a key-findings block before the first code a reader sees."""
    problems = []
    for name, v in visits.items():
        if not small_book.is_notebook(name):
            continue
        found = v["facts"]["findings"]
        if not found["present"]:
            problems.append(f"{name}: no key-findings block (class key-findings)")
        elif not found["shown"]:
            problems.append(f"{name}: the key-findings block is folded or hidden")
        elif not found["beforeFirstInput"]:
            problems.append(f"{name}: the key-findings block comes after shown code: {found['firstInput']!r}")
    _fail_if(problems)


def _tagged_cells(notebook: dict) -> dict[str, int]:
    """Returns how many rendered cells of ``notebook`` carry each fold tag (removed cells are not rendered)."""
    counts = dict.fromkeys(FOLD_TAGS, 0)
    for cell in notebook["cells"]:
        tags = cell.get("metadata", {}).get("tags", [])
        if cell["cell_type"] == "code" and "remove-cell" not in tags:
            for tag in FOLD_TAGS:
                counts[tag] += tag in tags
    return counts


@needs_chromium
def test_cells_are_folded_where_tagged(visits, small_book):
    """Details folded, not deleted: every hide-input / hide-output / hide-cell cell renders folded."""
    problems = []
    for name, v in visits.items():
        if not small_book.is_notebook(name):
            continue
        expected = _tagged_cells(json.loads((small_book.stage / f"{name}.ipynb").read_text()))
        for tag in FOLD_TAGS:
            rendered = v["facts"]["folds"][tag]
            if len(rendered) != expected[tag]:
                problems.append(f"{name}: {expected[tag]} cells tagged {tag}, {len(rendered)} rendered with it")
            for cell in rendered:
                open_parts = [part for part, hidden in (("input", tag in ("hide-input", "hide-cell")),
                                                        ("output", tag in ("hide-output", "hide-cell")))
                              if hidden and cell["has" + part.title()] and cell[part]]
                if open_parts:
                    problems.append(f"{name}: a {tag} cell shows its {' and '.join(open_parts)}: {cell['text']!r}")
    _fail_if(problems)


@needs_chromium
def test_navigation_resolves(visits, small_book, server):
    problems = []
    for name, v in visits.items():
        for link in v["facts"]["nav"]:
            target = urldefrag(urljoin(v["url"], link))[0]
            if target.startswith(server) and not (small_book.html / urlparse(target).path.lstrip("/")).is_file():
                problems.append(f"{name}: navigation link {link} leads nowhere")
    _fail_if(problems)  # a link out (e.g. a licence) is not a load; only loads are network use


@needs_chromium
def test_math_renders_from_the_books_own_files(visits):
    problems, pages_with_math = [], 0
    for name, v in visits.items():
        math = v["facts"]["math"]
        if math["nodes"]:
            pages_with_math += 1
            if math["rendered"] < math["nodes"] or math["failed"]:
                problems.append(f"{name}: math not rendered: {math}")
    _fail_if(problems)
    assert pages_with_math >= 1  # at least the probe: MathJax ran from the book's own _static


@needs_chromium
def test_a_screenshot_of_every_page(visits):
    for name, v in visits.items():
        with Image.open(v["shot"]) as png:
            assert png.size[0] == VIEWPORT["width"] and png.size[1] >= VIEWPORT["height"], name
            assert len(np.unique(np.asarray(png.convert("L").resize((64, 64))))) > 8, f"{name}: a blank page"
    assert sorted(p.name for p in SHOTS.glob("*.png")) == sorted(f"{Path(n).name}.png" for n in visits)


def test_log_pattern_catches_what_it_should():
    """The pattern of test_no_stderr_warning_or_progress_text, on warning and progress lines a kernel prints and
    on plain results."""
    log = re.compile(LOG_TEXT)
    for line in ("TqdmWarning: IProgress not found. Please update jupyter and ipywidgets.",
                 "mlp:  10%|#         | 3/30 [00:01<00:09,  2.93it/s, best=0.8812]", "fit: 4/5 [00:09, 2.1s/it]",
                 "UserWarning: the default value will change"):
        assert log.search(line), line
    for line in ("photos: 24 (14 train, 5 validation, 5 test)", "linear beats identity in 14 of 15 cases (93%)",
                 "cos_mean 0.912 [0.90, 0.93]"):
        assert not log.search(line), line
