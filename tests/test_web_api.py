"""The web API against the real app and the real (tiny, untrained) model."""

from __future__ import annotations

import base64
import io as bytes_io
import pickle

import numpy as np
import pytest
import tifffile
from fastapi.testclient import TestClient
from PIL import Image

from celltally import io
from celltally.counter import CellCounter
from celltally.simulate import simulate_scene
from celltally.web import create_app
from celltally.web.uploads import sanitize_name

BBBC_NAME = "SIMCEPImages_C05_C20_F1_s03_w1.TIF"


def tiff_bytes(array: np.ndarray) -> bytes:
    buffer = bytes_io.BytesIO()
    tifffile.imwrite(buffer, array)
    return buffer.getvalue()


def pil_bytes(array: np.ndarray, fmt: str) -> bytes:
    buffer = bytes_io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


def multipart(parts: list[tuple[str, str | None, bytes]], boundary: str = "b0undary") -> dict:
    """A raw multipart/form-data request (field name, file name or None, bytes).

    Built by hand so that odd file names reach the server unescaped.
    """
    body = b""
    for field, filename, data in parts:
        disposition = f'form-data; name="{field}"'
        if filename is not None:
            disposition += f'; filename="{filename}"'
        body += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode()
        body += data + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    return {
        "content": body,
        "headers": {"content-type": f"multipart/form-data; boundary={boundary}"},
    }


def decode_data_url(url: str) -> Image.Image:
    prefix = "data:image/png;base64,"
    assert url.startswith(prefix)
    image = Image.open(bytes_io.BytesIO(base64.b64decode(url[len(prefix) :])))
    image.load()
    return image


@pytest.fixture(scope="module")
def scene():
    return simulate_scene(20, size=(260, 348), seed=3)


@pytest.fixture(scope="module")
def counter(tiny_model):
    return CellCounter.from_pretrained(tiny_model)


@pytest.fixture(scope="module")
def client(counter, tmp_path_factory):
    temp = tmp_path_factory.mktemp("web-temp")
    app = create_app(counter, max_files=6, max_bytes=400_000, temp_dir=temp)
    with TestClient(app) as test_client:
        test_client.temp_dir = temp
        yield test_client


def post(client, files, **data):
    return client.post("/api/count", files=[("files", f) for f in files], data=data)


def test_count_one_tiff_matches_the_library(client, counter, scene):
    response = post(client, [(BBBC_NAME, tiff_bytes(scene.image), "image/tiff")])
    assert response.status_code == 200
    body = response.json()
    assert (body["counted"], body["failed"], body["model"]) == (1, 0, "tiny")
    (item,) = body["results"]
    expected = counter.count(scene.image)
    assert item["ok"] and item["status"] == 200 and item["error"] is None
    assert item["name"] == BBBC_NAME
    assert item["count"] == pytest.approx(expected.count, rel=1e-5)
    assert item["low"] == pytest.approx(expected.low, rel=1e-5)
    assert item["high"] == pytest.approx(expected.high, rel=1e-5)
    assert item["low"] <= item["count"] <= item["high"]
    assert item["level"] == 0.95
    assert item["warning"] == (expected.warning or None)
    meta = item["metadata"]
    assert (meta["well"], meta["row"], meta["column"], meta["site"]) == ("C05", "C", 5, 3)
    assert (meta["blur"], meta["stain"], meta["count"]) == (1, 1, 20)
    assert (item["width"], item["height"]) == (348, 260)
    images = item["images"]
    for key in ("input", "mask", "uncertainty", "saliency"):
        png = decode_data_url(images[key])
        assert png.size == (images["width"], images["height"]), key
    assert images["width"] / images["height"] == pytest.approx(348 / 260, rel=0.01)
    mask = np.asarray(decode_data_url(images["mask"]))
    assert mask.ndim == 2 and mask.std() > 0
    assert images["uncertainty_scale"] > 0 and images["saliency_scale"] > 0
    assert np.asarray(decode_data_url(images["saliency"])).shape[-1] == 3


def test_several_formats_keep_their_order(client, scene):
    image16 = (scene.image.astype(np.uint16) * 16).astype(np.uint16)
    files = [
        ("b_16bit.tif", tiff_bytes(image16), "image/tiff"),
        ("a.png", pil_bytes(scene.image, "PNG"), "image/png"),
        ("c.jpg", pil_bytes(scene.image, "JPEG"), "image/jpeg"),
    ]
    response = post(client, files, saliency="false")
    assert response.status_code == 200
    body = response.json()
    assert [r["name"] for r in body["results"]] == ["b_16bit.tif", "a.png", "c.jpg"]
    assert body["counted"] == 3
    counts = [r["count"] for r in body["results"]]
    assert all(np.isfinite(counts))
    # Same scene, percentile normalization: 8-bit PNG and x16 16-bit TIFF count alike.
    assert counts[0] == pytest.approx(counts[1], rel=1e-3)
    assert all(r["images"]["saliency"] is None for r in body["results"])


def test_channel_field_picks_a_plane_of_a_multichannel_tiff(client, scene):
    blank = np.zeros_like(scene.image)
    buffer = bytes_io.BytesIO()
    tifffile.imwrite(buffer, np.stack([blank, scene.image]), photometric="minisblack")
    data = buffer.getvalue()
    # without a channel: refused, naming the form field (never a mean of the stains)
    refused = post(client, [("two.tif", data, "image/tiff")], saliency="0")
    assert refused.status_code == 422
    error = refused.json()["results"][0]["error"]
    assert "2 different channels" in error and "channel 0-1" in error and "--" not in error
    picked = post(client, [("two.tif", data, "image/tiff")], saliency="0", channel="1")
    alone = post(client, [("one.tif", tiff_bytes(scene.image), "image/tiff")], saliency="0")
    assert picked.status_code == 200
    assert picked.json()["results"][0]["count"] == pytest.approx(
        alone.json()["results"][0]["count"]
    )
    out_of_range = post(client, [("two.tif", data, "image/tiff")], saliency="0", channel="2")
    assert "out of range" in out_of_range.json()["results"][0]["error"]
    for bad in ("-1", "x", "1.5"):
        response = post(client, [("two.tif", data, "image/tiff")], channel=bad)
        assert response.status_code == 422
        assert "channel must be a whole number" in response.json()["detail"]


def test_level_changes_the_interval(client, scene):
    data = tiff_bytes(scene.image)
    widths = {}
    for level in ("0.8", "0.99"):
        response = post(client, [("x.tif", data, "image/tiff")], level=level, saliency="0")
        item = response.json()["results"][0]
        assert item["level"] == float(level)
        widths[level] = item["high"] - item["low"]
    assert widths["0.8"] < widths["0.99"]


def test_bad_files_are_reported_and_the_rest_still_count(client, scene):
    stack = np.stack([scene.image[:100, :120]] * 5)
    good = tiff_bytes(scene.image)
    files = [
        ("good.tif", good, "image/tiff"),
        ("corrupt.tif", good[: len(good) // 2], "image/tiff"),
        ("empty.png", b"", "image/png"),
        ("notes.txt", b"cells: many", "text/plain"),
        ("huge.tif", b"\x00" * 400_001, "image/tiff"),
        ("stack.tif", tiff_bytes(stack), "image/tiff"),
    ]
    response = post(client, files, saliency="false")
    assert response.status_code == 200
    body = response.json()
    assert (body["counted"], body["failed"]) == (1, 5)
    by_name = {r["name"]: r for r in body["results"]}
    assert by_name["good.tif"]["ok"]
    expected = {
        "corrupt.tif": (422, "cannot be read as TIFF"),
        "empty.png": (400, "empty"),
        "notes.txt": (415, "unsupported file type '.txt'"),
        "huge.tif": (413, "larger than the limit"),
        "stack.tif": (422, "stack"),
    }
    for name, (status, text) in expected.items():
        item = by_name[name]
        assert not item["ok"] and item["count"] is None, name
        assert item["status"] == status, (name, item)
        assert item["error"].startswith(f"{name}: ") and text in item["error"], item["error"]
        assert "\n" not in item["error"] and "Traceback" not in item["error"]
        assert "/" not in item["error"], "temporary paths must not leak into messages"


def test_a_failed_file_keeps_its_well_so_the_page_can_say_what_its_total_lacks(client, scene):
    good = tiff_bytes(scene.image)
    files = [
        ("SIMCEPImages_D07_C30_F1_s01_w1.TIF", good, "image/tiff"),
        ("SIMCEPImages_D07_C30_F1_s02_w1.TIF", good[:100], "image/tiff"),
        ("SIMCEPImages_D07_C30_F1_s03_w1.txt", b"x", "text/plain"),
    ]
    body = post(client, files, saliency="false").json()
    assert [r["ok"] for r in body["results"]] == [True, False, False]
    for r in body["results"]:
        assert (r["metadata"]["well"], r["metadata"]["stain"]) == ("D07", 1)
    assert [r["metadata"]["site"] for r in body["results"]] == [1, 2, 3]


def test_a_file_whose_client_has_left_is_not_counted(counter, scene, tmp_path):
    from celltally.web.app import _Service
    from celltally.web.uploads import Upload

    path = tmp_path / "scene.tif"
    tifffile.imwrite(path, scene.image)
    upload = Upload(index=0, name="scene.tif", path=path, size=path.stat().st_size)
    service = _Service(counter, saliency=False, display_side=256, max_pixels=10**8)
    gone = service.count_file(upload, 0.95, False, abandoned=lambda: True)
    assert (gone.ok, gone.status) == (False, 499) and "left" in gone.error
    here = service.count_file(upload, 0.95, False, abandoned=lambda: False)
    assert here.ok and here.count == pytest.approx(counter.count(scene.image).count, abs=0.01)


def test_name_fields_as_counting_parses_them(client):
    fields = client.get("/api/name", params={"file": "C:\\x\\Plate1_B03_s2_w1.tif"}).json()
    assert (fields["plate"], fields["well"], fields["site"], fields["stain"]) == (
        "Plate1",
        "B03",
        2,
        1,
    )


def test_the_endpoint_sees_a_client_that_has_left(counter, scene, tmp_path):
    """Through the whole app (middleware included): a disconnect after the upload
    means the file is not counted (BaseHTTPMiddleware used to hide it)."""
    import json

    import anyio

    app = create_app(counter, warmup=False, temp_dir=tmp_path)
    request = multipart([("files", "scene.tif", tiff_bytes(scene.image)), ("saliency", None, b"0")])
    body = request["content"]
    incoming = [{"type": "http.request", "body": body, "more_body": False}]
    sent: list[dict] = []

    async def receive():
        return incoming.pop(0) if incoming else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/api/count",
        "raw_path": b"/api/count",
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"content-type", request["headers"]["content-type"].encode()),
            (b"content-length", str(len(body)).encode()),
        ],
        "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 8000),
    }
    anyio.run(app, scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    assert (b"x-content-type-options", b"nosniff") in start["headers"]  # headers still set
    payload = json.loads(
        b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    )
    (result,) = payload["results"]
    assert (result["ok"], result["status"]) == (False, 499), result


def test_saliency_is_skipped_with_a_note_above_its_pixel_limit(
    counter, scene, tmp_path, monkeypatch
):
    import celltally.web.app as web_app
    from celltally.web.uploads import Upload

    monkeypatch.setattr(web_app, "SALIENCY_MAX_PIXELS", scene.image.size - 1)
    path = tmp_path / "scene.tif"
    tifffile.imwrite(path, scene.image)
    upload = Upload(index=0, name="scene.tif", path=path, size=path.stat().st_size)
    service = web_app._Service(counter, saliency=True, display_side=256, max_pixels=10**8)
    result = service.count_file(upload, 0.95, True)
    assert result.ok and result.images.saliency is None
    assert result.note.startswith("saliency map skipped: 0.1 million pixels")


def test_an_image_too_large_to_explain_is_counted_without_its_saliency_map(
    scene, tmp_path, monkeypatch
):
    """explain's own limit (model-scale pixels, less per ensemble member) decides, as
    explain_image decides: past it the file is counted, its map skipped with a note."""
    import re

    import celltally.explain as explain
    import celltally.web.app as web_app
    from celltally.web.uploads import Upload

    path = tmp_path / "scene.tif"
    tifffile.imwrite(path, scene.image)
    upload = Upload(index=0, name="scene.tif", path=path, size=path.stat().st_size)
    plain = CellCounter.from_pretrained("bbbc005")
    ensemble = CellCounter.from_pretrained("bbbc005", epistemic=True)
    monkeypatch.setattr(explain, "EXPLAIN_MAX_PIXELS", 1)
    problem = explain.too_large_to_explain(plain, scene.image.shape)
    width, height = map(int, re.match(r"is (\d+) x (\d+) px", problem).groups())
    # the helper's canvas is explain_image's: it explains at that size and refuses below it
    monkeypatch.setattr(explain, "EXPLAIN_MAX_PIXELS", width * height)
    assert explain.too_large_to_explain(plain, scene.image.shape) is None
    explain.explain_image(plain, scene.image)
    for counter, limit in ((plain, width * height - 1), (ensemble, width * height)):
        monkeypatch.setattr(explain, "EXPLAIN_MAX_PIXELS", limit)
        assert explain.too_large_to_explain(counter, scene.image.shape) is not None
        with pytest.raises(io.InputError, match="too large to explain"):
            explain.explain_image(counter, scene.image)
    # the ensemble (at the limit the model alone fits): counted, the map left out
    service = web_app._Service(ensemble, saliency=True, display_side=256, max_pixels=10**8)
    result = service.count_file(upload, 0.95, True)
    assert result.ok, result.error
    assert result.count == pytest.approx(ensemble.count(scene.image).count, rel=1e-4)
    assert result.images.saliency is None
    assert result.note.startswith("saliency map skipped: the image is ")
    assert "with 2 ensemble members" in result.note and result.note.endswith("not affected")
    assert "celltally" not in result.note and "crop" not in result.note  # no command line
    # were explain to refuse anyway, the failure names the file once
    monkeypatch.setattr(explain, "too_large_to_explain", lambda counter, shape: None)
    failed = service.count_file(upload, 0.95, True)
    assert not failed.ok and failed.error.startswith("scene.tif: is ")
    assert failed.error.count("scene.tif") == 1, failed.error


def test_warning_flags_say_what_each_part_of_a_warning_is():
    from celltally.calibration import ood_warning
    from celltally.web.app import warning_flags

    limits = {"mask_std": 0.2, "feature_distance": 1.0, "size_shift": 0.2, "quantile": 0.99}

    def flags(**features):
        return warning_flags(ood_warning(features, limits, rescale=1.0))

    assert flags(mask_std=0.1) == []
    # a frame that may be empty: said so, with no "may not hold" (its interval reaches 0)
    (empty,) = flags(contrast=0.5)
    assert (empty.kind, empty.title) == ("empty", "may hold no cells")
    assert empty.text.startswith("Low contrast (range 0.50 of the empty-frame floor): ")
    assert "Check it" in empty.text and "may not hold" not in empty.text
    both = flags(contrast=0.5, mask_std=0.3)
    assert [f.kind for f in both] == ["empty", "unlike"]
    assert "so its interval may not hold (mean per-pixel mask uncertainty 0.3 > 0.2" in (
        both[1].text
    )
    # a likely cause is advice of its own, not the end of a generic sentence
    unlike, bright = flags(mask_std=0.3, background=0.9)
    assert (unlike.kind, bright.kind) == ("unlike", "bright")
    assert bright.text.startswith("Most of the frame is bright") and "invert it" in bright.text
    assert "(" in unlike.text and "invert" not in unlike.text
    _, size = flags(mask_std=0.3, size_ratio=2.0, size_shift=1.0)
    assert (size.kind, size.rescale) == ("size", 0.5)
    assert size.text == (
        "Its objects look 2x as wide as the calibration images': if it was taken at another "
        "magnification, count it again with Rescale set to about 0.5."
    )
    (other,) = warning_flags("something new")  # words the page does not know: as they are
    assert (other.kind, other.text) == ("other", "something new")


def test_the_answer_gives_the_channel_and_each_files_flags(client, scene):
    buffer = bytes_io.BytesIO()
    tifffile.imwrite(buffer, np.stack([scene.image, scene.image[::-1]]), photometric="minisblack")
    data = buffer.getvalue()
    answers = [
        post(client, [("two.tif", data, "image/tiff")], saliency="0", channel=c).json()
        for c in ("0", "1")
    ]
    assert [a["channel"] for a in answers] == [0, 1]
    plain = post(client, [("one.tif", tiff_bytes(scene.image), "image/tiff")], saliency="0")
    body = plain.json()
    assert body["channel"] is None  # none given: the file's only channel
    (item,) = body["results"]
    from celltally.web.app import warning_flags

    expected = [f.model_dump() for f in warning_flags(item["warning"] or "")]
    assert item["flags"] == expected


@pytest.mark.parametrize("shape", [(8, 8), (40, 696)])
def test_a_small_image_or_strip_counts_with_saliency(client, shape):
    image = np.full(shape, 5, np.uint8)
    response = post(client, [("small.png", pil_bytes(image, "PNG"), "image/png")], saliency="true")
    assert response.status_code == 200, response.text
    (result,) = response.json()["results"]
    assert result["ok"] and result["images"]["saliency"], result


@pytest.mark.parametrize(
    ("files", "status", "text"),
    [
        ([("a.txt", b"x", "text/plain"), ("b.csv", b"1,2", "text/csv")], 415, "unsupported"),
        ([("bad.tif", b"not a tiff at all", "image/tiff")], 422, "bad.tif"),
        ([("e.tif", b"", "image/tiff")], 400, "empty"),
        ([("e.tif", b"", "image/tiff"), ("a.txt", b"x", "text/plain")], 422, "a.txt"),
    ],
)
def test_nothing_counted_gives_a_4xx_with_per_file_errors(client, files, status, text):
    response = post(client, files)
    assert response.status_code == status
    body = response.json()
    assert body["counted"] == 0 and len(body["results"]) == len(files)
    assert text in body["detail"]


def test_too_many_files(client, scene):
    data = tiff_bytes(scene.image)
    response = post(client, [(f"{i}.tif", data, "image/tiff") for i in range(7)])
    assert response.status_code == 413
    assert "too many files" in response.json()["detail"]
    assert "6" in response.json()["detail"]


def test_body_over_the_total_limit_is_refused_early(client):
    # 6 files x 400 kB + 1 MiB of headers is the most this app accepts.
    body = b"x" * 4_000_000
    response = client.post(
        "/api/count",
        content=body,
        headers={"content-type": "multipart/form-data; boundary=abc"},
    )
    assert response.status_code == 413
    assert "larger than the limit" in response.json()["detail"]


@pytest.mark.parametrize(
    ("kwargs", "status", "text"),
    [
        (multipart([("level", None, b"0.9")]), 422, "no files"),
        (multipart([("files", "", b""), ("level", None, b"0.9")]), 422, "no files"),
        (multipart([("files", None, b"\x89PNG" + b"\x00" * 70_000)]), 400, "no file name"),
        (multipart([("files", None, b"image.tif")]), 400, "curl -F files=@image.tif"),
        ({"data": {"level": "0.9"}}, 415, "multipart"),
        ({"json": {"files": []}}, 415, "multipart"),
        (
            {
                "content": b"--abc\r\nContent-Disposition: form-data\r\n\r\nx\r\n--abc--\r\n",
                "headers": {"content-type": "multipart/form-data; boundary=abc"},
            },
            400,
            "malformed",
        ),
        (
            {
                "content": b"",
                "headers": {"content-type": "multipart/form-data"},
            },
            400,
            "boundary",
        ),
    ],
)
def test_bad_requests(client, kwargs, status, text):
    response = client.post("/api/count", **kwargs)
    assert response.status_code == status
    assert text in response.json()["detail"]


@pytest.mark.parametrize("level", ["abc", "1.5", "0", "nan", "0.9999999999999999"])
def test_bad_level(client, scene, level):
    response = post(client, [("x.tif", tiff_bytes(scene.image), "image/tiff")], level=level)
    assert response.status_code == 422
    assert "level" in response.json()["detail"]


@pytest.mark.parametrize("field", ["levle", "pixelsize"])
def test_an_unknown_form_field_is_refused_not_ignored(client, scene, field):
    response = post(client, [("x.tif", tiff_bytes(scene.image), "image/tiff")], **{field: "0.5"})
    assert response.status_code == 422
    assert response.json()["detail"].startswith(f"unknown form field '{field}': this endpoint")


def test_bad_saliency_flag(client, scene):
    response = post(client, [("x.tif", tiff_bytes(scene.image), "image/tiff")], saliency="maybe")
    assert response.status_code == 422
    assert "saliency" in response.json()["detail"]


def test_client_file_names_are_never_paths(client, scene, tmp_path):
    evil = "../../" + str(tmp_path / "escaped.tif")
    names = [evil, "..\\..\\windows\\evil.png", "\x1bweird\t.tif", "/", "../.."]
    data = tiff_bytes(scene.image)
    parts = [("files", name, data) for name in names] + [("saliency", None, b"false")]
    response = client.post("/api/count", **multipart(parts))
    assert response.status_code == 200
    shown = [r["name"] for r in response.json()["results"]]
    assert shown == ["escaped.tif", "evil.png", "weird.tif", "upload-4", "upload-5"]
    assert [r["status"] for r in response.json()["results"]] == [200, 200, 200, 415, 415]
    assert not (tmp_path / "escaped.tif").exists()
    # The per-request upload folders are gone once the requests are answered.
    assert list(client.temp_dir.iterdir()) == []


def test_a_file_named_only_by_rfc_2231_filename_star_is_counted(client, scene):
    """Some HTTP libraries name a non-ASCII file only as filename*=UTF-8''...; it counts."""
    boundary = "b0undary"
    disposition = "form-data; name=\"files\"; filename*=UTF-8''Zellen%C3%A4_w1.tif"
    body = (
        f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode()
        + tiff_bytes(scene.image)
        + f"\r\n--{boundary}--\r\n".encode()
    )
    response = client.post(
        "/api/count",
        content=body,
        headers={"content-type": f"multipart/form-data; boundary={boundary}"},
    )
    assert response.status_code == 200, response.text
    (item,) = response.json()["results"]
    assert item["ok"] and item["name"] == "Zellenä_w1.tif"


def test_sanitize_name():
    assert sanitize_name("a/b/c.tif", 0) == "c.tif"
    assert sanitize_name(b"C:\\data\\A01.TIF", 0) == "A01.TIF"
    assert sanitize_name("..", 4) == "upload-5"
    assert sanitize_name("", 0) == "upload-1"
    assert sanitize_name(None, 1) == "upload-2"
    long = sanitize_name("x" * 500 + ".tiff", 0)
    assert len(long) <= 255 and long.endswith(".tiff")
    # a long real name stays whole: its well, site and stain (at its end) are parsed
    screen = "MyScreen_" + "x" * 100 + "_B03_s2_w1.tif"
    assert sanitize_name(screen, 0) == screen
    assert sanitize_name("\u202eevil\u0007.png", 0) == "evil.png"
    assert sanitize_name("ctrl, %22DMSO%22 B03.png", 0) == 'ctrl, "DMSO" B03.png'


def test_a_request_names_another_shipped_model(client, scene):
    info = client.get("/api/info").json()
    assert info["models"][0] == "tiny" and "nuclei" in info["models"]
    response = post(
        client,
        [(BBBC_NAME, tiff_bytes(scene.image), "image/tiff")],
        model="nuclei",
        saliency="false",
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == "nuclei" and body["counted"] == 1
    assert body["well_correlation"] is not None
    expected = CellCounter.from_pretrained("nuclei").count(scene.image).count
    assert body["results"][0]["count"] == pytest.approx(expected, rel=1e-4)
    assert body["level_note"] is None  # 95%: its 20 calibration images guarantee it
    wide = post(
        client,
        [(BBBC_NAME, tiff_bytes(scene.image), "image/tiff")],
        model="nuclei",
        saliency="false",
        level="0.99",
    ).json()
    assert wide["level_note"].startswith("level 0.99 is above the 0.952")
    unknown = post(client, [(BBBC_NAME, tiff_bytes(scene.image), "image/tiff")], model="nope")
    assert unknown.status_code == 422
    assert "model: unknown model 'nope'; choose one of tiny" in unknown.json()["detail"]
    default = post(client, [(BBBC_NAME, tiff_bytes(scene.image), "image/tiff")])
    assert default.json()["model"] == "tiny"


def test_rescale_counts_binned_images_at_the_model_scale(client):
    from skimage.transform import rescale

    full = simulate_scene(60, stain=2, blur=1, seed=4)  # cell bodies: scale-sensitive
    small = rescale(full.image.astype(np.float32), 0.5, anti_aliasing=True, preserve_range=True)
    pixels = np.round(small).astype(np.uint8)  # 2 x 2 binning
    binned = tiff_bytes(pixels)
    library = CellCounter.from_pretrained("bbbc005", rescale=2.0).count(pixels)
    answers = {}
    for value in ("", "2"):
        response = post(
            client,
            [("binned.tif", binned, "image/tiff")],
            model="bbbc005",
            saliency="false",
            rescale=value,
        )
        assert response.status_code == 200, response.text
        answers[value] = response.json()
    assert answers["2"]["rescale"] == 2.0 and answers[""]["rescale"] is None
    item = answers["2"]["results"][0]
    assert item["count"] == pytest.approx(library.count, rel=1e-4)
    assert item["warning"] == (library.warning or None)
    assert abs(item["count"] - 60) < 5 < abs(answers[""]["results"][0]["count"] - 60)
    for bad in ("abc", "0", "-2", "inf"):
        refused = post(client, [("x.tif", binned, "image/tiff")], rescale=bad)
        assert refused.status_code == 422
        assert refused.json()["detail"].startswith("rescale must be a positive number"), bad
    fixed = post(client, [("x.tif", binned, "image/tiff")], rescale="2")  # the tiny model
    assert fixed.status_code == 422
    assert fixed.json()["detail"] == (
        "rescale: model 'tiny' has the paper's fixed-frame 'fc' head, which cannot rescale images"
    )


def test_epistemic_field_counts_with_the_models_ensemble(client, scene):
    tiff = tiff_bytes(scene.image)
    plain = CellCounter.from_pretrained("bbbc005").count(scene.image)
    ensemble = CellCounter.from_pretrained("bbbc005", epistemic=True).count(scene.image)
    answers = {}
    for value in ("false", "true"):
        response = post(
            client,
            [(BBBC_NAME, tiff, "image/tiff")],
            model="bbbc005",
            saliency="false",
            epistemic=value,
        )
        assert response.status_code == 200, response.text
        answers[value] = response.json()
    assert answers["true"]["epistemic"] and not answers["false"]["epistemic"]
    for value, expected in (("false", plain), ("true", ensemble)):
        item = answers[value]["results"][0]
        assert item["count"] == pytest.approx(expected.count, rel=1e-4)
        assert item["std"] == pytest.approx(expected.std, rel=1e-4)
    assert ensemble.std != pytest.approx(plain.std, rel=1e-3)  # the two differ: a real test
    both = post(
        client,
        [(BBBC_NAME, tiff, "image/tiff")],
        model="bbbc005",
        saliency="false",
        epistemic="true",
        rescale="0.5",
    ).json()
    expected = CellCounter.from_pretrained("bbbc005", epistemic=True, rescale=0.5)
    assert both["results"][0]["count"] == pytest.approx(expected.count(scene.image).count, rel=1e-4)
    loaded = post(client, [(BBBC_NAME, tiff, "image/tiff")], epistemic="true")  # the tiny
    assert loaded.status_code == 422
    assert "handed to this server loaded" in loaded.json()["detail"]
    bad = post(client, [(BBBC_NAME, tiff, "image/tiff")], epistemic="maybe")
    assert bad.status_code == 422
    assert bad.json()["detail"] == "epistemic must be true or false, got 'maybe'"


def test_a_diameter_sets_the_resize_factor_from_the_models_own(client):
    from skimage.transform import rescale

    nuclei = simulate_scene(15, stain=1, size=(130, 174), bit_depth=16, seed=6).image
    # nuclei twice as wide as the nuclei model's 28.3 px: a factor of 0.5
    large = np.round(rescale(nuclei.astype(np.float32), 2.0, preserve_range=True))
    data = tiff_bytes(large.astype(np.uint16))
    library = CellCounter.from_pretrained("nuclei", diameter=56.6).count(large)
    response = post(
        client,
        [("large.tif", data, "image/tiff")],
        model="nuclei",
        saliency="false",
        diameter="56.6",
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["diameter"] == 56.6 and body["rescale"] == pytest.approx(0.5)
    assert body["results"][0]["count"] == pytest.approx(library.count, rel=1e-4)
    plain = post(client, [("large.tif", data, "image/tiff")], model="nuclei", saliency="false")
    assert plain.json()["diameter"] is None and plain.json()["rescale"] is None
    refused = {
        "abc": "diameter must be a positive number of pixels",
        "-3": "diameter must be a positive number of pixels",
    }
    for bad, message in refused.items():
        answer = post(client, [("large.tif", data, "image/tiff")], model="nuclei", diameter=bad)
        assert answer.status_code == 422 and answer.json()["detail"].startswith(message), bad
    both = post(
        client, [("large.tif", data, "image/tiff")], model="nuclei", diameter="30", rescale="2"
    )
    assert both.status_code == 422
    assert both.json()["detail"].startswith("rescale and diameter: give only one")
    # a per-file problem names the form's fields, not the command line's options
    tiny = post(client, [("large.tif", data, "image/tiff")], model="nuclei", diameter="1000")
    error = tiny.json()["results"][0]["error"]
    assert "too small to count" in error and error.endswith("check rescale / diameter / pixel_size")
    unknown = post(client, [("large.tif", data, "image/tiff")], model="bbbc005", diameter="30")
    assert unknown.status_code == 422
    assert unknown.json()["detail"] == (
        "model 'bbbc005' does not record the object diameter it was trained at; give the "
        "resize factor instead (rescale 2 for 2 x 2-binned images)"
    )


def test_an_uploads_name_gives_its_stain_as_a_files_name_would(client, tmp_path):
    from skimage.transform import rescale

    from celltally.calibration import SIZE_HINT

    # a w2 frame shrunk 0.7x: its cell bodies between the two stains' widths, so only
    # the stain its name gives says that they are too narrow (seed 1: a flagged frame)
    image = simulate_scene(60, stain=2, seed=1).image.astype(np.float32)
    small = np.clip(np.round(rescale(image, 0.7, anti_aliasing=True, preserve_range=True)), 0, 255)
    small = small.astype(np.uint8)
    name = "SIMCEPImages_A01_C60_F1_s1_w2.TIF"
    tifffile.imwrite(tmp_path / name, small)
    counter = CellCounter.from_pretrained("bbbc005")
    library = counter.count(tmp_path / name)
    assert SIZE_HINT in library.warning and library.ood["size_ratio"] < 0.8
    assert "size_ratio" not in counter.count(small).ood  # no name: which stain?
    assert counter.count(small, name=name).ood == library.ood
    for saliency in ("false", "true"):  # counted, or counted and explained
        response = post(
            client, [(name, tiff_bytes(small), "image/tiff")], model="bbbc005", saliency=saliency
        )
        assert response.status_code == 200, response.text
        assert response.json()["results"][0]["warning"] == library.warning, saliency


def test_a_rescaled_twin_keeps_the_out_of_distribution_check():
    from skimage.transform import rescale

    image = simulate_scene(30, seed=6).image.astype(np.float32)
    small = rescale(image, 0.5, anti_aliasing=True, preserve_range=True)
    loaded = CellCounter.from_pretrained("bbbc005", rescale=2.0).count(small)
    twin = CellCounter.from_pretrained("bbbc005").with_rescale(2.0)
    # as counted, and as a Dask worker or a process pool gets it (pickled)
    for counter in (twin, pickle.loads(pickle.dumps(twin))):
        result = counter.count(small)
        assert result.count == pytest.approx(loaded.count, rel=1e-6)
        distance = result.ood["feature_distance"]
        assert distance == pytest.approx(loaded.ood["feature_distance"], rel=1e-6)


def test_models_info_docs_and_page(client):
    models = client.get("/api/models").json()
    assert models["active"]["name"] == "tiny"
    assert models["active"]["input_size"] == [64, 96]
    assert isinstance(models["available"], list)
    info = client.get("/api/info").json()
    assert info["limits"] == {
        "max_files": 6,
        "max_bytes": 400_000,
        "max_mb": 400_000 / 2**20,
        "max_pixels": 64_000_000,
    }
    schema = client.get("/openapi.json").json()
    operation = schema["paths"]["/api/count"]["post"]
    assert "multipart/form-data" in operation["requestBody"]["content"]
    assert {"200", "413", "415", "422"} <= set(operation["responses"])
    assert "/api/models" in schema["paths"]
    docs = client.get("/docs")
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    assert "content-security-policy" not in docs.headers  # Swagger UI needs its scripts
    # offline: Swagger UI comes from the installed swagger-ui-bundle, not a CDN
    assert "cdn." not in docs.text and "/docs-static/swagger-ui-bundle.js" in docs.text
    for asset in ("swagger-ui-bundle.js", "swagger-ui.css"):
        assert client.get(f"/docs-static/{asset}").status_code == 200
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert 'id="file-input"' in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert page.headers["x-content-type-options"] == "nosniff"
    for asset in ("app.js", "style.css"):
        assert client.get(f"/static/{asset}").status_code == 200
    assert client.get("/static/../app.py").status_code == 404


def test_limits_are_configurable(counter, scene):
    app = create_app(counter, max_files=1, max_bytes=1000, warmup=False)
    with TestClient(app) as small:
        data = tiff_bytes(scene.image)
        two = [("files", ("a.tif", data)), ("files", ("b.tif", data))]
        too_many = small.post("/api/count", files=two)
        assert too_many.status_code == 413
        too_big = small.post("/api/count", files=[("files", ("a.tif", data))])
        assert too_big.status_code == 413
        assert "limit of 1000 bytes" in too_big.json()["results"][0]["error"]


def test_decompression_bombs_are_refused_before_decoding(counter, scene):
    app = create_app(counter, max_pixels=1_000_000, warmup=False)
    zeros = np.zeros((1500, 1500), np.uint8)
    buffer = bytes_io.BytesIO()
    tifffile.imwrite(buffer, zeros, compression="zlib")
    files = [
        ("bomb.tif", buffer.getvalue()),
        ("bomb.png", pil_bytes(zeros, "PNG")),
        ("fine.tif", tiff_bytes(scene.image)),
    ]
    assert max(len(data) for _, data in files[:2]) < 20_000  # small files, big images
    with TestClient(app) as small:
        response = small.post("/api/count", files=[("files", f) for f in files])
    assert response.status_code == 200
    results = response.json()["results"]
    assert [r["status"] for r in results] == [413, 413, 200]
    assert "2.2 million values, more than the limit of 1 million" in results[0]["error"]


def test_the_size_limits_hold_for_the_image_as_rescaled(scene, tmp_path, monkeypatch):
    """A small upload with a large rescale is as big for the model as a big upload."""
    import celltally.web.app as web_app
    from celltally.web.uploads import Upload

    path = tmp_path / "scene.tif"
    tifffile.imwrite(path, scene.image)  # 348 x 260: 0.09 million pixels
    upload = Upload(index=0, name="scene.tif", path=path, size=path.stat().st_size)
    twin = CellCounter.from_pretrained("bbbc005").with_rescale(4.0)  # 16x the area
    service = web_app._Service(twin, saliency=True, display_side=256, max_pixels=1_000_000)
    refused = service.count_file(upload, 0.95, False)
    assert refused.status == 413 and not refused.ok
    assert "0.1 million values (16x that once rescaled), more than the limit of 1 million" in (
        refused.error
    )
    monkeypatch.setattr(web_app, "SALIENCY_MAX_PIXELS", scene.image.size * 10)
    service.max_pixels = 10**8
    result = service.count_file(upload, 0.95, True)
    assert result.ok and result.images.saliency is None
    assert result.note.startswith("saliency map skipped: 0.1 million pixels (16x that once")


def test_create_app_rejects_bad_settings(counter, tmp_path):
    from celltally.io import InputError

    with pytest.raises(ValueError, match="max_files"):
        create_app(counter, max_files=0, warmup=False)
    with pytest.raises(ValueError, match="level"):
        create_app(counter, level=1.5, warmup=False)
    with pytest.raises(InputError, match="no such model"):
        create_app(tmp_path / "missing", warmup=False)


def test_serve_command_errors_are_one_line(tiny_model, tmp_path):
    import socket

    from typer.testing import CliRunner

    from celltally.cli import app as cli

    runner = CliRunner()
    missing = runner.invoke(cli, ["serve", "--model", str(tmp_path / "none"), "--port", "1"])
    assert missing.exit_code == 2 and "no such model" in missing.output
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        taken = runner.invoke(cli, ["serve", "--model", str(tiny_model), "--port", str(port)])
    assert taken.exit_code == 2
    assert f"cannot listen on 127.0.0.1:{port}" in taken.output
    for args, text in [
        (["--port", "0"], "--port"),
        (["--max-files", "0"], "--max-files"),
        (["--max-mb", "-1"], "--max-mb"),
        (["--max-mb", "inf"], "--max-mb"),
        (["--max-mb", "1e-9"], "--max-mb"),
        (["--threads", "0"], "--threads"),
    ]:
        result = runner.invoke(cli, ["serve", "--model", str(tiny_model), *args])
        assert result.exit_code == 2 and f"error: {text}" in result.output, result.output
        assert "Traceback" not in result.output


def test_a_model_that_fails_to_load_is_a_json_error(counter, scene, tmp_path, monkeypatch):
    from celltally.web import app as web_app

    def damaged(name, **_):
        raise OSError(f"{name}/model.safetensors: truncated file")

    app = create_app(counter, max_files=2, max_bytes=400_000, temp_dir=tmp_path)
    monkeypatch.setattr(web_app.CellCounter, "from_pretrained", damaged)  # a damaged install
    with TestClient(app) as test_client:
        response = post(
            test_client, [("x.tif", tiff_bytes(scene.image), "image/tiff")], model="nuclei"
        )
    assert response.status_code == 500
    assert response.json()["detail"] == (
        "model 'nuclei' could not be loaded: nuclei/model.safetensors: truncated file"
    )


def test_info_says_what_shipped_models_are_for_and_not_a_users_namesake(tmp_path):
    import shutil

    from fastapi.testclient import TestClient

    from celltally.model_folder import WEIGHTS_DIR

    shipped = TestClient(create_app("nuclei", warmup=False)).get("/api/info").json()
    assert shipped["model_uses"]["nuclei"].startswith("fluorescent nuclei")
    assert shipped["model_uses"]["bbbc005"].startswith("BBBC005-like images")
    mine = tmp_path / "nuclei"  # a user's model that carries a shipped name
    shutil.copytree(WEIGHTS_DIR / "nuclei", mine)
    info = TestClient(create_app(mine, warmup=False)).get("/api/info").json()
    assert info["model"] == "nuclei" and "nuclei" not in info["model_uses"]
    assert "bbbc005" in info["model_uses"]


def test_epistemic_for_a_model_folder_without_an_ensemble_is_one_clear_error(tiny_model, scene):
    with TestClient(create_app(str(tiny_model), warmup=False)) as folder_client:
        response = post(
            folder_client, [("x.tif", tiff_bytes(scene.image), "image/tiff")], epistemic="true"
        )
        assert response.status_code == 422
        detail = response.json()["detail"]
        assert detail.startswith("epistemic: ") and "model has no ensemble members" in detail
        assert "\n" not in detail
        plain = post(folder_client, [("x.tif", tiff_bytes(scene.image), "image/tiff")])
        assert plain.status_code == 200 and plain.json()["epistemic"] is False


def test_a_pixel_size_sets_the_resize_factor_for_a_model_that_records_one(
    pixel_size_model, tmp_path
):
    image = simulate_scene(12, size=(130, 174), seed=9).image  # 2 x 2-binned BBBC005 frame
    data = tiff_bytes(image)
    library = CellCounter.from_pretrained(pixel_size_model, pixel_size=1.3).count(image)
    app = create_app(str(pixel_size_model), temp_dir=tmp_path, warmup=False)
    with TestClient(app) as client:
        info = client.get("/api/info").json()
        assert info["pixel_sizes"] == {"bbbc005_um": 0.65}  # shipped models record none
        assert info["diameters"] == {"nuclei": 28.3}
        # the ensembles' measured coverage, for the page's note (nuclei's: 17 of 20)
        assert info["ensemble_coverage"]["nuclei"] == pytest.approx(0.85)
        assert set(info["ensemble_coverage"]) == {"bbbc005_um", "bbbc005", "nuclei"}
        response = post(client, [("binned.tif", data, "image/tiff")], pixel_size="1.3")
        assert response.status_code == 200, response.text
        body = response.json()
        assert (body["pixel_size"], body["diameter"]) == (1.3, None)
        assert body["rescale"] == pytest.approx(2.0)
        assert body["results"][0]["count"] == pytest.approx(library.count, rel=1e-4)
        # its own pixel size: the model as it is
        same = post(client, [("binned.tif", data, "image/tiff")], pixel_size="0.65")
        assert same.json()["rescale"] == 1.0
        plain = CellCounter.from_pretrained(pixel_size_model).count(image)
        assert same.json()["results"][0]["count"] == pytest.approx(plain.count, rel=1e-4)
        refusals = {
            (("pixel_size", "abc"),): "pixel_size must be a positive number of micrometres",
            (("pixel_size", "1.3"), ("rescale", "2")): "rescale and pixel_size: give only one",
            (("pixel_size", "1.3"), ("diameter", "30")): "diameter and pixel_size: give only one",
            (("pixel_size", "1.3"), ("model", "nuclei")): (
                "model 'nuclei' does not record the pixel size it was trained at; use "
                "diameter (typical object diameter in pixels) instead"
            ),
        }
        for fields, message in refusals.items():
            answer = post(client, [("binned.tif", data, "image/tiff")], **dict(fields))
            assert answer.status_code == 422, fields
            assert answer.json()["detail"].startswith(message), answer.json()["detail"]


def test_another_sites_page_and_another_host_name_are_refused(client, counter, scene):
    files = [("files", ("a.tif", tiff_bytes(scene.image), "image/tiff"))]
    # a page on another site, open in the user's browser, posting a form to the server
    evil = client.post("/api/count", files=files, headers={"Origin": "http://evil.example"})
    assert evil.status_code == 403 and "cross-origin" in evil.json()["detail"]
    assert evil.headers["X-Content-Type-Options"] == "nosniff"  # refusals get them too
    sandboxed = client.post("/api/count", files=files, headers={"Origin": "null"})
    assert sandboxed.status_code == 403  # another site's sandboxed frame sends "null"
    own = client.post("/api/count", files=files, headers={"Origin": "http://testserver"})
    assert own.status_code == 200
    # a server on a loopback address answers to loopback names only (DNS rebinding)
    from celltally.web.app import LOOPBACK_NAMES

    app = create_app(counter, warmup=False, allowed_hosts=LOOPBACK_NAMES)
    with TestClient(app, base_url="http://127.0.0.1:8000") as local:
        assert local.get("/api/info").status_code == 200
        assert local.get("/api/info", headers={"Host": "localhost:8000"}).status_code == 200
        assert local.get("/api/info", headers={"Host": "evil.example"}).status_code == 400


def test_files_are_read_and_counted_a_few_at_a_time_over_all_requests(counter, scene, monkeypatch):
    import threading
    import time

    from celltally.web import app as web

    busy, most, lock = [0], [0], threading.Lock()
    real = web._Service.count_file

    def watched(self, *args, **kwargs):
        with lock:
            busy[0] += 1
            most[0] = max(most[0], busy[0])
        time.sleep(0.2)  # decoding a large upload
        try:
            return real(self, *args, **kwargs)
        finally:
            with lock:
                busy[0] -= 1

    monkeypatch.setattr(web._Service, "count_file", watched)
    app = create_app(counter, warmup=False)
    files = [("files", ("a.tif", tiff_bytes(scene.image), "image/tiff"))]
    codes = []

    def one_request():
        with TestClient(app) as own:
            codes.append(own.post("/api/count", files=files).status_code)

    threads = [threading.Thread(target=one_request) for _ in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert codes == [200] * 5
    assert 1 <= most[0] <= web.WORK_SLOTS  # six at once decoded six images (9 GB) before


def test_serving_beyond_this_machine_warns_and_loopback_checks_host_names(
    counter, monkeypatch, capsys
):
    import uvicorn

    from celltally.web import app as web

    made, real = {}, web.create_app

    def fake_create_app(model, **kwargs):
        made.update(kwargs)
        return real(counter, warmup=False, allowed_hosts=kwargs["allowed_hosts"])

    monkeypatch.setattr(web, "create_app", fake_create_app)
    monkeypatch.setattr(uvicorn, "run", lambda *args, **kwargs: None)
    web.serve(host="127.0.0.1", port=0)
    assert made["allowed_hosts"] >= web.LOOPBACK_NAMES and "warning" not in capsys.readouterr().out
    web.serve(host="127.0.0.1", port=0, allowed_hosts=["Lab.Example"])  # a reverse proxy
    assert "lab.example" in made["allowed_hosts"]
    app = real(counter, warmup=False, allowed_hosts=made["allowed_hosts"])
    with TestClient(app, base_url="http://lab.example") as proxied:
        assert proxied.get("/api/info").status_code == 200
    web.serve(host="0.0.0.0", port=0)
    assert made["allowed_hosts"] is None
    assert "warning: listening on 0.0.0.0, not only this machine" in capsys.readouterr().out


def test_an_upload_that_stops_sending_is_given_up(tmp_path, monkeypatch):
    import anyio

    from celltally.web import uploads

    monkeypatch.setattr(uploads, "UPLOAD_IDLE_SECONDS", 0.2)
    head = b'--b0\r\nContent-Disposition: form-data; name="files"; filename="a.tif"\r\n\r\n'

    async def stalled():
        yield head
        await anyio.sleep(3600)  # never closes, never sends the rest
        yield b""

    async def receive():
        return await uploads.receive_uploads(
            "multipart/form-data; boundary=b0",
            None,
            stalled(),
            tmp_path,
            uploads.UploadLimits(max_files=2, max_bytes=1000),
        )

    with pytest.raises(uploads.RequestRejected) as err:
        anyio.run(receive)
    assert err.value.status == 408 and "upload stalled" in err.value.message


def test_a_body_cut_before_its_last_boundary_is_refused(client):
    body = b'--zz\r\nContent-Disposition: form-data; name="files"; filename="a.png"\r\n\r\nabc'
    response = client.post(
        "/api/count", content=body, headers={"Content-Type": "multipart/form-data; boundary=zz"}
    )
    assert response.status_code == 400  # it was counted as a whole file
    assert "ends before its last part" in response.json()["detail"]


def test_loopback_servers_are_told_by_address_and_a_request_without_host_is_served(counter):
    import asyncio

    from celltally.web.app import LOOPBACK_NAMES, _canonical, _is_loopback, _SameOrigin

    # browsers send a short form's full spelling: 127.2 is answered as 127.0.0.2
    assert (_canonical("127.2"), _canonical("Lab.Example")) == ("127.0.0.2", "lab.example")

    for host in (
        "127.0.0.1",
        "127.0.1.1",
        "::1",
        "0:0:0:0:0:0:0:1",
        "[::1]",
        "LOCALHOST",
        "127.1",
        "::ffff:127.0.0.1",
    ):
        assert _is_loopback(host), host
    for host in ("0.0.0.0", "::", "192.168.1.5", "lab.example", "128.0.0.1", "10.1"):
        assert not _is_loopback(host), host

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    def status(headers):
        sent = []

        async def receive():
            return {"type": "http.request", "body": b""}

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "method": "GET", "path": "/", "headers": headers}
        asyncio.run(_SameOrigin(app, LOOPBACK_NAMES)(scope, receive, send))
        return sent[0]["status"]

    assert status([]) == 200  # an HTTP/1.0 client sends no Host: no rebinding there
    assert status([(b"host", b"127.0.0.1:8000")]) == 200
    assert status([(b"host", b"evil.example")]) == 400
