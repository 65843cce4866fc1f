"""The docs site: `cvops docs` builds it from the notebooks into a temporary folder; headless Chromium opens the home
page and an API page over real HTTP, and every file the browser asks for must exist; every public name of every module
is documented and has its entry in the API reference; a broken link fails the build."""
import functools
import importlib
import inspect
import json
import re
import shutil
import subprocess
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image, ImageStat

from conftest import ROOT, run_cli
from cvops.errors import DocsError
from cvops.docs import has_docs, library_modules
from cvops.docs_site import build_docs, check_links, external_assets, process_notebook

CHROMIUM = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    "The site as `cvops docs` builds it (without running the library notebooks: nbdev_test runs those)."
    tmp = tmp_path_factory.mktemp("docs")
    r = run_cli("docs", "--no-execute", "--out", tmp / "site", "--work", tmp / "proc", timeout=900, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    assert re.match(r"built \d+ notebook pages and \d+ API pages in \d+ s", r.stdout), r.stdout
    return tmp / "site"


class _Recorder(SimpleHTTPRequestHandler):
    "Serves the site and remembers every request with its status, so the test sees what the browser asked for."
    requests = []
    def log_message(self, *args): pass
    def log_request(self, code="-", size="-"): self.requests.append((self.path, int(code)))


@pytest.fixture(scope="module")
def http_site(site):
    srv = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Recorder, directory=str(site)))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}", _Recorder.requests
    srv.shutdown(); srv.server_close()


def _chromium(url, tmp_path, *extra):
    prof = Path(tmp_path) / f"profile-{len(list(Path(tmp_path).glob('profile-*')))}"
    return subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={prof}", "--enable-logging=stderr", "--v=0",
                           "--virtual-time-budget=5000", *extra, url], capture_output=True, text=True, timeout=120)


def test_site_has_every_kind_of_page(site):
    for page in ("index.html", "api/index.html", "api/store.html", "library/store.html", "library/docs.html",
                 "tutorials/tutorial.html", "search/search_index.json"):
        assert (site / page).exists(), page
    home = (site / "index.html").read_text()
    assert "Quick start" in home and 'href="api/index.html"' in home
    # the nav is generated from the notebooks found: every library notebook has its page
    for nb in (ROOT / "nbs").glob("[0-9]*.ipynb"):
        m = re.search(r"#\|\s*default_exp\s+([\w.]+)", nb.read_text())
        if m: assert (site / "library" / f"{m.group(1)}.html").exists(), nb.name


def test_links_assets_all_local(site):
    assert check_links(site, "/cvops/") == []
    assert external_assets(site) == []  # no fonts or scripts from other hosts: the site works offline


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (Debian: apt-get install chromium; .ci/run installs it)")
@pytest.mark.parametrize("page, expect", [("index.html", "Quick start"), ("api/store.html", 'id="ArtifactStore"')])
def test_pages_render_in_chromium_with_every_asset(http_site, site, tmp_path, page, expect):
    base, requests = http_site
    requests.clear()
    r = _chromium(f"{base}/{page}", tmp_path, "--dump-dom")
    assert r.returncode == 0, r.stderr[-2000:]
    dom = r.stdout
    assert expect in dom, dom[:2000]
    assert 'class="md-header' in dom and 'class="md-nav' in dom  # the Material theme's layout was rendered
    # what the browser asked for: the page, its stylesheets and scripts, all found (no 404s)
    asked = dict(requests)
    assert asked.get(f"/{page}") == 200, asked
    assert any(p.endswith(".css") for p in asked) and any(p.endswith(".js") for p in asked), asked
    missing = {p: c for p, c in asked.items() if c != 200}
    assert not missing, missing
    console = [l for l in r.stderr.splitlines() if "CONSOLE" in l and ("Uncaught" in l or "Failed to load" in l)]
    assert not console, console
    # every local asset the rendered DOM refers to exists in the site folder
    for ref in re.findall(r'<(?:link|script|img)\b[^>]*?(?:href|src)="([^"]+)"', dom):
        if re.match(r"^(https?:|data:|//)", ref): continue
        target = (site / page).parent / ref.split("#")[0].split("?")[0]
        assert target.resolve().exists(), ref

    shot = tmp_path / f"{page.replace('/', '_')}.png"
    r = _chromium(f"{base}/{page}", tmp_path, f"--screenshot={shot}", "--window-size=1280,1600", "--hide-scrollbars")
    assert shot.exists(), r.stderr[-2000:]
    keep = ROOT / "_proc" / "screenshots"  # git-ignored: for a person to look at
    keep.mkdir(parents=True, exist_ok=True)
    shutil.copy(shot, keep / shot.name)
    img = Image.open(shot).convert("L")
    assert img.size == (1280, 1600)
    assert ImageStat.Stat(img).stddev[0] > 20  # a page with text and a header bar, not a blank or error screen


def _public(modname):
    mod = importlib.import_module(modname)
    return [(n, getattr(mod, n)) for n in getattr(mod, "__all__", [])]


def test_every_public_callable_is_documented():
    undocumented = [f"{m}.{n}" for m in library_modules(ROOT) for n, o in _public(m) if not has_docs(o)]
    assert not undocumented, f"public names without docstring or docments: {undocumented}"


def test_every_public_name_is_in_the_api_reference(site):
    modules = library_modules(ROOT)
    assert len(modules) >= 8 and {"cvops.docs", "cvops.docs_site", "cvops.deploy"} <= set(modules)
    missing = []
    for m in modules:
        page = site / "api" / f"{m.split('.')[-1]}.html"
        assert page.exists(), m
        ids = set(re.findall(r'\bid="([^"]+)"', page.read_text()))
        missing += [f"{m}.{n}" for n, _ in _public(m) if n not in ids]
    assert not missing, missing
    # and it shows the docments: a parameter table with the documented parameter
    store = (site / "api/store.html").read_text()
    assert "a local folder or an fsspec URL" in store and "<table>" in store


def test_library_notebook_examples_run_and_show_plots(tmp_path):
    "With execute (the default of `cvops docs`), the examples' outputs, images included, are on the page."
    dest = tmp_path / "synth.ipynb"
    process_notebook(ROOT / "nbs/02_synth.ipynb", dest, "library/synth.ipynb", {}, {}, ROOT / "nbs", execute=True)
    cells = json.loads(dest.read_text())["cells"]
    outputs = [o for c in cells for o in c.get("outputs", [])]
    assert any("image/png" in o.get("data", {}) for o in outputs), "no image output on the synth page"
    assert not any("#| " in "".join(c["source"]) for c in cells)


def _mini_project(root, index_md):
    (root / "nbs").mkdir(parents=True)
    shutil.copy(ROOT / "mkdocs.yml", root / "mkdocs.yml")
    nb = {"cells": [{"cell_type": "markdown", "metadata": {}, "source": index_md}], "metadata": {}, "nbformat": 4,
          "nbformat_minor": 5}
    (root / "nbs/index.ipynb").write_text(json.dumps(nb))
    return root


def test_broken_internal_link_fails_the_build(tmp_path):
    ok = _mini_project(tmp_path / "ok", "# Home\n\nSee the [API](api/index.md).")
    b = build_docs(root=ok, workers=1)
    assert (b.site / "index.html").exists() and b.api_pages == []
    bad = _mini_project(tmp_path / "bad", "# Home\n\nSee [the guide](guide.html) and [the API](api/index.html#nope).")
    with pytest.raises(DocsError) as e: build_docs(root=bad, workers=1)
    msg = str(e.value)
    assert "2 broken link(s)" in msg and "index.html: guide.html (no such file)" in msg, msg
    assert "index.html: api/index.html#nope (no anchor #nope)" in msg, msg


def test_cli_reports_a_failing_notebook_in_one_line_per_problem(tmp_path):
    proj = _mini_project(tmp_path / "p", "# Home")
    (proj / "nbs/01_bad.ipynb").write_text(json.dumps({"cells": [
        {"cell_type": "markdown", "metadata": {}, "source": "# bad"},
        {"cell_type": "code", "metadata": {}, "source": "#| default_exp bad", "outputs": [], "execution_count": None},
        {"cell_type": "code", "metadata": {}, "source": "1/0", "outputs": [], "execution_count": None}],
        "metadata": {}, "nbformat": 4, "nbformat_minor": 5}))
    r = run_cli("docs", "--out", tmp_path / "site", cwd=proj)
    assert r.returncode == 1, r
    assert "01_bad.ipynb: cell" in r.stderr and "ZeroDivisionError" in r.stderr and "Traceback" not in r.stderr, r.stderr
