"""The documentation: every Python block of every page runs, the site builds with ``--strict``,
and headless Chromium finds every page, link, anchor, code block and figure of the built site.

Blocks of a page run in order in one namespace, in a temporary working directory. A block that
cannot run here (it needs ``torchrun`` or a GPU) is preceded by ``<!-- skip: reason -->`` and
shows up as a skipped test with that reason. The browser check drives Debian's ``chromium``
(``apt-get install chromium``) through playwright's Python package, never a downloaded browser;
without ``/usr/bin/chromium`` it skips, saying so.
"""

from __future__ import annotations

import functools
import http.server
import os
import re
import shutil
import subprocess
import sys
import threading
import types
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md"))
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[\w+-]*)")
SKIP = re.compile(r"<!--\s*skip:\s*(?P<reason>.+?)\s*-->")


class Block(NamedTuple):
    page: str
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    skip: str | None  # the reason, for a block marked <!-- skip: reason -->


def blocks(page: str) -> list[Block]:
    """The fenced code blocks of a page, in order, with their skip markers."""
    out: list[Block] = []
    lines = (DOCS / page).read_text(encoding="utf-8").splitlines()
    skip: str | None = None
    i = 0
    while i < len(lines):
        marker = SKIP.search(lines[i])
        opening = FENCE.match(lines[i])
        if marker:
            skip = marker.group("reason")
        elif opening:
            indent, start = opening.group("indent"), i
            body = []
            i += 1
            while i < len(lines) and not lines[i].strip().startswith("```"):
                body.append(lines[i][len(indent) :] if lines[i].startswith(indent) else lines[i])
                i += 1
            out.append(Block(page, start + 1, opening.group("lang"), "\n".join(body), skip))
            skip = None
        elif lines[i].strip():
            skip = None  # a marker applies to the block right after it
        i += 1
    return out


def python_blocks(page: str) -> list[Block]:
    return [b for b in blocks(page) if b.lang in ("python", "py")]


SKIPPED = [(b.page, b.line, b.skip) for p in PAGES for b in python_blocks(p) if b.skip]


def test_the_pages_have_code() -> None:
    assert "getting-started.md" in PAGES and "index.md" in PAGES
    guides = [p for p in PAGES if p.startswith("guides/")]
    assert len(guides) >= 9
    for page in ["index.md", "getting-started.md", *guides]:
        assert python_blocks(page), f"{page} has no runnable Python block"


@pytest.mark.parametrize("page", [p for p in PAGES if python_blocks(p)])
def test_page_code_runs(page: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    # The blocks run as the body of a real module, which torch.compile can look globals up in.
    name = "looplib_docs_" + re.sub(r"\W", "_", page[:-3])
    module = types.ModuleType(name)
    monkeypatch.setitem(sys.modules, name, module)
    namespace = module.__dict__
    ran = 0
    for block in python_blocks(page):
        if block.skip:
            continue
        code = compile(block.code, f"docs/{page}:{block.line}", "exec")
        try:
            exec(code, namespace)
        except BaseException as error:
            if hasattr(error, "add_note"):  # Python 3.11+; the traceback names the block anyway
                error.add_note(f"in the block at docs/{page}, line {block.line}")
            raise
        ran += 1
    assert ran, f"every block of {page} is skipped"


@pytest.mark.parametrize(("page", "line", "reason"), SKIPPED)
def test_marked_blocks_are_skipped_with_a_reason(page: str, line: int, reason: str) -> None:
    pytest.skip(f"docs/{page}:{line}: {reason}")


# -- the built site ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``mkdocs build --strict`` into a temporary directory (a warning fails the build)."""
    pytest.importorskip("mkdocs", reason="building the site needs looplib[docs]")
    pytest.importorskip("mkdocstrings", reason="building the site needs looplib[docs]")
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, f"mkdocs build --strict failed:\n{done.stderr}"
    return out


def test_site_builds_strict_with_every_page_and_the_api(site: Path) -> None:
    for page in PAGES:
        assert (site / page.replace(".md", ".html")).is_file(), page
    api = (site / "api" / "looplib.html").read_text(encoding="utf-8")
    for name in ("looplib.train_step", "looplib.accumulate", "looplib.fold", "looplib.vmap"):
        assert f'id="{name}"' in api, name


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def served(site: Path) -> Iterator[str]:
    """The built site on an ephemeral port of 127.0.0.1, for the length of the module."""
    handler = functools.partial(_Quiet, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def _ids(html: str) -> set[str]:
    return set(re.findall(r'\s(?:id|name)="([^"]+)"', html))


@pytest.mark.slow
def test_site_in_headless_chromium(served: str, site: Path) -> None:
    if not Path(CHROMIUM).exists() or shutil.which(CHROMIUM) is None:
        pytest.skip(f"no {CHROMIUM}: install Debian's chromium (apt-get install chromium)")
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="the browser check needs playwright (looplib[test])"
    )
    fetched: dict[str, tuple[int, str]] = {}

    def fetch(url: str) -> tuple[int, str]:
        if url not in fetched:
            try:
                with urllib.request.urlopen(url, timeout=30) as response:
                    fetched[url] = (response.status, response.read().decode("utf-8", "replace"))
            except urllib.error.HTTPError as error:
                fetched[url] = (error.code, "")
        return fetched[url]

    problems: list[str] = []
    html_pages = sorted(p.relative_to(site).as_posix() for p in site.rglob("*.html"))
    md_pages = {p.replace(".md", ".html"): p for p in PAGES}
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS
        )
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            for name in html_pages:
                if name == "404.html":
                    continue
                url = urllib.parse.urljoin(served, name)
                response = page.goto(url, wait_until="load")
                if response is None or response.status != 200:
                    problems.append(f"{name}: HTTP {response and response.status}")
                    continue
                for href in page.eval_on_selector_all("a[href]", "as => as.map(a => a.href)"):
                    target, _, fragment = href.partition("#")
                    if not target.startswith(served):
                        continue  # another host: not this site's to check
                    status, html = fetch(target)
                    if status != 200:
                        problems.append(f"{name}: link {href} gives HTTP {status}")
                    elif fragment and urllib.parse.unquote(fragment) not in _ids(html):
                        problems.append(f"{name}: link {href}: no anchor #{fragment}")
                source = md_pages.get(name)
                if source is not None:
                    fences = len(blocks(source))
                    rendered = page.locator("pre code").count()
                    if rendered < fences:
                        problems.append(f"{name}: {fences} code blocks, {rendered} rendered")
                    images = page.eval_on_selector_all(
                        "article img",
                        "is => is.map(i => [i.getAttribute('src'), i.complete, i.naturalWidth])",
                    )
                    wanted = len(re.findall(r"!\[", (DOCS / source).read_text(encoding="utf-8")))
                    if len(images) < wanted:
                        problems.append(f"{name}: {wanted} figures, {len(images)} rendered")
                    for src, complete, width in images:
                        if not complete or width == 0:
                            problems.append(f"{name}: figure {src} did not load")
            problems.extend(f"JavaScript error: {e}" for e in errors)
        finally:
            browser.close()
    visited = [n for n in html_pages if n != "404.html"]
    assert len(visited) >= len(PAGES)
    assert problems == []
