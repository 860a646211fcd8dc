"""Rasterise ``viewer/images/deepearth-logo.svg`` to the PNGs the viewer uses.

The viewer's config route serves files without an SVG content type, so the branding
refers to PNG renderings of the SVG. Run after editing the SVG (needs Chromium)::

    .venv/bin/python viewer/tools/render_logo.py
"""

from __future__ import annotations

import os
from pathlib import Path

from playwright.sync_api import sync_playwright

IMAGES = Path(__file__).resolve().parent.parent / "images"
SIZES = {"deepearth-logo.png": 128, "deepearth-logo-192.png": 192}
CHROMIUM = os.environ.get("DEEPEARTH_CHROMIUM", "/usr/bin/chromium")


def main() -> None:
    svg = (IMAGES / "deepearth-logo.svg").read_text()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM,
                                    args=["--headless", "--no-sandbox", "--disable-gpu"])
        for name, size in SIZES.items():
            page = browser.new_page(viewport={"width": size, "height": size})
            body = svg.replace('width="128" height="128"', f'width="{size}" height="{size}"', 1)
            page.set_content(f'<html><body style="margin:0">{body}</body></html>')
            page.screenshot(path=str(IMAGES / name), omit_background=True)
            page.close()
            print(f"wrote {IMAGES / name}")
        browser.close()


if __name__ == "__main__":
    main()
