"""The reproduction report: a tiny run rendered in headless Chromium, and the full run (slow)."""

import json
import os
from pathlib import Path

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


def test_overwrite_replaces_only_reports(tiny_report, tmp_path, monkeypatch):
    """--overwrite (CLI and API) refuses a file, a foreign folder and the current folder with one line before any
    work (a file used to fail with a traceback after the whole run); an earlier report is recognised by its
    results.json; unknown --models are one line before the estimate (it was a KeyError)."""
    from typer.testing import CliRunner

    import polytope_lens.reproduce as rep
    from polytope_lens.cli import app
    from polytope_lens.errors import InvalidInputError

    (tmp_path / "afile.txt").write_text("a")
    (tmp_path / "foreign").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(rep, "_available", lambda m: pytest.fail("the run started before the check"))
    for out, why in (("afile.txt", "is a file"), ("foreign", "without that kind's"), (".", "current folder")):
        r = CliRunner().invoke(app, ["reproduce", "--quick", "--models", "digits-cnn", "--out", out, "--overwrite"])
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert r.exit_code == 1 and len(lines) == 1 and why in lines[0], r.output
        with pytest.raises(InvalidInputError, match=why):
            reproduce(out, quick=True, overwrite=True)
    r = CliRunner().invoke(app, ["reproduce", "--quick", "--models", "bogus", "--out", "r1"])
    assert r.exit_code == 1 and r.stderr.strip() == ("error: Unknown model job 'bogus'; known: digits-cnn, "
                                                     "fashion-cnn, efficientnet-lite0, minilm, minilm-austen.")
    assert (tmp_path / "afile.txt").read_text() == "a" and not (tmp_path / "r1").exists()
    assert json.loads((tiny_report[0] / "results.json").read_text())["format"] == "polytope-lens/report/1"
    rep.check_out_dir(tiny_report[0], overwrite=True)  # an earlier report may be replaced


def test_report_tables_name_the_data_and_the_folder_is_readable(tiny_report):
    """The data column of every prediction table showed '—' (the entries the tables were built from had no data);
    the report folder was private (mode 0700, from tempfile.mkdtemp)."""
    out, _ = tiny_report
    page = (out / "index.html").read_text()
    data = json.loads((out / "results.json").read_text())
    for key in ("prediction_1", "prediction_2", "prediction_3"):
        for e in data[key]:
            assert f"<td>{e['model']}</td><td>{e['data']}</td><td>{e['statistic']}</td>" in page, (key, e)
    mask = os.umask(0)
    os.umask(mask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~mask


def test_cli_labels_every_count_exact_or_approximate(tiny_report, tmp_path, monkeypatch):
    """The CLI printed prediction 2's counts of a sampled (text) run, lower bounds, with no label. Each printed line
    of predictions 2 and 3 now says how its crossings were counted; the oracle is each entry's own 'exact' flag
    (set by the API from its path results; results.json holds it). The digits-cnn run is exact; a text model's
    entries (method 'sampled', exact False) are taken from the same entries, marked as a text run marks them."""
    import copy

    from typer.testing import CliRunner

    import polytope_lens.reproduce as rep
    from polytope_lens.cli import app

    _, real = tiny_report
    result = copy.deepcopy(real)
    sampled = [dict(e, model="minilm", exact=False, method="sampled") for e in result["results"]["prediction_2"]]
    result["results"]["prediction_2"] += sampled
    monkeypatch.setattr(rep, "reproduce", lambda *a, **k: result)
    r = CliRunner().invoke(app, ["reproduce", "--quick", "--models", "digits-cnn", "--out", str(tmp_path / "r")])
    assert r.exit_code == 0, r.output
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("prediction_")]
    entries = [(k, e) for k, es in result["results"].items() for e in es]
    assert len(lines) == len(entries)
    assert sum("exact" in e for _, e in entries) > len(sampled) > 0 and any(e.get("exact") for _, e in entries)
    for line, (key, e) in zip(lines, entries):
        assert line.startswith(f"{key} {e['model']} {e['statistic']}:"), (line, e)
        if "exact" not in e:  # prediction 1: clustering scores, not counts
            assert "crossings" not in line.split(":", 1)[1], line
        elif e["exact"]:
            assert "(exact crossings) ->" in line, line
        else:
            assert "(approximate: sampled crossings, counts are lower bounds) ->" in line, line


def test_outputs_are_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    """_outputs.publish and canonical, the last step of reproduce, cluster and codes. (1) 'report/sub/..' is the
    report itself: its temporary sibling was made inside it and the run deleted both. (2) Ctrl-C between removing
    the old output and renaming the new one left nothing (or half a report) and said nothing was written: the old
    one is now renamed aside and put back. (3) Without overwrite, an output that appeared during the run was
    deleted. (4) JSON is strict: NaN is null (it was written bare, which JSON.parse refuses)."""
    from polytope_lens import _outputs
    from polytope_lens._outputs import canonical, json_text, publish
    from polytope_lens.errors import InvalidInputError

    def report(path, text):
        path.mkdir()
        (path / "results.json").write_text(json.dumps({"format": "polytope-lens/report/1", "x": text}))
        (path / "index.html").write_text(text)

    report(tmp_path / "rep", "old")
    (tmp_path / "rep" / "sub").mkdir()
    assert canonical(tmp_path / "rep" / "sub" / "..") == (tmp_path / "rep").resolve()
    (tmp_path / "link").symlink_to(tmp_path / "rep" / "sub")
    assert canonical(tmp_path / "link" / "..") == (tmp_path / "rep").resolve()
    assert canonical(tmp_path / "link" / "r") == (tmp_path / "rep" / "sub" / "r").resolve()

    report(tmp_path / "new", "new")
    calls = []
    real = os.replace

    def interrupted(a, b):
        calls.append((a, b))
        if len(calls) == 2:  # after the old report was moved aside, before the new one is in place
            raise KeyboardInterrupt
        return real(a, b)
    monkeypatch.setattr(_outputs.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        publish(tmp_path / "new", tmp_path / "rep", "report", overwrite=True)
    monkeypatch.setattr(_outputs.os, "replace", real)
    assert (tmp_path / "rep" / "index.html").read_text() == "old" and (tmp_path / "new" / "index.html").exists()
    assert not list(tmp_path.glob(".rep.*"))

    with pytest.raises(InvalidInputError, match="appeared while this run was writing"):
        publish(tmp_path / "new", tmp_path / "rep", "report", overwrite=False)
    assert (tmp_path / "rep" / "index.html").read_text() == "old"
    publish(tmp_path / "new", tmp_path / "rep", "report", overwrite=True)
    assert (tmp_path / "rep" / "index.html").read_text() == "new" and not (tmp_path / "new").exists()
    assert not list(tmp_path.glob(".rep.*"))

    # an interrupt as the new output's rename returns, or while the replaced one is removed: the run is done, whole,
    # and nothing is left aside (a reviewer found '.NAME.replaced-PID' folders, half removed, and "nothing was written")
    for when in ("rename", "removal"):
        report(tmp_path / "new", when)
        fired = []
        real_rmtree = _outputs.shutil.rmtree

        def late_rename(a, b):
            real(a, b)
            if Path(a).name == "new" and not fired:
                fired.append(1)
                raise KeyboardInterrupt

        def late_removal(path, **kw):
            if not fired:
                fired.append(1)
                real_rmtree(Path(path) / "index.html", ignore_errors=True)  # half removed, then Ctrl-C
                raise KeyboardInterrupt
            return real_rmtree(path, **kw)
        if when == "rename":
            monkeypatch.setattr(_outputs.os, "replace", late_rename)
        else:
            monkeypatch.setattr(_outputs.shutil, "rmtree", late_removal)
            (tmp_path / ".rep.replaced").mkdir()  # an earlier run's leftover goes too
        publish(tmp_path / "new", tmp_path / "rep", "report", overwrite=True)
        monkeypatch.setattr(_outputs.os, "replace", real)
        monkeypatch.setattr(_outputs.shutil, "rmtree", real_rmtree)
        assert fired and (tmp_path / "rep" / "index.html").read_text() == when
        assert not list(tmp_path.glob(".rep.*")) and not (tmp_path / "new").exists()

    from polytope_lens._outputs import check_destination
    with pytest.raises(InvalidInputError, match="is too long: its temporary sibling"):
        check_destination(tmp_path / ("r" * 250), "report")

    text = json_text({"a": float("nan"), "b": [np.float64("inf"), np.int64(3)], "c": np.array([1.5, np.nan])})
    assert json.loads(text, parse_constant=lambda c: pytest.fail(c)) == {"a": None, "b": [None, 3], "c": [1.5, None]}


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


def test_photo_count_is_the_augmented_sets():
    """The estimate's EfficientNet-Lite0 prediction-1 items are the augmented photo set's length (it said 25 while
    the set holds every bundled photo in five forms)."""
    from polytope_lens.reproduce import _augmented_photos, _n_photos

    photos = _augmented_photos()
    assert _n_photos() == len(photos) == 5 * len(set(photos.labels.tolist()))


def test_the_estimate_counts_training_a_cnn_that_is_not_cached(tmp_path, monkeypatch):
    """With an empty weights cache the quick run's estimate adds the two CNNs' training (7 + 16 s measured); with
    their weights cached it does not (a tester saw "0.1 min" printed before a 38 s cold run)."""
    from polytope_lens.models.embedded import cached_weights
    from polytope_lens.reproduce import JOBS, QUICK, estimate_seconds

    jobs = ["digits-cnn", "fashion-cnn"]
    monkeypatch.setenv("POLYTOPE_LENS_CACHE", str(tmp_path))
    cold = estimate_seconds(QUICK, jobs, quick=True)
    for m in jobs:
        cached_weights(m).parent.mkdir(parents=True, exist_ok=True)
        cached_weights(m).write_bytes(b"")
    warm = estimate_seconds(QUICK, jobs, quick=True)
    assert cold - warm == pytest.approx(sum(JOBS[m]["cost"]["train"] for m in jobs))
