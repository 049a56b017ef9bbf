"""Review page and routes on awkward folders: look-alike image IDs, masks of the wrong shape, odd paths, and
files from a review root that must not run script on the dashboard's origin. No broker is needed for these."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
from _dashboard_fixtures import http_get, running_dashboard

from drywallqa.dashboard.server import DashboardApp
from drywallqa.masks import mask_filename

JSON = {"Accept": "application/json"}


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def dashboard(tmp_path: Path) -> Iterator[DashboardApp]:
    with running_dashboard(tmp_path, _closed_port()) as app:  # broker down: review does not need it
        yield app


def _gray(path: Path, value: int, h: int = 48, w: int = 64) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.full((h, w, 3), value, np.uint8))


def test_overlay_shows_the_image_of_its_own_id_not_one_whose_name_starts_with_it(dashboard, tmp_path: Path) -> None:
    images = tmp_path / "images"
    _gray(images / "photo.jpg", 40)
    _gray(images / "photo.a.jpg", 220)  # image ID 'photo.a'; 'photo.*' matches it too, and sorts first
    for image_id, value in (("photo", 40), ("photo.a", 220)):
        code, _, jpeg = http_get(dashboard, f"/review/overlay.jpg?images={images}&id={image_id}")
        assert code == 200, jpeg[:200]
        img = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_GRAYSCALE)
        assert abs(float(img.mean()) - value) < 12, (image_id, float(img.mean()))


@pytest.mark.parametrize("path", [
    "/review?images=images%00",
    "/review/overlay.jpg?images=images%00&id=photo",
    "/review?images=~no_such_user_drywallqa",
    "/review/files/0/images/a%00b.jpg",
])
def test_unusable_review_paths_are_refused_with_a_message(dashboard, tmp_path: Path, path: str) -> None:
    _gray(tmp_path / "images" / "photo.jpg", 40)
    code, _, body = http_get(dashboard, path, JSON)  # used to drop the connection without any answer
    assert code == 400 and b"is not a usable path" in body, body


def test_review_files_may_show_images_but_run_no_script(dashboard, tmp_path: Path) -> None:
    report = tmp_path / "runs" / "eval.html"
    report.parent.mkdir()
    report.write_text("<html><body><script>fetch('/api/devices/x/forget', {method: 'POST'})</script></body></html>")
    (tmp_path / "runs" / "evil.svg").write_text("<svg xmlns='http://www.w3.org/2000/svg'><script>1</script></svg>")
    for name in ("eval.html", "evil.svg"):
        code, headers, _ = http_get(dashboard, f"/review/files/0/runs/{name}")
        assert code == 200
        policy = headers.get("Content-Security-Policy", "")
        assert "default-src 'none'" in policy and "script-src" not in policy, policy
        assert "img-src 'self' data:" in policy  # the eval report's overlays are data: URIs


def test_review_page_names_mask_problems_beside_the_image(dashboard, tmp_path: Path) -> None:
    images, masks = tmp_path / "images", tmp_path / "pred"
    _gray(images / "good.jpg", 90)
    _gray(images / "bad.jpg", 90)
    masks.mkdir()
    ok = np.zeros((48, 64), np.uint8)
    ok[5:10, 5:20] = 255
    cv2.imwrite(str(masks / mask_filename("good", "segment crack")), ok)
    cv2.imwrite(str(masks / mask_filename("bad", "segment crack")), ok[:24, :32])  # half size
    cv2.imwrite(str(masks / "bad__someone_elses.png"), np.zeros((48, 64, 3), np.uint8))  # foreign colour PNG
    (masks / mask_filename("bad", "drywall seam")).write_bytes(b"not a png")
    code, _, body = http_get(dashboard, f"/review?images={images}&masks={masks}")
    assert code == 200
    page = body.decode()
    good, bad = page.split("data-image-id='good'")[1], page.split("data-image-id='bad'")[1].split("data-image-id")[0]
    assert "mask-problems" not in good
    assert "bad__segment_crack.png: size 32x24 differs from image 64x48" in bad
    assert "bad__someone_elses.png: has 3 channels, expected 1" in bad
    assert "bad__drywall_seam.png: cannot read mask" in bad


def test_the_overlay_names_a_broken_mask_without_saying_where_it_lies(dashboard, tmp_path: Path) -> None:
    images, masks = tmp_path / "images", tmp_path / "pred"
    _gray(images / "bad.jpg", 90)
    masks.mkdir()
    (masks / mask_filename("bad", "segment crack")).write_bytes(b"not a png")
    code, headers, _ = http_get(dashboard, f"/review/overlay.jpg?images={images}&masks={masks}&id=bad")
    assert code == 200
    problem = headers.get("X-Mask-Problems", "")
    assert "bad__segment_crack.png" in problem and "cannot read" in problem, problem
    assert str(tmp_path) not in problem


def test_a_mask_named_after_a_class_is_shown_as_that_class(dashboard, tmp_path: Path) -> None:
    images, masks = tmp_path / "images", tmp_path / "pred"
    _gray(images / "wall.jpg", 90)
    masks.mkdir()
    cv2.imwrite(str(masks / mask_filename("wall", "taping")), np.zeros((48, 64), np.uint8))  # `--prompt taping`
    cv2.imwrite(str(masks / mask_filename("wall", "my site words")), np.zeros((48, 64), np.uint8))  # an alias
    code, _, body = http_get(dashboard, f"/review?images={images}&masks={masks}")
    page = body.decode()
    assert code == 200
    assert "class='chip cls-taping' href='/review/files/0/pred/wall__taping.png'" in page
    assert "class='chip cls-other' href='/review/files/0/pred/wall__my_site_words.png'" in page


def test_a_mask_named_after_an_alias_takes_its_class_from_the_findings_report(dashboard, tmp_path: Path) -> None:
    """`predict --alias` writes masks named after the site's words; the report beside them says their class."""
    from _foundation_fixtures import random_onnx

    from drywallqa.cli import main

    images, masks = tmp_path / "images", tmp_path / "pred"
    _gray(images / "wall.jpg", 90)
    code = main(["predict", "--model", str(random_onnx()), "--quiet", "--alias", "hairline crack=crack",
                 "--prompt", "hairline crack", "--prompt", "segment taping area", "--out", str(masks),
                 "--report", str(masks / "findings.csv"), str(images / "wall.jpg")])
    assert code == 0
    page = http_get(dashboard, f"/review?images={images}&masks={masks}")[2].decode()
    assert "class='chip cls-crack' href='/review/files/0/pred/wall__hairline_crack.png'" in page
    assert "class='chip cls-taping' href='/review/files/0/pred/wall__segment_taping_area.png'" in page

    (masks / "findings.csv").rename(masks / "findings.txt")  # without the report: the file name alone
    page = http_get(dashboard, f"/review?images={images}&masks={masks}")[2].decode()
    assert "class='chip cls-other' href='/review/files/0/pred/wall__hairline_crack.png'" in page
    (masks / "other.csv").write_text("mask_file,class_name\nwall__hairline_crack.png,crack\n")  # not a report
    page = http_get(dashboard, f"/review?images={images}&masks={masks}")[2].decode()
    assert "class='chip cls-other' href='/review/files/0/pred/wall__hairline_crack.png'" in page


def test_the_newest_findings_report_has_the_last_word_on_a_mask(dashboard, tmp_path: Path) -> None:
    """An output folder reused with a changed alias: the older report's class must not win by its file name."""
    import os

    from drywallqa.findings import FIELDS

    images, masks = tmp_path / "images", tmp_path / "pred"
    _gray(images / "wall.jpg", 90)
    masks.mkdir()
    cv2.imwrite(str(masks / mask_filename("wall", "hairline")), np.zeros((48, 64), np.uint8))
    header = ",".join(FIELDS)
    for name, cls, mtime in (("z_old.csv", "crack", 1_000_000), ("a_new.csv", "taping", 2_000_000)):
        row = {f: "" for f in FIELDS} | {"image": "wall.jpg", "prompt": "hairline", "class_name": cls,
                                         "mask_file": "wall__hairline.png"}
        (masks / name).write_text(header + "\n" + ",".join(row[f] for f in FIELDS) + "\n")
        os.utime(masks / name, (mtime, mtime))
    page = http_get(dashboard, f"/review?images={images}&masks={masks}")[2].decode()
    assert "class='chip cls-taping' href='/review/files/0/pred/wall__hairline.png'" in page


def test_a_findings_report_from_before_a_new_column_still_classifies_its_masks(dashboard, tmp_path: Path) -> None:
    """Reports written before `length_px` was added lack that column: the review must still read their classes (it
    required every current column, so a new one would have dropped every older report)."""
    from drywallqa.findings import FIELDS

    images, masks = tmp_path / "images", tmp_path / "pred"
    _gray(images / "wall.jpg", 90)
    masks.mkdir()
    cv2.imwrite(str(masks / mask_filename("wall", "hairline")), np.zeros((48, 64), np.uint8))
    older = [f for f in FIELDS if f != "length_px"]
    row = {f: "" for f in older} | {"image": "wall.jpg", "prompt": "hairline", "class_name": "crack",
                                    "mask_file": "wall__hairline.png"}
    (masks / "findings.csv").write_text(",".join(older) + "\n" + ",".join(row[f] for f in older) + "\n")
    page = http_get(dashboard, f"/review?images={images}&masks={masks}")[2].decode()
    assert "class='chip cls-crack' href='/review/files/0/pred/wall__hairline.png'" in page


def test_heic_and_tiff_photos_are_reviewed_as_jpegs_the_dashboard_renders(dashboard, tmp_path: Path) -> None:
    """Photos `predict` reads but a browser cannot show: HEIC (the iPhone default) was not listed at all, so its
    masks showed as orphans; a TIFF was listed but linked as is, a broken image in the page. Both are now listed
    with their masks, and the photo side is a JPEG the dashboard renders (upright, at the photo's shown size)."""
    import io
    import shutil

    from PIL import Image

    images, masks = tmp_path / "images", tmp_path / "pred"
    images.mkdir()
    masks.mkdir()
    shutil.copy(Path(__file__).parent / "data" / "synthetic_rotated.heic", images / "IMG_0001.HEIC")
    cv2.imwrite(str(images / "scan.tif"), np.full((30, 40, 3), 90, np.uint8))
    _gray(images / "wall.jpg", 90)
    shutil.copy(images / "IMG_0001.HEIC", images / "wall.heic")  # a HEIC beside its JPEG copy gives way to it
    for image_id, (h, w) in (("IMG_0001", (64, 48)), ("scan", (30, 40)), ("wall", (48, 64))):
        cv2.imwrite(str(masks / mask_filename(image_id, "segment crack")), np.zeros((h, w), np.uint8))
    page = http_get(dashboard, f"/review?images={images}&masks={masks}")[2].decode()
    for image_id, size in (("IMG_0001", (48, 64)), ("scan", (40, 30))):
        figure = page.split(f"data-image-id='{image_id}'")[1].split("</figure>")[0]
        assert f"{image_id}__segment_crack.png" in figure  # its mask is beside it, not an orphan
        src = figure.split("alt='image' src='")[1].split("'")[0].replace("&amp;", "&")
        assert src.startswith("/review/overlay.jpg?") and src.endswith("&plain=1"), src
        status, headers, body = http_get(dashboard, src)
        assert status == 200 and headers.get("Content-Type") == "image/jpeg", (status, headers)
        with Image.open(io.BytesIO(body)) as im:
            assert im.size == size
    assert page.count("data-image-id='wall'") == 1
    wall = page.split("data-image-id='wall'")[1].split("</figure>")[0]
    assert "alt='image' src='/review/files/0/images/wall.jpg'" in wall  # the JPEG, linked as it is
    status, _, body = http_get(dashboard, f"/review/overlay.jpg?images={images}&masks={masks}&id=wall")
    with Image.open(io.BytesIO(body)) as im:
        assert status == 200 and im.size == (64, 48)  # the JPEG's, not the HEIC's 48 x 64


def test_a_float_tiff_is_reviewed_without_a_false_cannot_read(dashboard, tmp_path: Path) -> None:
    """A 3-channel float TIFF (thermal / HDR pipelines) is read by `predict` since OpenCV decodes what PIL cannot;
    the listing checked it with PIL's header reader alone and flagged 'cannot read image' beside a good overlay."""
    images, masks = tmp_path / "images", tmp_path / "pred"
    images.mkdir()
    masks.mkdir()
    assert cv2.imwrite(str(images / "thermal.tif"), np.full((30, 40, 3), 0.5, np.float32))
    cv2.imwrite(str(masks / mask_filename("thermal", "segment crack")), np.zeros((30, 40), np.uint8))
    page = http_get(dashboard, f"/review?images={images}&masks={masks}")[2].decode()
    figure = page.split("data-image-id='thermal'")[1].split("</figure>")[0]
    assert "thermal__segment_crack.png" in figure and "cannot read" not in figure, figure
    cv2.imwrite(str(masks / mask_filename("thermal", "segment crack")), np.zeros((20, 40), np.uint8))
    page = http_get(dashboard, f"/review?images={images}&masks={masks}")[2].decode()
    assert "size 40x20 differs from image 40x30" in page  # its size still checked, from the TIFF's header
