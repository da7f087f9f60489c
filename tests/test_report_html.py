"""`mdcsrn-report --html`: one self-contained page (tables, curves, panels), and the panels'
zoomed inset; the page checked in a headless Chromium screenshot (slow)."""

from __future__ import annotations

import base64
import csv
import json
import re
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import yaml

from mdcsrn_lightning.cli.report import main as report_main
from mdcsrn_lightning.evaluation.panels import inset_bounds, save_panel, zoom_window

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

CHROMIUM = Path("/usr/bin/chromium")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class Page(HTMLParser):
    """What a reader of the page gets: table rows (cells with their attributes), images and
    every URL-bearing attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[list[tuple[dict[str, str], str]]] = []
        self.images: list[str] = []
        self.urls: list[tuple[str, str, str]] = []
        self.tags: set[str] = set()
        self._cell: tuple[dict[str, str], list[str]] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        self.tags.add(tag)
        for key in ("src", "href", "srcset", "data", "poster", "action"):
            if key in a:
                self.urls.append((tag, key, a[key]))
        if tag == "img":
            self.images.append(a.get("src", ""))
        if tag == "tr":
            self.rows.append([])
        if tag in ("td", "th"):
            self._cell = (a, [])

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None:
            self.rows[-1].append((self._cell[0], "".join(self._cell[1]).strip()))
            self._cell = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell[1].append(data)


def make_run(path: Path, tag: str, num: int, psnr: float, params: int, gan: bool = False) -> Path:
    """A run folder as `mdcsrn-train` writes it: config, metrics.json, CSV log, test panel."""
    (path / ".hydra").mkdir(parents=True)
    (path / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"tags": [tag], "logger": {"wandb": {"group": "table2"}}}))
    (path / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"job": {"num": num}}}))
    (path / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([]))
    model = {"psnr": psnr, "psnr_std": 0.8123, "ssim": 0.9 + num / 100, "ssim_std": 0.0061, "nrmse": 0.09 - num / 100, "nrmse_std": 0.0037, "n_subjects": 3}
    trilinear = {"psnr": 31.5, "psnr_std": 0.5, "ssim": 0.9081, "ssim_std": 0.01, "nrmse": 0.15, "nrmse_std": 0.01, "n_subjects": 3}
    (path / "metrics.json").write_text(json.dumps({
        "split": "test", "methods": {"model": model, "trilinear": trilinear}, "params": params,
        "seconds_per_volume": 1.25 * (num + 1), "volume_shape": [64, 64, 32],
    }))
    (path / "csv").mkdir()
    with open(path / "csv" / "metrics.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["epoch", "step", "train/loss", "val/psnr", "val/ssim"])
        for step in (10, 20, 30):
            writer.writerow([0, step, 0.1, "", ""])
            writer.writerow([0, step, "", psnr - 3 + step / 10, 0.8 + step / 300])
    rng = np.random.default_rng(num)
    hr = np.clip(rng.random((24, 24)) * 0.3 + np.outer(np.hanning(24), np.hanning(24)), 0, 1)
    images = {"LR": hr * 0.9, "SR": hr * 0.97, **({"GAN-SR": hr * 0.99} if gan else {}), "HR": hr}
    save_panel(path / "panels" / "test.png", images, reference="HR", error_of="GAN-SR" if gan else "SR", title="test")
    return path


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    root = tmp_path / "multirun"
    root.mkdir()
    (root / "multirun.yaml").write_text("{}")
    make_run(root / "0_b4u4", "mDCSRN b4u4", 0, 35.88, 228_961)
    make_run(root / "1_b8u4", "mDCSRN b8u4", 1, 36.14, 485_473)
    make_run(root / "2_gan", "mDCSRN-GAN b8u4", 2, 35.70, 485_473, gan=True)
    return root


def test_html_report_holds_the_tables_curves_and_panels_in_one_file(sweep: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "report"
    assert report_main([str(sweep), "--out", str(out), "--html"]) == 0
    assert str(out / "report.html") in capsys.readouterr().out
    text = (out / "report.html").read_text(encoding="utf-8")
    page = Page()
    page.feed(text)

    # the table: one row per baseline and run, every number the run's metrics.json holds
    header, *rows = page.rows
    assert [c[1] for c in header] == ["", "PSNR", "SSIM", "NRMSE", "#params", "time (s)"]
    by_name = {cells[0][1]: cells for cells in rows}
    assert list(by_name) == ["trilinear", "mDCSRN b4u4", "mDCSRN b8u4", "mDCSRN-GAN b8u4"]
    for run in sorted(p for p in sweep.iterdir() if p.is_dir()):
        metrics = json.loads((run / "metrics.json").read_text())
        tag = yaml.safe_load((run / ".hydra" / "config.yaml").read_text())["tags"][0]
        cells = by_name[tag]
        for (attrs, shown), (key, digits) in zip(cells[1:4], (("psnr", 2), ("ssim", 4), ("nrmse", 4))):
            mean, std = metrics["methods"]["model"][key], metrics["methods"]["model"][f"{key}_std"]
            assert (float(attrs["data-mean"]), float(attrs["data-std"])) == (mean, std)
            assert shown == f"{mean:.{digits}f} ± {std:.{digits}f}"
        assert int(cells[4][0]["data-value"]) == metrics["params"] and cells[4][1] == f"{metrics['params'] / 1e6:.2f}M"
        assert float(cells[5][0]["data-value"]) == metrics["seconds_per_volume"]
        assert cells[5][1] == f"{metrics['seconds_per_volume']:.2f}"
    assert by_name["trilinear"][1][1] == "31.50 ± 0.50" and by_name["trilinear"][4][1] == "N/A"
    # the best model value of each column in bold: PSNR of b8u4, SSIM and NRMSE of the GAN run
    best = {(cells[0][1], attrs["data-key"]) for cells in rows for attrs, _ in cells[1:4] if "best" in attrs.get("class", "")}
    assert best == {("mDCSRN b8u4", "psnr"), ("mDCSRN-GAN b8u4", "ssim"), ("mDCSRN-GAN b8u4", "nrmse")}

    # self-contained: every image a PNG data URI, no URL to anything outside the file
    assert page.urls and all(key == "src" and url.startswith("data:image/png;base64,") for _, key, url in page.urls)
    assert not {"link", "script", "iframe", "object"} & page.tags
    outside = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", text)  # base64 holds '/' too
    for scheme in ("http:", "https:", "file:", "//", "url("):
        assert scheme not in outside
    decoded = [base64.b64decode(src.split(",", 1)[1], validate=True) for src in page.images]
    assert all(d.startswith(PNG_MAGIC) for d in decoded)
    # the curves (PSNR and SSIM side by side) and the three runs' own test panels, byte for byte
    assert decoded[0] == (out / "val_curves.png").read_bytes()
    assert decoded[1:] == [(run / "panels" / "test.png").read_bytes() for run in sorted(p for p in sweep.iterdir() if p.is_dir())]
    curves = plt.imread(out / "val_curves.png")
    assert curves.shape[1] > 1.8 * curves.shape[0]  # two plots side by side


def test_html_without_figures_is_tables_only(sweep: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    assert report_main([str(sweep), "--out", str(out), "--html", "--no-figures"]) == 0
    page = Page()
    page.feed((out / "report.html").read_text(encoding="utf-8"))
    assert len(page.rows) == 5 and page.images == []


def test_zoom_window_finds_the_detailed_region() -> None:
    image = np.zeros((40, 50))
    image[22:34, 5:17] = np.random.default_rng(0).random((12, 12))  # texture in a flat field
    r, c, h, w = zoom_window(image, fraction=0.3)
    assert (h, w) == (12, 15)
    assert 22 - h < r <= 22 + 2 and 5 - w < c <= 5 + 2  # the window overlaps the texture...
    assert r + h <= 40 and c + w <= 50  # ...and lies inside the image
    covered = image[r : r + h, c : c + w].astype(bool).sum()
    assert covered >= 0.6 * 12 * 12
    with pytest.raises(ValueError, match="expected a 2D image"):
        zoom_window(np.zeros((4, 4, 4)))


def test_inset_goes_to_the_corner_farthest_from_the_window() -> None:
    # (row, col, h, w) on a 100x100 image; axes coordinates: x right, y up (row 0 on top)
    assert inset_bounds((70, 70, 20, 20), (100, 100)) == pytest.approx((0.0, 0.58, 0.42, 0.42))  # lower right -> upper left
    assert inset_bounds((5, 5, 20, 20), (100, 100)) == pytest.approx((0.58, 0.0, 0.42, 0.42))  # upper left -> lower right
    assert inset_bounds((10, 75, 20, 20), (100, 100)) == pytest.approx((0.0, 0.0, 0.42, 0.42))  # upper right -> lower left


def test_panel_frames_the_zoomed_region_in_every_column(tmp_path: Path) -> None:
    hr = np.zeros((32, 32))
    hr[4:14, 18:28] = np.random.default_rng(1).random((10, 10))
    images = {"LR": hr * 0.5, "SR": hr * 0.9, "GAN-SR": hr, "HR": hr}
    with_zoom = plt.imread(save_panel(tmp_path / "z.png", images, reference="HR", error_of="GAN-SR"))
    without = plt.imread(save_panel(tmp_path / "n.png", images, reference="HR", error_of="GAN-SR", zoom=False))
    assert with_zoom.shape == without.shape  # five columns either way

    def framed(rgb: np.ndarray) -> list[int]:
        # pixels of the frame colour #ffcc00 (grey and magma images hold none) in each fifth
        mask = (rgb[..., 0] > 0.95) & (np.abs(rgb[..., 1] - 0.8) < 0.06) & (rgb[..., 2] < 0.1)
        return [int(part.sum()) for part in np.array_split(mask, 5, axis=1)]

    assert framed(without[..., :3]) == [0] * 5
    assert min(framed(with_zoom[..., :3])) > 100  # a frame and its inset in each of the 5 columns


@pytest.mark.slow
@pytest.mark.skipif(not CHROMIUM.is_file(), reason="Debian's chromium is not installed (/usr/bin/chromium): apt-get install chromium")
def test_html_report_renders_in_headless_chromium(sweep: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    assert report_main([str(sweep), "--out", str(out), "--html"]) == 0
    shot = tmp_path / "shot.png"
    profile = Path(tempfile.mkdtemp(prefix="chromium-profile-"))
    try:
        proc = subprocess.run(
            [
                str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                f"--user-data-dir={profile}", f"--screenshot={shot}", "--window-size=1400,1200",
                (out / "report.html").resolve().as_uri(),
            ],
            capture_output=True, text=True, timeout=120,
        )
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    assert proc.returncode == 0 and shot.is_file(), proc.stderr[-2000:]
    pixels = plt.imread(shot)[..., :3]
    assert pixels.shape[:2] == (1200, 1400)
    # not a blank or error page: dark table text on white, and the embedded images drawn
    # (a broken image would leave only text): many distinct grey levels and colours
    assert (pixels.mean(axis=2) < 0.3).mean() > 0.002
    assert len(np.unique((pixels * 255).astype(np.uint8).reshape(-1, 3), axis=0)) > 200
