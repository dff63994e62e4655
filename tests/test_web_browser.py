"""End to end: `celltally serve` as a real process, driven by Debian's headless Chromium."""

from __future__ import annotations

import base64
import contextlib
import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image
from typer.testing import CliRunner

from celltally.batch import COUNT_COLUMNS
from celltally.cli import app
from celltally.counter import CellCounter
from celltally.simulate import simulate_scene

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TIFF_NAME = "SIMCEPImages_C05_C20_F1_s01_w1.TIF"
PNG_NAME = "SIMCEPImages_D07_C35_F1_s02_w1.png"

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="/usr/bin/chromium is absent (apt-get install chromium)"
)
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is absent")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    """`celltally serve --model <tiny>` on a free localhost port; yields its base URL."""
    with serving(tiny_model, tmp_path_factory.mktemp("server")) as url:
        yield url


@contextlib.contextmanager
def serving(model: Path, folder: Path) -> Iterator[str]:
    """`celltally serve --model MODEL` on a free localhost port, its log in ``folder``."""
    port = free_port()
    log = folder / "server.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "celltally.cli", "serve", "--port", str(port)]
    command += ["--model", str(model), "--threads", "1"]
    with log.open("w") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    try:
        while True:
            if process.poll() is not None:
                pytest.fail(f"celltally serve exited early:\n{log.read_text()}")
            try:
                with urllib.request.urlopen(f"{url}/api/info", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"celltally serve did not answer in 90 s:\n{log.read_text()}")
            time.sleep(0.3)
        yield url
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def images(tmp_path_factory, tiny_model):
    """A TIFF and a PNG of simulated cells, a text file, and the library's counts."""
    folder = tmp_path_factory.mktemp("uploads")
    tiff = simulate_scene(20, seed=5).image
    png = simulate_scene(35, size=(260, 348), seed=6).image
    tifffile.imwrite(folder / TIFF_NAME, tiff)
    Image.fromarray(png).save(folder / PNG_NAME)
    (folder / "notes.txt").write_text("not an image")
    counter = CellCounter.from_pretrained(tiny_model)
    expected = {TIFF_NAME: counter.count(tiff), PNG_NAME: counter.count(png)}
    return folder, expected


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        yield chromium
        chromium.close()


def drop_file(page, path: Path, mime: str) -> None:
    """Drop a file on the drop zone the way a desktop drag-and-drop does."""
    payload = base64.b64encode(path.read_bytes()).decode("ascii")
    page.evaluate(
        """([name, mime, payload]) => {
            const bytes = Uint8Array.from(atob(payload), (c) => c.charCodeAt(0));
            const data = new DataTransfer();
            data.items.add(new File([bytes], name, { type: mime }));
            const zone = document.getElementById("drop");
            zone.dispatchEvent(new DragEvent("drop", { dataTransfer: data, bubbles: true }));
        }""",
        [path.name, mime, payload],
    )


def wait_for_batch(page, total: int) -> None:
    page.wait_for_function(
        """(total) => document.querySelectorAll(
            '.card[data-state="done"], .card[data-state="failed"], '
            + '.card[data-state="superseded"]').length === total
            && document.body.dataset.busy === "no" """,
        arg=total,
        timeout=60_000,
    )


def download(page, button: str, path: Path) -> list[dict]:
    """Click a download ``button`` (#csv, #wells-csv), save the file at ``path``, read its rows."""
    with page.expect_download() as download_info:
        page.click(button)
    download_info.value.save_as(path)
    return list(csv.DictReader(path.open(newline="")))


def card(page, name: str):
    return page.locator(f'.card[data-name="{name}"]')


def count_one(browser, server: str, path: Path, *, model: str, **fields: str):
    """Open the page, pick ``model``, fill the form ``fields`` (id: value), count ``path``;
    the context (close it), the page and the file's card, counted."""
    context = browser.new_context(accept_downloads=True)
    page = context.new_page()
    page.goto(server)
    page.select_option("#model", model)
    for field, value in fields.items():
        page.fill(f"#{field}", value)
    page.set_input_files("#file-input", [str(path)])
    wait_for_batch(page, 1)
    item = card(page, path.name)
    assert item.get_attribute("data-state") == "done"
    return context, page, item


def test_desktop_upload_count_maps_table_plate_csv(server, images, browser, tmp_path):
    folder, expected = images
    context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    page.on("requestfailed", lambda request: errors.append(f"failed: {request.url}"))
    page.goto(server)
    sync_api.expect(page.locator("#model-name")).to_have_text("tiny")

    drop_file(page, folder / TIFF_NAME, "image/tiff")
    page.set_input_files("#file-input", [str(folder / PNG_NAME), str(folder / "notes.txt")])
    wait_for_batch(page, 3)
    sync_api.expect(page.locator("#progress-text")).to_have_text("3 of 3 images done (1 failed)")

    for name, result in expected.items():
        item = card(page, name)
        assert item.get_attribute("data-state") == "done"
        half = result.half_width
        sync_api.expect(item.locator(".count")).to_have_text(f"{result.count:.1f} ± {half:.1f}")
        sync_api.expect(item.locator(".interval")).to_contain_text(
            f"95% interval {result.low:.1f}–{result.high:.1f}"
        )
        for key in ("input", "mask", "uncertainty", "saliency"):
            width = item.locator(f".{key}-img").evaluate(
                "img => img.decode().then(() => img.naturalWidth)"
            )
            assert width > 0, (name, key)
        # The untrained test model is far from its (absent) calibration: a warning.
        if result.warning:
            sync_api.expect(item.locator(".badge.warn")).to_be_visible()

    failed = card(page, "notes.txt")
    assert failed.get_attribute("data-state") == "failed"
    sync_api.expect(failed.locator(".error")).to_contain_text("notes.txt: unsupported file type")

    # Toggle one card to the mask alone, then back to all four maps.
    tiff_card = card(page, TIFF_NAME)
    tiff_card.locator('.tabs button[data-view="mask"]').click()
    sync_api.expect(tiff_card.locator('figure[data-map="mask"]')).to_be_visible()
    sync_api.expect(tiff_card.locator('figure[data-map="input"]')).to_be_hidden()
    tiff_card.locator('.tabs button[data-view="all"]').click()
    sync_api.expect(tiff_card.locator('figure[data-map="input"]')).to_be_visible()

    first_cells = page.locator("#table tbody tr td:first-child").all_text_contents()
    assert first_cells == [TIFF_NAME, PNG_NAME, "notes.txt"]  # upload order
    sync_api.expect(page.locator("#plate")).to_be_visible()
    well = page.locator('#plate-grid .well[data-well="C05"]')
    assert well.get_attribute("data-count") == f"{expected[TIFF_NAME].count:.1f}"
    assert page.locator("#plate-grid .well").count() == 96  # a 96-well plate: A-H x 1-12

    csv_path = tmp_path / "results.csv"
    rows = download(page, "#csv", csv_path)
    assert sorted(r["file"] for r in rows) == sorted([TIFF_NAME, PNG_NAME, "notes.txt"])
    by_file = {r["file"]: r for r in rows}
    assert float(by_file[TIFF_NAME]["count"]) == pytest.approx(expected[TIFF_NAME].count, abs=1e-3)
    assert by_file[TIFF_NAME]["well"] == "C05" and by_file[TIFF_NAME]["true_count"] == "20"
    assert by_file[TIFF_NAME]["model"] == "tiny"  # which model counted it travels with the CSV
    assert "unsupported" in by_file["notes.txt"]["problem"] and by_file["notes.txt"]["count"] == ""
    # the columns of `celltally count`'s results, so `celltally wells` reads the page's file
    assert list(rows[0])[: len(COUNT_COLUMNS)] == COUNT_COLUMNS
    assert float(by_file[TIFF_NAME]["error"]) == pytest.approx(
        expected[TIFF_NAME].count - 20, abs=0.01
    )
    wells = CliRunner().invoke(
        app, ["wells", str(csv_path), "-o", str(tmp_path / "w.csv"), "--correlation", "0.1"]
    )
    assert wells.exit_code == 0, wells.output  # notes.txt's failed row is no obstacle
    assert "2 well total(s)" in wells.output
    # each result names the model and level it was counted with
    sync_api.expect(card(page, TIFF_NAME).locator(".interval")).to_contain_text("model tiny")
    made = page.locator("#table tbody tr").first.locator("td").nth(3)
    sync_api.expect(made).to_have_text("tiny · 95%")

    page.screenshot(path=str(tmp_path / "desktop.png"), full_page=True)
    # The browser logs the (expected) 415 answer for notes.txt; nothing else may fail.
    assert [e for e in errors if "status of 415" not in e] == []
    context.close()


def test_phone_viewport(server, images, browser, tmp_path):
    folder, expected = images
    context = browser.new_context(
        viewport={"width": 390, "height": 844},
        device_scale_factor=2,
        is_mobile=True,
        has_touch=True,
    )
    page = context.new_page()
    page.goto(server)
    page.set_input_files("#file-input", [str(folder / TIFF_NAME)])
    wait_for_batch(page, 1)
    item = card(page, TIFF_NAME)
    result = expected[TIFF_NAME]
    sync_api.expect(item.locator(".count")).to_have_text(
        f"{result.count:.1f} ± {result.half_width:.1f}"
    )
    assert item.locator(".mask-img").evaluate("img => img.decode().then(() => img.naturalWidth)")
    # Nothing wider than the phone's screen (the plate map scrolls inside its own box).
    overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0, f"page is {overflow}px wider than a 390px phone screen"
    page.screenshot(path=str(tmp_path / "phone.png"), full_page=True)
    context.close()


def test_server_api_from_outside(server, images):
    """The running server answers the JSON API too (a plain urllib client)."""
    with urllib.request.urlopen(f"{server}/api/models", timeout=10) as response:
        models = json.load(response)
    assert models["active"]["name"] == "tiny"
    folder, _ = images
    boundary = "xXx"
    data = (folder / TIFF_NAME).read_bytes()
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="files"; '
            f'filename="{TIFF_NAME}"\r\nContent-Type: image/tiff\r\n\r\n'
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    request = urllib.request.Request(
        f"{server}/api/count",
        data=body,
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        result = json.load(response)["results"][0]
    assert result["ok"] and np.isfinite(result["count"])


def test_channel_field_counts_one_plane_of_a_multichannel_tiff(
    server, browser, tiny_model, tmp_path
):
    """A 2-channel TIFF fails with a message naming the field, then counts once a plane is set."""
    scene = simulate_scene(20, seed=5).image
    path = tmp_path / "two_channels.tif"
    tifffile.imwrite(path, np.stack([np.zeros_like(scene), scene]), photometric="minisblack")
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.goto(server)
    sync_api.expect(page.locator("#model-name")).to_have_text("tiny")
    page.set_input_files("#file-input", [str(path)])
    wait_for_batch(page, 1)
    item = card(page, path.name)
    assert item.get_attribute("data-state") == "failed"
    sync_api.expect(item.locator(".error")).to_contain_text(
        "choose the one to count with channel 0-1"
    )

    page.fill("#channel", "1")
    page.set_input_files("#file-input", [str(path)])
    page.wait_for_function(
        """() => document.querySelectorAll('.card[data-state="done"]').length === 1
            && document.body.dataset.busy === "no" """,
        timeout=60_000,
    )
    done = page.locator('.card[data-state="done"]')
    assert done.get_attribute("data-name") == path.name
    result = CellCounter.from_pretrained(tiny_model).count(scene)  # the plane alone
    half = result.half_width
    sync_api.expect(done.locator(".count")).to_have_text(f"{result.count:.1f} ± {half:.1f}")
    context.close()


def test_per_well_totals_in_the_page(server, browser, tiny_model, tmp_path):
    """Two sites of one well: the page sums them as `celltally wells` does."""
    from celltally.batch import result_row
    from celltally.wells import DEFAULT_CORRELATION, aggregate_wells

    counter = CellCounter.from_pretrained(tiny_model)
    paths = []
    for site, n in ((1, 12), (2, 30)):
        path = tmp_path / f"Screen1_B02_s{site}_w1.tif"
        tifffile.imwrite(path, simulate_scene(n, seed=40 + site).image)
        paths.append(path)
    rows = [result_row(p, counter.count(p), model_name="tiny") for p in paths]
    (expected,), _ = aggregate_wells(rows, correlation=DEFAULT_CORRELATION)
    info = json.loads(urllib.request.urlopen(f"{server}/api/info", timeout=10).read())
    assert info["well_correlation"] == DEFAULT_CORRELATION  # the tiny model measured none

    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.goto(server)
    sync_api.expect(page.locator("#model-name")).to_have_text("tiny")
    page.set_input_files("#file-input", [str(p) for p in paths])
    wait_for_batch(page, 2)
    row = page.locator('#well-totals tbody tr[data-well="B02"]')
    cells = row.locator("td").all_text_contents()
    two_flagged = sum(bool(r["warning"]) for r in rows)
    assert cells[:3] == [
        "Screen1 B02",
        "w1",
        "2" + (f" ({two_flagged} unusual)" if two_flagged else ""),
    ]
    total, half = (float(v) for v in cells[3].split(" ± "))
    low, high = (float(v) for v in cells[4].split("–"))
    assert total == pytest.approx(expected["count"], abs=0.06)
    assert high == pytest.approx(expected["high"], abs=0.06)
    assert low == pytest.approx(expected["low"], abs=0.06)
    assert half == pytest.approx((expected["high"] - expected["count"]), abs=0.06)
    # the totals download as `celltally wells` writes them
    wells_path = tmp_path / "wells.csv"
    (got,) = download(page, "#wells-csv", wells_path)
    assert (got["plate"], got["well"], got["stain"], got["images"], got["sites"]) == (
        "Screen1",
        "B02",
        "1",
        "2",
        "1;2",
    )
    for column in ("count", "std", "low", "high", "mean_per_image", "correlation"):
        assert float(got[column]) == pytest.approx(float(expected[column]), abs=0.06), column
    # what the model is for, and what the interval means, are on the page
    sync_api.expect(page.locator("#model-use")).to_have_text("")  # the tiny model: no line
    assert "95 of 100 images" in page.locator("#upload-panel").inner_text()
    # the same site uploaded again is flagged; a second plate gets its own map
    other = tmp_path / "Screen2_C03_s1_w1.tif"
    tifffile.imwrite(other, simulate_scene(8, seed=45).image)
    page.set_input_files("#file-input", [str(paths[0]), str(other)])
    wait_for_batch(page, 4)
    images = row.locator("td").nth(2)
    flagged = 2 * bool(rows[0]["warning"]) + bool(rows[1]["warning"])
    unusual = f" ({flagged} unusual)" if flagged else ""
    sync_api.expect(images).to_have_text(f"3 (site 1 more than once){unusual}")
    by_well = {w["well"]: w for w in download(page, "#wells-csv", wells_path)}
    # as `celltally wells` lists them: each site once, in order (uploaded 1, 2, 1)
    assert (by_well["B02"]["sites"], by_well["B02"]["repeated_sites"]) == ("1;2", "1")
    pick = page.locator("#plate-select")
    sync_api.expect(pick).to_be_visible()
    views = ["Screen1 · w1 · tiny · 95%", "Screen2 · w1 · tiny · 95%"]
    assert pick.locator("option").all_text_contents() == views
    assert page.locator('#plate-grid .well.has[data-well="B02"]').count() == 1
    assert page.locator('#plate-grid .well.has[data-well="C03"]').count() == 0
    if flagged:  # a well with unusual images is outlined on the map
        assert page.locator('#plate-grid .well.flagged[data-well="B02"]').count() == 1
    # a well's count and notes are read without a mouse: Tab to it, the line below says them
    well = page.locator('#plate-grid .well.has[data-well="B02"]')
    assert well.get_attribute("tabindex") == "0" and well.get_attribute("role") == "button"
    well.focus()
    sync_api.expect(page.locator("#well-detail")).to_contain_text("B02: ")
    sync_api.expect(page.locator("#well-detail")).to_contain_text("cells (mean of 3 images)")
    assert page.locator('#plate-grid .well[data-well="A01"]').get_attribute("tabindex") is None
    pick.select_option(label=views[1])
    assert page.locator('#plate-grid .well.has[data-well="C03"]').count() == 1
    assert page.locator('#plate-grid .well.has[data-well="B02"]').count() == 0
    # a site that cannot be read: its well's total says what it leaves out
    broken = tmp_path / "Screen1_B02_s3_w1.tif"
    broken.write_bytes(b"II*\x00 not really a tiff")
    page.set_input_files("#file-input", [str(broken)])
    wait_for_batch(page, 5)
    pick.select_option(label=views[0])
    sync_api.expect(images).to_have_text(f"3 (site 1 more than once){unusual} + 1 not counted")
    assert "incomplete" in (row.get_attribute("class") or "")
    assert page.locator('#plate-grid .well.failed[data-well="B02"]').count() == 1
    # the file added again and counted: its failure no longer stands; another stain of
    # the same well is a map of its own, not averaged in
    tifffile.imwrite(broken, simulate_scene(15, seed=46).image)
    stain2 = tmp_path / "Screen1_B02_s1_w2.tif"
    tifffile.imwrite(stain2, simulate_scene(40, seed=47).image)
    page.set_input_files("#file-input", [str(broken), str(stain2)])
    wait_for_batch(page, 7)
    sync_api.expect(images).not_to_contain_text("not counted")
    sync_api.expect(images).to_contain_text("4 (site 1 more than once)")
    assert page.locator('#plate-grid .well.failed[data-well="B02"]').count() == 0
    assert card(page, broken.name).first.get_attribute("data-state") == "superseded"
    sync_api.expect(page.locator("#progress-text")).not_to_contain_text("failed")
    exported = download(page, "#csv", tmp_path / "again.csv")
    assert [r["problem"] for r in exported if r["file"] == broken.name] == [""]
    assert pick.locator("option").all_text_contents() == [*views, "Screen1 · w2 · tiny · 95%"]
    # a failure of a file already counted does not stand either (as `celltally wells` reads
    # the CSV); a failure of a stain with no counted image marks its plate's map
    late = tmp_path / "late"
    late.mkdir()
    (late / paths[1].name).write_bytes(b"II*\x00 broken")
    (late / "Screen2_C03_s1_w2.tif").write_bytes(b"II*\x00 broken")
    page.set_input_files(
        "#file-input", [str(late / paths[1].name), str(late / "Screen2_C03_s1_w2.tif")]
    )
    wait_for_batch(page, 9)
    assert card(page, paths[1].name).last.get_attribute("data-state") == "superseded"
    sync_api.expect(images).not_to_contain_text("not counted")
    pick.select_option(label=views[1])
    assert page.locator('#plate-grid .well.failed[data-well="C03"]').count() == 1
    pick.select_option(label=views[0])
    # a time lapse: each time point's well is totalled apart, as `celltally wells` does;
    # names that carry their counts give the true total and the error, as there too
    lapse = []
    for t in (1, 2):
        path = tmp_path / f"Lapse_D04_C{10 + t}_s1_t0{t}_w1.tif"
        tifffile.imwrite(path, simulate_scene(10 + t, seed=50 + t).image)
        lapse.append(path)
    page.set_input_files("#file-input", [str(p) for p in lapse])
    wait_for_batch(page, 11)
    labels = page.locator('#well-totals tbody tr[data-well="D04"] td:first-child')
    assert sorted(labels.all_text_contents()) == ["Lapse t01 D04", "Lapse t02 D04"]
    totals = download(page, "#wells-csv", wells_path)
    truths = {w["plate"]: (w["true_count"], w["error"], w["count"]) for w in totals}
    for t in (1, 2):
        true, error, count = truths[f"Lapse t0{t}"]
        assert float(true) == 10 + t
        assert float(error) == pytest.approx(float(count) - (10 + t), abs=0.011)
    assert (by_well["B02"]["true_count"], by_well["B02"]["error"]) == ("", "")  # no _C<n>_
    context.close()


def test_api_docs_render_without_internet(server, images, browser):
    """/docs draws the API from the installed Swagger UI: no request leaves the machine;
    its "Try it out" counts a file as it comes (no example values in the optional fields)."""
    context = browser.new_context()
    page = context.new_page()
    outside = []
    page.on(
        "request",
        lambda r: outside.append(r.url) if not r.url.startswith(server) else None,
    )
    page.goto(f"{server}/docs")
    sync_api.expect(page.locator(".opblock-summary-path", has_text="/api/count")).to_be_visible(
        timeout=30_000
    )
    assert outside == []
    page.locator(".opblock-summary-path", has_text="/api/count").click()
    page.locator("button.try-out__btn").click()
    for field in ("model", "channel", "rescale", "diameter", "pixel_size"):
        assert page.locator(f'.opblock-body input[placeholder="{field}"]').input_value() == ""
    folder, _ = images
    page.locator(".opblock-body input[type=file]").set_input_files(str(folder / TIFF_NAME))
    page.locator("button.execute").click()
    status = page.locator(".live-responses-table tr.response .response-col_status").first
    sync_api.expect(status).to_have_text("200", timeout=60_000)
    context.close()


def test_the_page_counts_with_the_model_picked(server, images, browser, tmp_path):
    folder, _ = images
    expected = CellCounter.from_pretrained("nuclei").count(folder / PNG_NAME).count
    context = browser.new_context(accept_downloads=True)
    page = context.new_page()
    page.goto(server)
    sync_api.expect(page.locator("#model option")).to_have_count(1 + 2)  # tiny + shipped
    page.select_option("#model", "nuclei")
    sync_api.expect(page.locator("#model-use")).to_contain_text("nuclei: for fluorescent nuclei")
    page.set_input_files("#file-input", [str(folder / PNG_NAME)])
    wait_for_batch(page, 1)
    shown = card(page, PNG_NAME).locator(".count").text_content()
    assert float(shown.split()[0]) == pytest.approx(expected, abs=0.051)
    (row,) = download(page, "#csv", tmp_path / "picked.csv")
    assert row["model"] == "nuclei"
    context.close()


def test_the_page_counts_binned_images_with_the_rescale_set(server, browser, tmp_path):
    from skimage.transform import rescale

    full = simulate_scene(60, stain=2, seed=7).image.astype(np.float32)
    binned = np.round(rescale(full, 0.5, anti_aliasing=True, preserve_range=True))
    path = tmp_path / "binned_w2.tif"
    tifffile.imwrite(path, binned.astype(np.uint8))
    expected = CellCounter.from_pretrained("bbbc005", rescale=2.0).count(path).count
    context, page, item = count_one(browser, server, path, model="bbbc005", rescale="2")
    shown = item.locator(".count").text_content()
    assert float(shown.split()[0]) == pytest.approx(expected, abs=0.051)
    # the ensemble box: the same file (another name) with the ensemble's interval
    again = tmp_path / "binned_w2_ensemble.tif"
    again.write_bytes(path.read_bytes())
    ensemble = CellCounter.from_pretrained("bbbc005", rescale=2.0, epistemic=True).count(again)
    page.check("#epistemic")
    page.set_input_files("#file-input", [str(again)])
    wait_for_batch(page, 2)
    text = f"{ensemble.count:.1f} ± {ensemble.half_width:.1f}"
    sync_api.expect(card(page, again.name).locator(".count")).to_have_text(text)
    # each result says how it was counted, on its card and in the CSV
    sync_api.expect(item.locator(".interval")).to_contain_text("model bbbc005 ×2")
    sync_api.expect(card(page, again.name).locator(".interval")).to_contain_text(
        "model bbbc005 ensemble ×2 · its ensemble's 95% intervals held 95% of held-out truths"
    )
    sync_api.expect(item.locator(".interval")).not_to_contain_text("held-out")
    rows = {r["file"]: r for r in download(page, "#csv", tmp_path / "settings.csv")}
    assert (rows[path.name]["rescale"], rows[path.name]["epistemic"]) == ("2", "false")
    assert (rows[again.name]["rescale"], rows[again.name]["epistemic"]) == ("2", "true")
    assert rows[again.name]["model"] == "bbbc005"  # the name `celltally wells` looks up
    context.close()


def test_a_factor_the_page_cannot_read_is_refused_at_its_field(server, images, browser):
    folder, _ = images
    context = browser.new_context()
    page = context.new_page()
    page.goto(server)
    sync_api.expect(page.locator("#model-name")).to_have_text("tiny")
    page.fill("#rescale", "-1")  # below the field's minimum: the browser would send ""
    page.set_input_files("#file-input", [str(folder / PNG_NAME)])
    page.wait_for_timeout(500)
    assert page.locator(".card").count() == 0  # nothing counted at the model's own scale
    assert page.evaluate("document.getElementById('rescale').validity.rangeUnderflow")
    page.fill("#rescale", "")  # left empty: the model's own scale, as before
    page.set_input_files("#file-input", [str(folder / PNG_NAME)])
    wait_for_batch(page, 1)
    assert card(page, PNG_NAME).get_attribute("data-state") == "done"
    # a diameter sets the factor: both at once is refused at the diameter field (shown
    # for a model that records a diameter, as nuclei does)
    sync_api.expect(page.locator("#diameter-field")).to_be_hidden()  # tiny records none
    page.select_option("#model", "nuclei")
    page.fill("#rescale", "2")
    page.fill("#diameter", "30")
    page.set_input_files("#file-input", [str(folder / PNG_NAME)])
    page.wait_for_timeout(500)
    assert page.locator(".card").count() == 1
    assert page.evaluate("document.getElementById('diameter').validity.customError")
    context.close()


def test_the_page_counts_with_a_nucleus_diameter(server, browser, tmp_path):
    from skimage.transform import rescale

    nuclei = simulate_scene(15, stain=1, size=(130, 174), bit_depth=16, seed=6).image
    path = tmp_path / "large_nuclei.tif"
    large = np.round(rescale(nuclei.astype(np.float32), 2.0, preserve_range=True))
    tifffile.imwrite(path, large.astype(np.uint16))
    expected = CellCounter.from_pretrained("nuclei", diameter=56.6).count(path)
    context, page, item = count_one(browser, server, path, model="nuclei", diameter="56.6")
    text = f"{expected.count:.1f} ± {expected.half_width:.1f}"
    sync_api.expect(item.locator(".count")).to_have_text(text)
    sync_api.expect(item.locator(".interval")).to_contain_text("model nuclei ×0.5 (⌀ 56.6 px)")
    (row,) = download(page, "#csv", tmp_path / "diameter.csv")
    assert (row["rescale"], row["diameter"], row["model"]) == ("0.5", "56.6", "nuclei")
    assert page.get_attribute("#diameter", "placeholder") == "px (model: 28.3)"
    sync_api.expect(page.locator("#model-name")).to_have_text("nuclei")  # the one picked
    # a model that records no diameter (the tiny one) offers no Diameter field
    page.select_option("#model", "tiny")
    sync_api.expect(page.locator("#diameter-field")).to_be_hidden()
    assert page.input_value("#diameter") == ""
    sync_api.expect(page.locator("#model-name")).to_have_text("tiny")
    context.close()


def test_the_page_offers_a_pixel_size_for_a_model_that_records_one(
    pixel_size_model, browser, tmp_path
):
    image = simulate_scene(12, size=(130, 174), seed=9).image  # 2 x 2-binned BBBC005 frame
    path = tmp_path / "binned.tif"
    tifffile.imwrite(path, image)
    expected = CellCounter.from_pretrained(pixel_size_model, pixel_size=1.3).count(path)
    with serving(pixel_size_model, tmp_path) as url:
        context = browser.new_context(accept_downloads=True)
        page = context.new_page()
        page.goto(url)
        sync_api.expect(page.locator("#model-name")).to_have_text("bbbc005_um")
        field = page.locator("#pixel-size-field")
        sync_api.expect(field).to_be_visible()
        assert page.get_attribute("#pixel-size", "placeholder") == "µm (model: 0.65)"
        # the model records no diameter: no Diameter field; with a rescale too, refused at
        # the later field, nothing sent
        sync_api.expect(page.locator("#diameter-field")).to_be_hidden()
        page.fill("#rescale", "2")
        page.fill("#pixel-size", "1.3")
        page.set_input_files("#file-input", [str(path)])
        page.wait_for_timeout(500)
        assert page.locator(".card").count() == 0
        assert page.evaluate("document.getElementById('pixel-size').validity.customError")
        page.fill("#rescale", "")
        page.set_input_files("#file-input", [str(path)])
        wait_for_batch(page, 1)
        item = card(page, path.name)
        assert item.get_attribute("data-state") == "done"
        sync_api.expect(item.locator(".count")).to_contain_text(f"{expected.count:.1f} ± ")
        sync_api.expect(item.locator(".interval")).to_contain_text("×2 (1.3 µm pixels)")
        (row,) = download(page, "#csv", tmp_path / "pixels.csv")
        assert (row["rescale"], row["pixel_size"], row["diameter"]) == ("2", "1.3", "")
        # a model that records no pixel size: the field is hidden, and emptied
        page.select_option("#model", "nuclei")
        sync_api.expect(field).to_be_hidden()
        assert page.input_value("#pixel-size") == ""
        context.close()


def test_a_well_with_fewer_images_than_its_plates_others_is_marked(server, browser, tmp_path):
    paths = []
    for well, sites in (("B02", (1, 2)), ("B03", (1, 2)), ("B04", (1,))):
        for site in sites:
            path = tmp_path / f"Screen1_{well}_s{site}_w1.tif"
            tifffile.imwrite(path, simulate_scene(5, seed=site).image)
            paths.append(path)
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.goto(server)
    page.set_input_files("#file-input", [str(p) for p in paths])
    wait_for_batch(page, 5)
    short = page.locator('#well-totals tbody tr[data-well="B04"]')
    # as `celltally wells` warns: B04's total covers one site where the others cover two
    expected = "(fewer than the 2 of most wells on its plate)"
    sync_api.expect(short.locator("td").nth(2)).to_contain_text(expected)
    assert "incomplete" in (short.get_attribute("class") or "")
    full = page.locator('#well-totals tbody tr[data-well="B03"]')
    sync_api.expect(full.locator("td").nth(2)).not_to_contain_text("fewer")
    assert "incomplete" not in (full.get_attribute("class") or "")
    context.close()


def test_each_channel_of_a_file_is_a_result_of_its_own(server, browser, tiny_model, tmp_path):
    """One file counted at two channels: each says its channel (card, table, CSV), and its
    well is totalled and mapped per channel, never the two stains summed or averaged."""
    planes = [simulate_scene(n, seed=60 + n).image for n in (10, 40)]
    path = tmp_path / "Screen1_B03_s1_w1.tif"
    tifffile.imwrite(path, np.stack(planes), photometric="minisblack")
    counter = CellCounter.from_pretrained(tiny_model)
    expected = [counter.count(plane).count for plane in planes]
    context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    page = context.new_page()
    page.goto(server)
    sync_api.expect(page.locator("#model-name")).to_have_text("tiny")
    for done, channel in enumerate(("0", "1"), start=1):
        page.fill("#channel", channel)
        page.set_input_files("#file-input", [str(path)])
        wait_for_batch(page, done)
    cards = card(page, path.name)
    for i in (0, 1):
        sync_api.expect(cards.nth(i).locator(".interval")).to_contain_text(
            f"model tiny · channel {i}"
        )
    made = page.locator("#table tbody tr td:nth-child(4)").all_text_contents()
    assert made == ["tiny · channel 0 · 95%", "tiny · channel 1 · 95%"]
    rows = download(page, "#csv", tmp_path / "channels.csv")
    assert [r["channel"] for r in rows] == ["0", "1"]
    assert [float(r["count"]) for r in rows] == pytest.approx(expected, abs=1e-3)
    totals = page.locator('#well-totals tbody tr[data-well="B03"]')
    sync_api.expect(totals).to_have_count(2)
    for i in (0, 1):
        images = totals.nth(i).locator("td").nth(2)
        sync_api.expect(images).not_to_contain_text("more than once")
        total = totals.nth(i).locator("td").nth(3).text_content()
        assert float(total.split()[0]) == pytest.approx(expected[i], abs=0.051)
    wells = download(page, "#wells-csv", tmp_path / "channel-wells.csv")
    assert sorted((w["channel"], w["images"]) for w in wells) == [("0", "1"), ("1", "1")]
    pick = page.locator("#plate-select")
    sync_api.expect(pick).to_be_visible()
    views = pick.locator("option").all_text_contents()
    assert views == [f"Screen1 · w1 · tiny · channel {i} · 95%" for i in (0, 1)]
    for i in (0, 1):  # each map shows its channel's count, not the mean of both
        pick.select_option(label=views[i])
        well = page.locator('#plate-grid .well[data-well="B03"]')
        assert well.get_attribute("data-count") == f"{expected[i]:.1f}"
    context.close()


def test_a_frame_that_may_hold_no_cells_is_flagged_as_such(server, browser, tiny_model, tmp_path):
    """Low contrast is said as itself (not "its interval may not hold"), and a count whose
    interval was set to reach 0 is shown with that interval, not a ± that disagrees."""
    path = tmp_path / "Screen1_E05_s1_w1.tif"
    tifffile.imwrite(path, np.full((260, 348), 5, np.uint8))
    result = CellCounter.from_pretrained(tiny_model).count(path)
    assert result.low == 0.0 and result.count - result.low > result.high - result.count
    context, page, item = count_one(browser, server, path, model="tiny")
    sync_api.expect(item.locator(".count")).to_have_text(f"{result.count:.1f}")  # no ±
    sync_api.expect(item.locator(".interval")).to_contain_text(
        f"95% interval {result.low:.1f}–{result.high:.1f}"
    )
    sync_api.expect(item.locator(".badge.warn")).to_have_text("⚠ may hold no cells")
    empty = item.locator('.flags li[data-kind="empty"]')
    sync_api.expect(empty).to_contain_text("May hold no cells: Low contrast")
    sync_api.expect(empty).to_contain_text("Check it before trusting its count")
    sync_api.expect(empty).not_to_contain_text("may not hold")
    if "unlike the calibration images" in result.warning:  # the untrained model's: apart
        unlike = item.locator('.flags li[data-kind="unlike"]')
        sync_api.expect(unlike).to_contain_text("its interval may not hold")
    row = page.locator('#well-totals tbody tr[data-well="E05"]')
    sync_api.expect(row.locator("td").nth(2)).to_contain_text("(1 may hold no cells)")
    # the well's total may lack that frame's count, as the frame's own interval allows
    sync_api.expect(row).to_contain_text(f"0.0–{result.high:.1f}")
    context.close()


@pytest.mark.parametrize("viewport", [(1280, 900), (390, 844)])
def test_long_file_and_plate_names_stay_inside_the_window(server, browser, tmp_path, viewport):
    names = [f"{'VeryLongPlateName' * 6}{k}_B0{k}_s1_w1.tif" for k in (2, 3)]
    for k, name in enumerate(names):
        tifffile.imwrite(tmp_path / name, simulate_scene(5, seed=70 + k).image)
    width, height = viewport
    context = browser.new_context(viewport={"width": width, "height": height})
    page = context.new_page()
    page.goto(server)
    page.set_input_files("#file-input", [str(tmp_path / n) for n in names])
    wait_for_batch(page, 2)
    sync_api.expect(page.locator("#plate-select")).to_be_visible()  # two plates: a select
    overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
    assert overflow <= 0, f"page is {overflow}px wider than a {width}px window"
    select = page.locator("#plate-select")
    fits = (
        "s => s.getBoundingClientRect().right <= s.closest('section').getBoundingClientRect().right"
    )
    assert select.evaluate(fits)
    assert select.get_attribute("title") == select.evaluate("s => s.selectedOptions[0].text")
    first = page.locator("#table tbody tr td:first-child").first
    assert first.get_attribute("title") == names[0]  # the whole name, though it wraps
    if width >= 1280:  # the table fits without scrolling sideways: the name wraps
        wrap = page.locator("#summary .table-wrap")
        assert wrap.evaluate("w => w.scrollWidth <= w.clientWidth")
    context.close()


def test_the_diameter_field_and_hint_speak_of_the_page(server, browser):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.goto(server)
    page.select_option("#model", "nuclei")
    hint = page.locator("#model-use")
    sync_api.expect(hint).to_contain_text("magnifications: set Diameter, or Rescale by 28.3")
    sync_api.expect(hint).not_to_contain_text("--")
    placeholder = page.get_attribute("#diameter", "placeholder")
    assert placeholder == "px (model: 28.3)"
    # the placeholder is read whole: the field is wide enough for its text
    room = page.locator("#diameter").evaluate(
        """(el) => {
            const style = getComputedStyle(el);
            const context = document.createElement("canvas").getContext("2d");
            context.font = style.font;
            const inner = el.clientWidth - parseFloat(style.paddingLeft)
              - parseFloat(style.paddingRight);
            return inner - context.measureText(el.placeholder).width;
        }"""
    )
    assert room >= 16, f"{room:.0f} px to spare: the placeholder is cut"  # and spin buttons
    context.close()


def test_each_cards_map_buttons_are_a_labelled_group_used_by_keyboard(server, images, browser):
    folder, _ = images
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.goto(server)
    page.set_input_files("#file-input", [str(folder / TIFF_NAME)])
    wait_for_batch(page, 1)
    item = card(page, TIFF_NAME)
    group = page.get_by_role("group", name=f"maps of {TIFF_NAME} to show")
    sync_api.expect(group).to_be_visible()
    assert page.locator('[role="tab"], [role="tablist"]').count() == 0  # no tabs sans panels
    buttons = group.get_by_role("button")
    assert buttons.all_text_contents() == ["all", "input", "mask", "uncertainty", "saliency"]
    assert [b.get_attribute("aria-pressed") for b in buttons.all()] == ["true"] + ["false"] * 4
    mask = group.get_by_role("button", name="mask")
    mask.focus()
    page.keyboard.press("Enter")
    sync_api.expect(mask).to_have_attribute("aria-pressed", "true")
    sync_api.expect(item.locator('figure[data-map="input"]')).to_be_hidden()
    page.keyboard.press("Shift+Tab")  # back to "input": Space presses it
    page.keyboard.press("Space")
    sync_api.expect(group.get_by_role("button", name="input")).to_have_attribute(
        "aria-pressed", "true"
    )
    sync_api.expect(mask).to_have_attribute("aria-pressed", "false")
    sync_api.expect(item.locator('figure[data-map="input"]')).to_be_visible()
    context.close()
