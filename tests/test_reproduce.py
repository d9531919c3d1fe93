"""The reproduction report: a tiny run rendered in headless Chromium, and the full run (slow)."""

import json
import os

import numpy as np
import pytest

from polytope_lens.reproduce import reproduce

TINY = {"p1_items": 80, "p2_pairs": 3, "p2_items": 60, "p3_items": 3, "n_boot": 50, "n_stability": 0}
SECTIONS = ("summary", "prediction-1", "prediction-2", "prediction-3", "flow", "methods")


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("rep") / "report"
    r = reproduce(out, quick=True, models=["digits-cnn"], config=TINY)
    return out, r


def test_results_json(tiny_report):
    out, r = tiny_report
    data = json.loads((out / "index.html").with_name("results.json").read_text())
    for key in ("prediction_1", "prediction_2", "prediction_3"):
        assert data[key], key
        for e in data[key]:
            assert set(e) >= {"model", "statistic", "value", "baseline", "ci", "verdict"}
            assert e["verdict"] in ("holds", "does not hold", "inconclusive")
    assert not any(p.name.startswith(".report") for p in out.parent.iterdir())


def test_refuses_existing(tiny_report):
    from polytope_lens.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match="exists"):
        reproduce(tiny_report[0], quick=True, models=["digits-cnn"], config=TINY)


def test_report_renders_in_chromium(tiny_report):
    """Every section visible, every figure decoded and not blank, no console errors."""
    pw = pytest.importorskip("playwright.sync_api")
    from io import BytesIO

    from PIL import Image

    if not os.path.exists("/usr/bin/chromium"):
        pytest.skip("no /usr/bin/chromium")
    out, _ = tiny_report
    errors = []
    with pw.sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--no-first-run"])
        page = browser.new_page()
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto((out / "index.html").resolve().as_uri())
        for sid in SECTIONS:
            assert page.locator(f"#{sid}").is_visible(), sid
        imgs = page.locator("img.fig")
        assert imgs.count() >= 4
        for i in range(imgs.count()):
            img = imgs.nth(i)
            assert img.evaluate("e => e.complete && e.naturalWidth") > 0
            img.scroll_into_view_if_needed()
            arr = np.asarray(Image.open(BytesIO(img.screenshot())).convert("L"), dtype=np.float64)
            assert arr.std() > 5, f"figure {i} looks blank"
        browser.close()
    assert not errors, errors


@pytest.mark.slow
def test_full_quick_run(tmp_path):
    """The whole --quick reproduction (all available models) finishes and writes both files."""
    r = reproduce(tmp_path / "q", quick=True)
    assert (tmp_path / "q" / "index.html").exists() and r["seconds"] < 300
