#!/usr/bin/env python3
"""Render a run's report.html in headless Chromium and save a PNG screenshot (a check that the page renders).

    python scripts/render_report_screenshot.py results/<run>                 # -> results/<run>/report.png
    python scripts/render_report_screenshot.py results/<run> --out docs/images/report.png --palette
    python scripts/render_report_screenshot.py results/<run> --build         # run `fedtextseg report` first

Needs a Chromium binary (Debian: ``apt-get install -y chromium``; or set ``CHROMIUM=/path/to/chrome``). Chromium
runs offline and sandbox-less (as root in containers): no network, no first-run, no component updates. The test
suite never needs this script; it is for eyes and for the README's screenshot.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")


def find_chromium() -> str:
    if os.environ.get("CHROMIUM"):
        return os.environ["CHROMIUM"]
    for name in CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    sys.exit("render_report_screenshot: no Chromium found (apt-get install -y chromium, or set CHROMIUM=...)")


def screenshot(page: Path, out: Path, width: int = 1280, height: int = 6000, timeout: int = 120) -> Path:
    """Headless Chromium screenshot of ``page`` (an HTML file) into ``out`` (PNG)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="fts-chromium-") as profile:
        cmd = [find_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--no-first-run", "--disable-dev-shm-usage", "--hide-scrollbars",
               f"--user-data-dir={profile}", f"--window-size={width},{height}",
               f"--screenshot={out.resolve()}", page.resolve().as_uri()]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 or not out.is_file() or out.stat().st_size == 0:
        sys.exit(f"render_report_screenshot: Chromium failed (status {proc.returncode}):\n{proc.stderr[-2000:]}")
    return out


def tidy(png: Path, palette: bool = False, margin: int = 24) -> Path:
    """Crop the blank space below the page's content; optionally save as a 256-colour PNG (smaller, for docs)."""
    from PIL import Image, ImageChops

    with Image.open(png) as im:
        rgb = im.convert("RGB")
    box = ImageChops.difference(rgb, Image.new("RGB", rgb.size, (255, 255, 255))).getbbox()
    if box:
        rgb = rgb.crop((0, 0, rgb.width, min(rgb.height, box[3] + margin)))
    out = rgb.quantize(colors=256, method=Image.Quantize.FASTOCTREE) if palette else rgb
    out.save(png, optimize=True)
    return png


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", type=Path, help="run folder holding report.html")
    p.add_argument("--out", type=Path, default=None, help="PNG to write (default: RUN_DIR/report.png)")
    p.add_argument("--width", type=int, default=1280)
    p.add_argument("--height", type=int, default=6000, help="window height; blank space below is cropped")
    p.add_argument("--palette", action="store_true", help="save a 256-colour PNG (smaller, for docs/images)")
    p.add_argument("--build", action="store_true", help="(re)build the report first (fedtextseg report)")
    p.add_argument("--overlays", type=int, default=1, help="with --build: unseen cases to overlay")
    args = p.parse_args(argv)
    if args.build:
        from fedtextseg.report import build_report

        build_report(args.run_dir, overlays=args.overlays)
    page = args.run_dir / "report.html"
    if not page.is_file():
        sys.exit(f"render_report_screenshot: {page} does not exist; run `fedtextseg report {args.run_dir}` first "
                 "(or pass --build)")
    out = tidy(screenshot(page, args.out or args.run_dir / "report.png", args.width, args.height), args.palette)
    print(f"screenshot: {out} ({out.stat().st_size / 1024:.0f} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
