"""The chat page in a real browser (headless Chromium through Selenium): a wrong key reads as plain words,
then an uploaded PNG, a question, a streamed answer, a follow-up about the same image, and a screenshot."""

from __future__ import annotations

import shutil

import pytest
from PIL import Image
from serving import RED, running

from vistune.data.records import Turn
from vistune.infer.engine import ServeConfig
from vistune.infer.generate import load_generator
from vistune.infer.server import create_app
from vistune.model.vlm import save_vlm

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
HOW = "apt-get install -y chromium chromium-driver (Debian), and pip install selenium"
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER), reason=f"needs Chromium and chromedriver: {HOW}")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--window-size=1100,800"]  # fmt: skip
KEY = "sk-page"


@pytest.fixture(scope="module")
def browser():
    webdriver = pytest.importorskip("selenium.webdriver", reason=f"needs selenium: {HOW}")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService(DRIVER), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def gen(tiny_vlm, tmp_path_factory):
    out = tmp_path_factory.mktemp("page") / "model"
    save_vlm(tiny_vlm("clip", "mlp2x_gelu", seed=3), out)
    return load_generator(str(out), device="cpu")


def test_upload_ask_stream_follow_up_and_screenshot(browser, gen, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    picture = tmp_path / "red.png"
    Image.new("RGB", (40, 30), RED).save(picture)
    app = create_app(gen, ServeConfig(model_name="tiny", api_key=KEY))
    wait = WebDriverWait(browser, 30)
    with running(app) as url:
        browser.get(url)
        wait.until(lambda d: "images and text" in d.find_element(By.ID, "model").text)
        browser.find_element(By.ID, "file").send_keys(str(picture))
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#pending img"))
        _set(browser, "maxTokens", "8")
        browser.find_element(By.ID, "prompt").send_keys("What colour is this?")
        browser.find_element(By.ID, "send").click()
        error = wait.until(lambda d: d.find_element(By.ID, "error").text)
        assert "needs a valid API key" in error  # said in plain words; the message and image stay
        assert browser.find_elements(By.CSS_SELECTOR, "#pending img")
        _set(browser, "key", KEY)
        browser.find_element(By.ID, "send").click()
        first = _answer(browser, wait, 1)
        expected = gen.generate([[Turn("user", "<image>\nWhat colour is this?")]], [[Image.open(picture)]], 8)
        assert first["text"] == expected[0] and first["chunks"] >= 2  # streamed, piece by piece
        browser.find_element(By.ID, "prompt").send_keys("And its shape?")
        browser.find_element(By.ID, "send").click()
        second = _answer(browser, wait, 2)
        assert second["text"] and app.state.engine.cache.hits == 1  # the follow-up re-sent the image: cached
        assert len(browser.find_elements(By.CSS_SELECTOR, ".msg.user img")) == 1
        shot = tmp_path / "chat.png"
        assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 1000
        browser.find_element(By.ID, "newChat").click()
        assert not browser.find_elements(By.CSS_SELECTOR, ".msg")


def _set(browser, element_id: str, value: str) -> None:
    from selenium.webdriver.common.by import By

    field = browser.find_element(By.ID, element_id)
    field.clear()
    field.send_keys(value)
    browser.execute_script("arguments[0].dispatchEvent(new Event('change'))", field)


def _answer(browser, wait, n: int) -> dict:
    """The n-th assistant message once it has finished: its text and how many pieces it arrived in."""
    from selenium.webdriver.common.by import By

    done = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.assistant[data-done='1']")[n - 1 :])[0]
    text = browser.execute_script("return arguments[0].firstChild.textContent", done)
    return {"text": text, "chunks": int(done.get_attribute("data-chunks"))}


def test_why_shows_the_map_of_an_answer_over_its_image(browser, gen, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    picture = tmp_path / "red.png"
    Image.new("RGB", (40, 30), RED).save(picture)
    wait = WebDriverWait(browser, 60)
    with running(create_app(gen, ServeConfig(model_name="tiny", api_key=KEY, explain=True))) as url:
        browser.get(url)
        wait.until(lambda d: "images and text" in d.find_element(By.ID, "model").text)
        _set(browser, "key", KEY)
        browser.find_element(By.ID, "file").send_keys(str(picture))
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#pending img"))
        _set(browser, "maxTokens", "4")
        browser.find_element(By.ID, "prompt").send_keys("What colour is this?")
        browser.find_element(By.ID, "send").click()
        answer = _answer(browser, wait, 1)
        assert answer["text"]
        browser.find_element(By.CSS_SELECTOR, ".msg.assistant button.why").click()
        shown = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".msg.assistant .why-map img"))
        assert shown[0].get_attribute("src").startswith("data:image/png;base64,")
        assert browser.execute_script("return arguments[0].naturalWidth", shown[0]) > 100  # the overlay drew
        assert not browser.find_elements(By.ID, "error") or not browser.find_element(By.ID, "error").text


def test_without_explain_there_is_no_why_button(browser, gen, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    picture = tmp_path / "red.png"
    Image.new("RGB", (40, 30), RED).save(picture)
    wait = WebDriverWait(browser, 60)
    with running(create_app(gen, ServeConfig(model_name="tiny"))) as url:
        browser.get(url)
        wait.until(lambda d: "images and text" in d.find_element(By.ID, "model").text)
        browser.find_element(By.ID, "file").send_keys(str(picture))
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#pending img"))
        _set(browser, "maxTokens", "4")
        browser.find_element(By.ID, "prompt").send_keys("What colour is this?")
        browser.find_element(By.ID, "send").click()
        assert _answer(browser, wait, 1)["text"]
        assert not browser.find_elements(By.CSS_SELECTOR, "button.why")
