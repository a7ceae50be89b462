"""End to end in a real browser: Debian's headless Chromium drives the running app."""
import os

from selenium.webdriver.common.keys import Keys

from .browser import BROWSER_MARKS, chromium, running_app, wait_for, wait_on_job

pytestmark = BROWSER_MARKS


def grid_cells(driver):
    # The data grid draws on a canvas; its accessible twin holds the cell text (hidden, so read textContent).
    return [cell.get_attribute("textContent") for cell in driver.find_elements("css selector", '[role="gridcell"]')]


def test_model_page_shows_the_inventory(shrink_home, tmp_path):
    with running_app(shrink_home) as url:
        driver = chromium()
        try:
            driver.get(url)  # first visit: the page starts a job that loads the default model
            wait_on_job(driver, shrink_home, lambda d: "model.layers.0.self_attn.q_proj" in grid_cells(d),
                        "the inventory table of the default model", kind="describe")
            body = driver.find_element("tag name", "body").text
            assert "134,515,008 parameters" in body and "210 linear modules" in body
            assert "Weight size by module kind" in body
            driver.save_screenshot(os.path.join(tmp_path, "model-page.png"))

            box = driver.find_element("css selector", 'input[aria-label="Model spec"]')
            box.send_keys(Keys.CONTROL, "a")  # React inputs ignore clear(); select and type over
            box.send_keys("/no/such/model")
            next(b for b in driver.find_elements("tag name", "button") if b.text == "Load").click()
            wait_for(driver, lambda d: "does not exist" in d.find_element("tag name", "body").text, 30,
                     "the one-sentence error for a missing path")
            assert "Traceback" not in driver.find_element("tag name", "body").text
        finally:
            driver.quit()


def test_malformed_upload_shows_the_row_and_page_keeps_working(shrink_home, tmp_path):
    bad = tmp_path / "quiz.jsonl"
    bad.write_text('{"context": "2+2=", "answer": " 4"}\n{"context": "Pick one", "choices": "a|b", "answer": 0}\n')
    with running_app(shrink_home) as url:
        driver = chromium()
        try:
            driver.get(f"{url}/evalsets")
            wait_for(driver, lambda d: "Add your own slice" in d.find_element("tag name", "body").text, 300,
                     "the Eval sets page")
            summary = wait_for(driver, lambda d: next((e for e in d.find_elements("css selector", "summary")
                                                      if "Add your own slice" in e.text), None), 30, "the upload expander")
            summary.click()
            wait_for(driver, lambda d: d.find_element("css selector", 'input[type="file"]'), 30, "the file input")
            driver.find_element("css selector", 'input[type="file"]').send_keys(str(bad))
            button = wait_for(driver, lambda d: next((b for b in d.find_elements("tag name", "button")
                                                      if b.text == "Add slice"), None), 30, "the Add slice button")
            button.click()
            wait_for(driver, lambda d: "row 2: field 'choices' must be a list" in d.find_element("tag name", "body").text,
                     30, "the row-level message")
            body = driver.find_element("tag name", "body").text
            assert "Traceback" not in body and "Baseline of" in body
            driver.save_screenshot(str(tmp_path / "upload-error.png"))
        finally:
            driver.quit()
