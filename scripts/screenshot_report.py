"""Open a run's report in headless Chromium, report console errors and what is on the page, save a screenshot.

    python scripts/screenshot_report.py runs/digits docs/report-digits.png

Prints JSON: console errors, whether the headline table is there, how many region cards. Needs the Debian packages
chromium and chromium-driver (`.ci/run` installs them) and selenium (the test extras). The browser test calls
``open_report`` too.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

CHROMEDRIVER_NAMES = ("chromedriver", "chromium-driver")


def browser_missing() -> str | None:
    """Why the browser cannot run here (None when it can)."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[test]')"
    if not any(shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome")):
        return "no Chromium binary (Debian: apt-get install chromium chromium-driver; .ci/run does this)"
    if not any(shutil.which(name) for name in CHROMEDRIVER_NAMES):
        return "no chromedriver (Debian: apt-get install chromium-driver; .ci/run does this)"
    return None


def open_report(html: Path, screenshot: Path | None = None, width: int = 1280, height: int = 2000) -> dict[str, Any]:
    """Load ``html`` from a file: URL in headless Chromium; return its console errors and what the page shows."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     f"--window-size={width},{height}"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver_path = next(shutil.which(name) for name in CHROMEDRIVER_NAMES if shutil.which(name))
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        driver.get(Path(html).resolve().as_uri())
        found = {
            "title": driver.title,
            "console_errors": [entry["message"] for entry in driver.get_log("browser") if entry["level"] == "SEVERE"],
            "headline_rows": len(driver.find_elements("css selector", "#headline tbody tr")),
            "region_cards": [e.get_attribute("data-region") for e in driver.find_elements("css selector",
                                                                                        ".region-card")],
            "status": driver.find_element("id", "status").text,
            "broken_images": driver.execute_script(
                "return Array.from(document.images).filter(i => !(i.complete && i.naturalWidth > 0)).length"),
            "images": driver.execute_script("return document.images.length"),
        }
        if screenshot is not None:
            Path(screenshot).parent.mkdir(parents=True, exist_ok=True)
            driver.save_screenshot(str(screenshot))
        return found
    finally:
        driver.quit()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="a run directory whose report/index.html exists (`defuse report`)")
    parser.add_argument("screenshot", help="where to write the PNG")
    parser.add_argument("--height", type=int, default=2000)
    args = parser.parse_args()
    missing = browser_missing()
    if missing:
        raise SystemExit(f"Cannot open a browser: {missing}.")
    print(json.dumps(open_report(Path(args.run_dir) / "report" / "index.html", Path(args.screenshot),
                                 height=args.height), indent=2))


if __name__ == "__main__":
    main()
