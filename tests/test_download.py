"""COCO 2017 download against a local HTTP server: resume after a cut, checksums, safe extraction, subsets."""
from __future__ import annotations

import hashlib
import http.server
import io
import json
import threading
import time
import zipfile
from collections import namedtuple
from pathlib import Path

import cv2
import numpy as np
import pytest

from mitdet.data.download import (ChecksumError, DownloadError, Expected, UnsafeArchiveError, check_free_space,
                                  download_file, prepare_coco2017, safe_extract)
from mitdet.params import Coco2017Params

shutil_usage = namedtuple("shutil_usage", "total used free")


class Server:
    """Serves `files` (url path -> bytes) with HTTP Range; `cut[path] = n` closes the first response after n bytes."""

    def __init__(self, files: dict[str, bytes]):
        self.files, self.cut, self.requests = files, {}, []
        # per path: sent without Content-Length (ends when the connection closes); one byte every `trickle[p]`
        # seconds; `extra[p]` bytes of junk past the body (and announced in Content-Length)
        self.no_length, self.trickle, self.extra = set(), {}, {}
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                server.requests.append((self.path, self.headers.get("Range")))
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                start = 0
                rng = self.headers.get("Range")
                if rng:
                    start = int(rng.split("=")[1].split("-")[0])
                    if start >= len(body):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(body)}")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                extra = b"\0" * server.extra.get(self.path, 0)
                if self.path not in server.no_length:
                    self.send_header("Content-Length", str(len(body) + len(extra) - start))
                self.end_headers()
                n = server.cut.pop(self.path, None)
                if self.path in server.trickle:
                    self._trickle(body[start:], server.trickle[self.path])
                    return
                self.wfile.write((body[start:start + n] if n is not None else body[start:]) + extra)
                if n is not None:
                    self.wfile.flush()
                    self.close_connection = True  # the connection drops mid-body

            def _trickle(self, data: bytes, every_s: float):
                for i in range(len(data)):
                    try:
                        self.wfile.write(data[i:i + 1])
                        self.wfile.flush()
                    except OSError:  # the client gave up
                        return
                    time.sleep(every_s)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = Server({})
    yield s
    s.close()


def _jpeg(seed: int, w: int, h: int) -> bytes:
    img = np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)
    return cv2.imencode(".jpg", img)[1].tobytes()


def _zip(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _coco_mirror(n_train=3, n_val=2) -> dict[str, bytes]:
    """A tiny mirror in the official layout: zips/{train,val}2017.zip, annotations zip, and single images."""
    files, ann_entries = {}, {}
    for split, n in (("train", n_train), ("val", n_val)):
        images = {f"{split}2017/{i:012d}.jpg": _jpeg(i, 40 + i, 30) for i in range(1, n + 1)}
        files[f"/zips/{split}2017.zip"] = _zip(images)
        for name, data in images.items():
            files["/" + name] = data
        coco = {"images": [{"id": i, "file_name": f"{i:012d}.jpg", "width": 40 + i, "height": 30} for i in range(1, n + 1)],
                "annotations": [{"id": i, "image_id": i, "category_id": 3, "bbox": [1, 1, 10, 10], "iscrowd": 0, "area": 100}
                                for i in range(1, n + 1)],
                "categories": [{"id": 3, "name": "car"}]}
        ann_entries[f"annotations/instances_{split}2017.json"] = json.dumps(coco).encode()
    files["/annotations/annotations_trainval2017.zip"] = _zip(ann_entries)
    return files


def _sums(files: dict[str, bytes]) -> dict[str, Expected]:
    return {k.lstrip("/"): Expected(size=len(v), md5=hashlib.md5(v).hexdigest()) for k, v in files.items() if k.endswith(".zip")}


def test_download_resumes_after_connection_cut(server, tmp_path):
    body = np.random.default_rng(0).bytes(300_000)
    server.files["/zips/val2017.zip"] = body
    server.cut["/zips/val2017.zip"] = 100_000
    dest = download_file(f"{server.url}/zips/val2017.zip", tmp_path / "val2017.zip",
                         Expected(size=len(body), md5=hashlib.md5(body).hexdigest()), retries=3, backoff_s=0.01,
                         progress=False)
    assert dest.read_bytes() == body
    assert not (tmp_path / "val2017.zip.part").exists()
    # the second request asked for the rest only
    assert server.requests == [("/zips/val2017.zip", None), ("/zips/val2017.zip", "bytes=100000-")]
    # idempotent: a verified file is not fetched again
    download_file(f"{server.url}/zips/val2017.zip", dest, Expected(size=len(body), md5=hashlib.md5(body).hexdigest()),
                  progress=False)
    assert len(server.requests) == 2


def test_interrupted_download_resumes_in_a_later_run(server, tmp_path):
    body = np.random.default_rng(1).bytes(50_000)
    server.files["/f.bin"] = body
    server.cut["/f.bin"] = 20_000
    with pytest.raises(DownloadError, match="resume"):
        download_file(f"{server.url}/f.bin", tmp_path / "f.bin", Expected(size=len(body)), retries=0, progress=False)
    assert (tmp_path / "f.bin.part").stat().st_size == 20_000 and not (tmp_path / "f.bin").exists()
    download_file(f"{server.url}/f.bin", tmp_path / "f.bin", Expected(size=len(body)), retries=0, progress=False)
    assert (tmp_path / "f.bin").read_bytes() == body
    assert server.requests[-1] == ("/f.bin", "bytes=20000-")


def test_checksum_mismatch_names_file_and_sums_and_leaves_nothing(server, tmp_path):
    body = b"x" * 5000
    server.files["/zips/train2017.zip"] = body
    wrong = "0" * 32
    with pytest.raises(ChecksumError) as err:
        download_file(f"{server.url}/zips/train2017.zip", tmp_path / "train2017.zip", Expected(md5=wrong),
                      retries=0, progress=False)
    msg = str(err.value)
    assert "train2017.zip" in msg and wrong in msg and hashlib.md5(body).hexdigest() in msg
    assert list(tmp_path.iterdir()) == []  # neither the final name nor a .part that would be resumed


def test_http_error_is_clear_and_not_retried(server, tmp_path):
    url = f"{server.url}/nothing.zip"
    with pytest.raises(DownloadError, match=rf"^{url}: HTTP 404 .*; check data\.coco2017\.base_url$") as err:
        download_file(url, tmp_path / "n.zip", retries=3, backoff_s=0.01, progress=False)
    assert isinstance(err.value, OSError) and err.value.where == url
    assert len(server.requests) == 1  # a DownloadError is an OSError too, yet final: a 404 stays a 404


def test_zip_entry_escaping_the_target_is_refused(tmp_path):
    archive = tmp_path / "evil.zip"
    archive.write_bytes(_zip({"train2017/ok.jpg": b"fine", "../escaped.txt": b"pwned"}))
    target = tmp_path / "out"
    with pytest.raises(UnsafeArchiveError, match=r"\.\./escaped\.txt"):
        safe_extract(archive, target)
    assert not (tmp_path / "escaped.txt").exists()
    assert not (target / "train2017" / "ok.jpg").exists()  # refused before writing anything


def test_zip_into_a_symlinked_folder_is_extracted(tmp_path):
    """A folder of the target that links to another disk is not an escape: containment is checked lexically."""
    archive = tmp_path / "ok.zip"
    archive.write_bytes(_zip({"train2017/ok.jpg": b"fine", "annotations/a.json": b"{}"}))
    elsewhere, target = tmp_path / "bigdisk", tmp_path / "out"
    elsewhere.mkdir()
    target.mkdir()
    (target / "train2017").symlink_to(elsewhere, target_is_directory=True)
    assert safe_extract(archive, target) == 2
    assert (elsewhere / "ok.jpg").read_bytes() == b"fine" and (target / "annotations/a.json").read_bytes() == b"{}"
    linked_target = tmp_path / "out-link"
    linked_target.symlink_to(target, target_is_directory=True)
    archive.write_bytes(_zip({"x/../../escaped.txt": b"pwned"}))
    with pytest.raises(UnsafeArchiveError, match="escaped"):
        safe_extract(archive, linked_target)
    archive.write_bytes(_zip({"/abs.txt": b"pwned"}))
    with pytest.raises(UnsafeArchiveError, match="abs"):
        safe_extract(archive, linked_target)
    assert not (tmp_path / "escaped.txt").exists()


def test_checksums_add_to_the_known_table(monkeypatch, tmp_path):
    import mitdet.data.download as download

    class Stop(Exception):
        pass

    seen = {}

    def capture(root, keys, known):
        seen.update(known)
        raise Stop

    monkeypatch.setattr(download, "_check_space_for", capture)
    ann = "annotations/annotations_trainval2017.zip"
    cfg = Coco2017Params(base_url="http://127.0.0.1:9", download_dir=str(tmp_path / "coco"))
    with pytest.raises(Stop):
        prepare_coco2017(cfg, seed=0, checksums={ann: Expected(size=5, md5="0" * 32)}, progress=False)
    assert seen[ann] == Expected(size=5, md5="0" * 32)
    assert seen["zips/val2017.zip"] == Expected(**download.KNOWN_FILES["zips/val2017.zip"])


def test_free_space_check_refuses_before_starting(tmp_path):
    with pytest.raises(DownloadError, match="GB free"):
        check_free_space(tmp_path, 10**18)


def test_prepare_coco2017_full_then_idempotent(server, tmp_path):
    server.files.update(_coco_mirror())
    cfg = Coco2017Params(base_url=server.url, download_dir=str(tmp_path / "coco"), retries=1, timeout_s=10)
    splits = prepare_coco2017(cfg, seed=0, checksums=_sums(server.files), expected_counts={"train": 3, "val": 2},
                              progress=False)
    assert sorted(p.name for p in Path(splits["train"]["images"]).iterdir()) == [f"{i:012d}.jpg" for i in (1, 2, 3)]
    assert json.loads(Path(splits["val"]["annotations"]).read_text())["images"][1]["id"] == 2
    n = len(server.requests)
    again = prepare_coco2017(cfg, seed=0, checksums=_sums(server.files), expected_counts={"train": 3, "val": 2},
                             progress=False)
    assert again == splits and len(server.requests) == n  # nothing downloaded twice


def test_prepare_coco2017_image_count_check(server, tmp_path):
    server.files.update(_coco_mirror())
    cfg = Coco2017Params(base_url=server.url, download_dir=str(tmp_path / "coco"), retries=0, timeout_s=10)
    with pytest.raises(DownloadError, match="COCO 2017 has 118287"):
        prepare_coco2017(cfg, seed=0, checksums=_sums(server.files), progress=False)


def test_prepare_coco2017_random_subset_fetches_single_images(server, tmp_path):
    server.files.update(_coco_mirror(n_train=5, n_val=4))
    cfg = Coco2017Params(base_url=server.url, download_dir=str(tmp_path / "coco"), subset=2, subset_mode="random",
                         retries=0, timeout_s=10)
    splits = prepare_coco2017(cfg, seed=3, checksums=_sums(server.files), progress=False)
    fetched = [p for p, _ in server.requests]
    assert "/zips/train2017.zip" not in fetched and "/annotations/annotations_trainval2017.zip" in fetched
    for split in ("train", "val"):
        coco = json.loads(Path(splits[split]["annotations"]).read_text())
        assert len(coco["images"]) == 2
        assert {a["image_id"] for a in coco["annotations"]} <= {im["id"] for im in coco["images"]}
        for im in coco["images"]:
            assert (Path(splits[split]["images"]) / im["file_name"]).read_bytes() == server.files[f"/{split}2017/{im['file_name']}"]
    # same seed -> same subset
    again = prepare_coco2017(cfg, seed=3, checksums=_sums(server.files), progress=False)
    assert again == splits


def test_without_a_checksum_a_zip_must_pass_its_crc_check(server, tmp_path):
    good = _zip({"a.txt": b"hello" * 100})
    bad = bytearray(good)
    bad[40] ^= 0xFF  # inside the member's data: the CRC no longer matches
    server.files["/good.zip"], server.files["/bad.zip"] = good, bytes(bad)
    assert download_file(f"{server.url}/good.zip", tmp_path / "good.zip", progress=False).read_bytes() == good
    with pytest.raises(ChecksumError, match="bad.zip: not a valid zip"):
        download_file(f"{server.url}/bad.zip", tmp_path / "bad.zip", retries=0, progress=False)
    assert not (tmp_path / "bad.zip").exists() and not (tmp_path / "bad.zip.part").exists()


def test_stale_part_larger_than_expected_starts_over(server, tmp_path):
    body = b"y" * 1000
    server.files["/z.bin"] = body
    (tmp_path / "z.bin.part").write_bytes(b"junk" * 500)
    download_file(f"{server.url}/z.bin", tmp_path / "z.bin", Expected(size=len(body), md5=hashlib.md5(body).hexdigest()),
                  retries=0, progress=False)
    assert (tmp_path / "z.bin").read_bytes() == body and server.requests == [("/z.bin", None)]


# ------------------------------------------------------------------------------ servers and archives that misbehave
def test_a_trickling_server_is_a_stall_not_a_wait(server, tmp_path):
    """One byte every 50 ms never trips a socket timeout; the rate check gives up after about timeout_s."""
    server.files["/slow.bin"] = b"s" * 10_000
    server.trickle["/slow.bin"] = 0.05
    t0 = time.monotonic()
    with pytest.raises(DownloadError, match=r"slow\.bin: failed after 0 retries \(stalled: .* bytes in") as err:
        download_file(f"{server.url}/slow.bin", tmp_path / "slow.bin", Expected(size=10_000), retries=0,
                      timeout_s=0.5, progress=False)
    assert time.monotonic() - t0 < 5
    assert "resume" in str(err.value) and not (tmp_path / "slow.bin").exists()


def test_a_server_sending_more_than_expected_is_cut_at_the_expected_size(server, tmp_path):
    body = np.random.default_rng(2).bytes(50_000)
    server.files["/big.zip"] = body
    server.extra["/big.zip"] = 3_000_000  # announced too
    dest = download_file(f"{server.url}/big.zip", tmp_path / "big.zip",
                         Expected(size=len(body), md5=hashlib.md5(body).hexdigest()), retries=0, progress=False)
    assert dest.read_bytes() == body
    # no size known and no Content-Length: the cap holds, the partial file never grows past it
    server.files["/endless.jpg"] = b"e" * 200_000
    server.no_length.add("/endless.jpg")
    with pytest.raises(DownloadError, match=r"endless\.jpg: larger than 10000 bytes"):
        download_file(f"{server.url}/endless.jpg", tmp_path / "endless.jpg", retries=0, progress=False,
                      max_bytes=10_000)
    assert (tmp_path / "endless.jpg.part").stat().st_size == 10_000 and not (tmp_path / "endless.jpg").exists()


def _damaged(jpeg: bytes) -> bytes:
    """`jpeg` with part of its entropy-coded data zeroed, end marker kept: decodes, but grey past the damage."""
    sos = jpeg.find(b"\xff\xda")
    start = sos + 2 + int.from_bytes(jpeg[sos + 2:sos + 4], "big") + 100
    return jpeg[:start] + bytes(min(2000, len(jpeg) - start - 200)) + jpeg[start + min(2000, len(jpeg) - start - 200):]


def test_subset_images_cut_short_without_length_or_damaged_are_not_kept(server, tmp_path):
    server.files.update(_coco_mirror(n_train=3, n_val=3))
    path = "/train2017/000000000001.jpg"
    server.no_length.add(path)
    server.cut[path] = len(server.files[path]) // 2  # looks complete: the connection just ends
    cfg = Coco2017Params(base_url=server.url, download_dir=str(tmp_path / "coco"), subset=2, retries=1, timeout_s=10)
    splits = prepare_coco2017(cfg, seed=0, checksums=_sums(server.files), progress=False)
    got = Path(splits["train"]["images"]) / "000000000001.jpg"
    assert got.read_bytes() == server.files[path]  # the cut copy was refused and fetched again
    assert [p for p, _ in server.requests].count(path) == 2
    # a damaged image (end marker kept) fails every try: an error, and nothing under its name
    server.files[path] = _damaged(server.files[path])
    got.write_bytes(server.files[path][:500])  # an earlier run's truncated copy is not trusted either
    with pytest.raises(DownloadError, match=r"000000000001\.jpg: failed after 1 retries .*damaged JPEG data"):
        prepare_coco2017(cfg, seed=0, checksums=_sums(server.files), progress=False)
    assert not got.exists() and not got.with_name(got.name + ".part").exists()


def test_archive_entries_named_dot_or_climbing_back_are_refused(tmp_path):
    target = tmp_path / "out"
    for name in (".", "sub/..", "a//b.jpg", "sub/./x.jpg"):
        archive = tmp_path / "odd.zip"
        archive.write_bytes(_zip({"ok.jpg": b"fine", name: b"data"}))
        with pytest.raises(UnsafeArchiveError, match=r"odd\.zip: entry .* part"):
            safe_extract(archive, target)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["odd.zip", "out"] and not any(target.iterdir())


def test_zip_bomb_and_archives_larger_than_the_disk_are_refused(tmp_path, monkeypatch):
    import mitdet.data.download as download
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("zeros.bin", bytes(8 << 20))
    (tmp_path / "bomb.zip").write_bytes(buf.getvalue())
    with pytest.raises(UnsafeArchiveError, match=r"bomb\.zip: entry 'zeros\.bin' expands \d+ times"):
        safe_extract(tmp_path / "bomb.zip", tmp_path / "out")
    assert not (tmp_path / "out" / "zeros.bin").exists()
    (tmp_path / "plain.zip").write_bytes(_zip({"a.jpg": b"x" * 5000}))
    monkeypatch.setattr(download.shutil, "disk_usage", lambda path: shutil_usage(total=10**6, used=10**6 - 100, free=100))
    with pytest.raises(DownloadError, match=r"plain\.zip: extracting needs .* GB are free"):
        safe_extract(tmp_path / "plain.zip", tmp_path / "out")
    assert not (tmp_path / "out" / "a.jpg").exists()


def test_deleted_files_are_extracted_again_not_an_endless_error(server, tmp_path):
    server.files.update(_coco_mirror())
    cfg = Coco2017Params(base_url=server.url, download_dir=str(tmp_path / "coco"), retries=0, timeout_s=10)
    kw = dict(checksums=_sums(server.files), expected_counts={"train": 3, "val": 2}, progress=False)
    splits = prepare_coco2017(cfg, seed=0, **kw)
    image = Path(splits["train"]["images"]) / "000000000002.jpg"
    original = image.read_bytes()
    image.unlink()
    Path(splits["val"]["annotations"]).unlink()
    n = len(server.requests)
    assert prepare_coco2017(cfg, seed=0, **kw) == splits
    assert image.read_bytes() == original and Path(splits["val"]["annotations"]).is_file()
    assert len(server.requests) == n  # from the kept zips: nothing downloaded
    # the zip deleted too: downloaded again, then extracted
    image.unlink()
    for p in (tmp_path / "coco" / "zips").glob("train2017.zip*"):
        p.unlink()
    prepare_coco2017(cfg, seed=0, **kw)
    assert image.read_bytes() == original and server.requests[n:] == [("/zips/train2017.zip", None)]
