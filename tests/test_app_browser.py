"""The web app in a real browser: headless Chromium (Debian's ``chromium`` + ``chromium-driver``) via selenium.

Upload an image, pick a direction, press Edit, wait for the result; an unknown direction shows its
error in the page; make a direction and edit with it; search by meaning; browse the packs. Every
test saves a screenshot (into ``$P2PZ_APP_SCREENSHOTS`` when set: ``docs/img`` regenerates the
pictures docs/app.md shows; else into the test's temp folder).

No browser is downloaded: without ``/usr/bin/chromium`` and ``chromedriver`` the tests skip and say
how to install them (``apt-get install chromium chromium-driver``, or ``bash .ci/browser``).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

pytest.importorskip("gradio", reason='the app needs gradio: pip install "p2pz-directions[app]"')
pytest.importorskip("selenium", reason='pip install "p2pz-directions[test]" (selenium)')

CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser")) if p), None)
CHROMEDRIVER = shutil.which("chromedriver") or (
    "/usr/bin/chromedriver" if Path("/usr/bin/chromedriver").is_file() else None
)
if CHROMIUM is None or CHROMEDRIVER is None:
    pytest.skip(
        "headless Chromium not found: apt-get install chromium chromium-driver (or bash .ci/browser)",
        allow_module_level=True,
    )

from app_server import start_app  # noqa: E402
from selenium import webdriver  # noqa: E402
from selenium.common.exceptions import StaleElementReferenceException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

WIDTH, HEIGHT = 1280, 1500
EDIT_TIMEOUT_S = 180


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = start_app(tmp_path_factory.mktemp("browser-demo"))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def browser():
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--disable-extensions",
        f"--window-size={WIDTH},{HEIGHT}",
        "--lang=en-US",
    ):
        opts.add_argument(arg)
    drv = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    drv.set_page_load_timeout(60)
    yield drv
    drv.quit()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    d = os.environ.get("P2PZ_APP_SCREENSHOTS")
    path = Path(d) if d else tmp_path_factory.mktemp("screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def picture(tmp_path_factory) -> Path:
    from p2pz_directions.editing.demo import demo_image

    p = tmp_path_factory.mktemp("pics") / "cat.png"
    demo_image(64).save(p)
    return p


@pytest.fixture
def page(browser, server):
    browser.get(server.url)
    WebDriverWait(browser, 60).until(lambda d: d.find_elements(By.ID, "edit-button"))
    return browser


# ------------------------------------------------------------------------------------------ helpers
def save(drv, shots: Path, name: str) -> Path:
    """A screenshot of the page, made small (palette PNG, at most 1000 px wide)."""
    from PIL import Image

    path = shots / f"{name}.png"
    raw = shots / f".{name}-raw.png"
    drv.save_screenshot(str(raw))
    with Image.open(raw) as im:
        im = im.convert("RGB")
        if im.width > 1000:
            im = im.resize((1000, round(im.height * 1000 / im.width)), Image.Resampling.LANCZOS)
        im.quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)
    raw.unlink()
    assert path.stat().st_size > 1000
    return path


def text_of(drv, elem_id: str) -> str:
    try:
        return drv.find_element(By.ID, elem_id).text
    except StaleElementReferenceException:
        return ""


def wait_text(drv, elem_id: str, needle: str, timeout: float = EDIT_TIMEOUT_S) -> str:
    WebDriverWait(drv, timeout).until(lambda d: needle in text_of(d, elem_id))
    return text_of(drv, elem_id)


def pick(drv, elem_id: str, option: str) -> None:
    """Open the dropdown ``elem_id`` and click its option ``option``."""
    drv.find_element(By.CSS_SELECTOR, f"#{elem_id} input").click()
    sel = f"#{elem_id} li[role=option][aria-label='{option}']"
    WebDriverWait(drv, 20).until(lambda d: d.find_elements(By.CSS_SELECTOR, sel))
    drv.find_element(By.CSS_SELECTOR, sel).click()
    WebDriverWait(drv, 20).until(
        lambda d: d.find_element(By.CSS_SELECTOR, f"#{elem_id} input").get_attribute("value") == option
    )


def type_into(drv, elem_id: str, text: str, enter: bool = False) -> None:
    el = drv.find_element(By.CSS_SELECTOR, f"#{elem_id} input, #{elem_id} textarea")
    el.click()
    el.send_keys(Keys.CONTROL, "a")
    el.send_keys(Keys.DELETE)
    el.send_keys(text)
    if enter:
        el.send_keys(Keys.ENTER)


def upload(drv, picture: Path) -> None:
    drv.find_element(By.CSS_SELECTOR, "#input-image input[type=file]").send_keys(str(picture))
    WebDriverWait(drv, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#input-image img"))


def result_image(drv, elem_id: str = "out-edit"):
    imgs = drv.find_elements(By.CSS_SELECTOR, f"#{elem_id} img")
    if not imgs:
        return None
    w = drv.execute_script("return arguments[0].complete ? arguments[0].naturalWidth : 0", imgs[0])
    return imgs[0] if w else None


def scroll_top(drv) -> None:
    drv.execute_script("window.scrollTo(0, 0)")
    time.sleep(0.3)


# ------------------------------------------------------------------------------------------ tests
def test_upload_pick_a_direction_and_edit(page, picture, shots):
    upload(page, picture)
    # pick the direction from its two concepts: the direction field follows
    pick(page, "source", "demo:cat")
    pick(page, "target", "demo:dog")
    WebDriverWait(page, 20).until(
        lambda d: (
            d.find_element(By.CSS_SELECTOR, "#direction input").get_attribute("value") == "demo:cat->dog"
        )
    )
    assert result_image(page) is None
    page.find_element(By.ID, "edit-button").click()
    WebDriverWait(page, EDIT_TIMEOUT_S).until(lambda d: result_image(d) is not None)
    img = result_image(page)
    assert page.execute_script("return arguments[0].naturalWidth", img) == 64
    assert page.execute_script("return arguments[0].naturalHeight", img) == 64
    status = wait_text(page, "edit-status", "pix2pix-zero")
    assert "demo:cat@1->dog@1" in status and "Error" not in status
    assert result_image(page, "out-input") is not None  # input | reconstruction | edit side by side
    assert result_image(page, "out-recon") is not None
    assert page.find_elements(By.CSS_SELECTOR, "#download a")  # the download link
    scroll_top(page)
    save(page, shots, "app-edit")


def test_pick_from_the_direction_list_with_another_editor(page, picture, shots):
    upload(page, picture)
    pick(page, "direction", "dog->cat")
    pick(page, "editor", "diffedit")
    page.find_element(By.ID, "edit-button").click()
    status = wait_text(page, "edit-status", "diffedit")
    assert "dog@1->cat@1" in status
    WebDriverWait(page, 30).until(
        lambda d: result_image(d) is not None and result_image(d, "out-mask") is not None
    )
    scroll_top(page)
    save(page, shots, "app-diffedit-mask")


def test_unknown_direction_shows_the_error_in_the_page(page, picture, shots):
    upload(page, picture)
    type_into(page, "direction", "cat->unicorn", enter=True)
    page.find_element(By.ID, "prompt").click()  # leave the field: the typed value is taken
    page.find_element(By.ID, "edit-button").click()
    status = wait_text(page, "edit-status", "Error")
    assert "unknown direction 'cat->unicorn'" in status
    assert "Traceback" not in page.page_source
    assert result_image(page) is None
    scroll_top(page)
    save(page, shots, "app-error")


def test_make_a_direction_then_edit_with_it(page, picture, shots):
    page.find_element(By.XPATH, "//button[@role='tab' and contains(., 'Make your own direction')]").click()
    type_into(page, "build-source", "lion")
    type_into(page, "build-target", "tiger")
    page.find_element(By.ID, "build-button").click()
    status = wait_text(page, "build-status", "Built")
    assert "local:lion->tiger" in status and "published" in status
    scroll_top(page)
    save(page, shots, "app-build")
    # immediately pickable: the Edit tab's direction is now the new one
    page.find_element(By.XPATH, "//button[@role='tab' and normalize-space(.)='Edit']").click()
    WebDriverWait(page, 20).until(
        lambda d: (
            d.find_element(By.CSS_SELECTOR, "#direction input").get_attribute("value") == "local:lion->tiger"
        )
    )
    upload(page, picture)
    page.find_element(By.ID, "edit-button").click()
    status = wait_text(page, "edit-status", "pix2pix-zero")
    assert "local:lion@1->tiger@1" in status


def test_search_by_meaning_picks_a_direction(page, shots):
    type_into(page, "search-query", "kitten into a puppy")
    page.find_element(By.ID, "search-button").click()
    WebDriverWait(page, 120).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#search-hits label"))
    labels = [e.text for e in page.find_elements(By.CSS_SELECTOR, "#search-hits label")]
    assert any(t.startswith("demo:cat->dog") for t in labels), labels
    hit = next(
        e
        for e in page.find_elements(By.CSS_SELECTOR, "#search-hits label")
        if e.text.startswith("demo:cat->dog")
    )
    hit.click()
    WebDriverWait(page, 20).until(
        lambda d: (
            d.find_element(By.CSS_SELECTOR, "#direction input").get_attribute("value") == "demo:cat->dog"
        )
    )
    save(page, shots, "app-search")


def test_browse_shows_the_installed_packs(page, shots):
    page.find_element(By.XPATH, "//button[@role='tab' and normalize-space(.)='Browse']").click()
    WebDriverWait(page, 20).until(lambda d: "demo" in text_of(d, "browse-table"))
    table = text_of(page, "browse-table")
    for word in ("demo", "cat", "dog", "other", "horse", "openai/clip-vit-large-patch14"):
        assert word in table
    type_into(page, "browse-concept", "demo:cat", enter=True)
    detail = wait_text(page, "browse-detail", "demo:cat@1")
    assert "captions" in detail and "sha256" in detail
    # pulling offline says so, in the page
    type_into(page, "pull-repo", "someone/their-pack")
    page.find_element(By.ID, "pull-button").click()
    msg = wait_text(page, "browse-status", "Error", timeout=60)
    assert "someone/their-pack" in msg
    scroll_top(page)
    save(page, shots, "app-browse")
