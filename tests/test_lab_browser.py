"""A student's first hour in JupyterLab, in a real browser.

`attention-course lab` serves a fresh copy of the student notebooks on a loopback port;
headless Chromium (Debian's ``chromium`` and ``chromium-driver``, driven with Selenium)
opens lesson 02, runs it, answers the first exercise wrong and then right, then every
exercise, and the test reads what the page shows: the one-line "not done yet", the check's
message, "all checks passed", the rendered figures, no nbgrader instructor menu, no news
pop-up, a lesson that opens saved. Screenshots of each step go to ``tests/artifacts/lab/``
(kept by CI, ignored by git).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import nbformat
import pytest

from helpers.course.source import build_notebook

from conftest import ROOT, free_port, lesson_named, wait_for

ARTIFACTS = ROOT / "tests" / "artifacts" / "lab"
CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
WIDTH, HEIGHT = 1280, 900  # a laptop screen

try:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
except ImportError:  # the `test` extra installs it
    webdriver = None

pytestmark = [
    pytest.mark.skipif(webdriver is None, reason="selenium is not installed (pip install -e '.[test]')"),
    pytest.mark.skipif(CHROMIUM is None or CHROMEDRIVER is None,
                       reason="needs Debian's chromium and chromium-driver (apt-get install -y chromium "
                              "chromium-driver; .ci/run installs them)"),
]

LESSON = lesson_named("02")
NOTEBOOK = f"{LESSON.name}/{LESSON.student.name}"
# Exercise 1 answered with a plausible mistake: the scaling belongs to exercise 3.
WRONG_DOT_SCORES = '''def dot_scores(q: Tensor, k: Tensor) -> Tensor:
    return q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])'''


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """`attention-course lab` on a loopback port, on a temporary copy: (base URL, token)."""
    tmp = tmp_path_factory.mktemp("lab")
    runtime = tmp / "runtime"
    env = dict(os.environ, JUPYTER_RUNTIME_DIR=str(runtime),
               JUPYTERLAB_SETTINGS_DIR=str(tmp / "settings"),  # fresh: no pop-up answered before
               JUPYTERLAB_WORKSPACES_DIR=str(tmp / "workspaces"))
    command = [sys.executable, "-m", "helpers.course.cli", "lab", "--dir", str(tmp / "my-work"),
               "--no-browser", "--ip", "127.0.0.1", "--port", str(free_port()),
               "--IdentityProvider.token=course-test-token"]
    process = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    try:
        info_file = wait_for(lambda: next(runtime.glob("jpserver-*.json"), None), 180,
                         "the lab's jpserver-*.json", process)
        info = wait_for(lambda: info_file.stat().st_size and json.loads(info_file.read_text()), 30,
                    "the lab's server info")
        yield info["url"].rstrip("/"), info["token"]
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """Headless Chromium, fresh profile, nothing fetched from outside."""
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                     "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                     f"--window-size={WIDTH},{HEIGHT}",
                     f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(argument)
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        options.add_argument("--no-sandbox")  # Chromium refuses to run as root with its sandbox
    shutil.rmtree(ARTIFACTS, ignore_errors=True)  # this run's screenshots only
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_window_size(WIDTH, HEIGHT)
    yield driver
    driver.quit()


def screenshot(driver, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(ARTIFACTS / f"{name}.png"))


# The page, read with small JavaScript probes over JupyterLab's DOM.
ERRORS = ".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']"  # tracebacks, warnings
CELLS = "return [...document.querySelectorAll('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook .jp-Cell')]"


def cell_indices(text: str) -> list[int]:
    """Indices of the student notebook's cells whose source contains ``text`` (the page draws
    a cell's editor only once it is scrolled into view, so the file is read instead)."""
    cells = nbformat.read(LESSON.student, as_version=4).cells
    return [index for index, cell in enumerate(cells) if text in cell.source]


def cell_output(driver, index: int) -> str:
    return driver.execute_script(CELLS + "[arguments[0]].querySelector('.jp-OutputArea')?.textContent || ''", index)


def cell_prompt(driver, index: int) -> str:
    return driver.execute_script(
        CELLS + "[arguments[0]].querySelector('.jp-InputArea-prompt')?.textContent || ''", index)


def kernel_idle(driver) -> bool:
    return driver.execute_script(
        "const s = document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook-ExecutionIndicator');"
        "return s !== null && s.getAttribute('data-status') === 'idle'")


def click_menu(driver, menu: str, item: str) -> None:
    driver.find_element(By.XPATH, f"//div[contains(@class,'lm-MenuBar-itemLabel')][text()='{menu}']").click()
    driver.find_element(By.XPATH, f"//div[contains(@class,'lm-Menu-itemLabel')][text()='{item}']").click()


def replace_cell_source(driver, index: int, source: str) -> None:
    """Select all of a cell's code and put ``source`` in its place, as a paste would."""
    cell = driver.execute_script(CELLS + "[arguments[0]]", index)
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", cell)
    editor = wait_for(lambda: cell.find_elements(By.CSS_SELECTOR, ".cm-content"), 30, f"cell {index}'s editor")[0]
    editor.click()
    editor.send_keys(Keys.CONTROL, "a")
    driver.execute_cdp_cmd("Input.insertText", {"text": source})


def run_cell_and_next(driver, answer: int) -> str:
    """Run the answer cell and the test cell after it (Shift+Enter twice); the test's output."""
    before = cell_prompt(driver, answer + 1)
    driver.switch_to.active_element.send_keys(Keys.SHIFT, Keys.ENTER)
    driver.switch_to.active_element.send_keys(Keys.SHIFT, Keys.ENTER)
    wait_for(lambda: cell_prompt(driver, answer + 1) not in (before, "[*]:") and kernel_idle(driver), 120,
         "the test cell to run")
    return cell_output(driver, answer + 1)


def test_a_student_works_through_lesson_02(lab, browser):
    try:
        student_session(*lab, browser)
    except BaseException:
        screenshot(browser, "failure")  # what the page showed when the test gave up
        raise


def student_session(url: str, token: str, driver) -> None:
    driver.get(f"{url}/lab/tree/{NOTEBOOK}?token={token}")
    wait_for(lambda: driver.execute_script(CELLS + ".length") > 20, 180, "the notebook to open")
    wait_for(lambda: kernel_idle(driver), 180, "the kernel to start")
    screenshot(driver, "01-opened")

    tab = driver.find_element(By.CSS_SELECTOR, ".lm-TabBar-tab.jp-mod-current")
    assert "jp-mod-dirty" not in tab.get_attribute("class"), "the lesson opened already marked unsaved"
    page = driver.find_element(By.TAG_NAME, "body").text
    assert "news" not in page.lower(), "JupyterLab asks about news"
    menus = [e.text for e in driver.find_elements(By.CSS_SELECTOR, ".lm-MenuBar-itemLabel")]
    assert "Run" in menus and not any("nbgrader" in m.lower() for m in menus), menus
    assert not driver.find_elements(By.XPATH, "//*[contains(text(), 'Formgrader') or contains(text(), 'Create Assignment')]")
    assert driver.find_elements(By.XPATH, "//*[contains(@class,'jp-Toolbar')]//*[text()='Validate']"), \
        "nbgrader's Validate button is missing"

    # Run All on the untouched notebook: it stops at the first exercise, which is not done.
    (first_test,) = cell_indices("checks.dot_scores(dot_scores)")
    click_menu(driver, "Run", "Run All Cells")
    output = wait_for(lambda: "not done yet" in cell_output(driver, first_test) and cell_output(driver, first_test),
                  180, "the first test cell's output")
    assert "dot_scores is not done yet" in output
    assert "Traceback" not in output and "helpers/checks" not in output, output
    assert driver.find_elements(By.CSS_SELECTOR, ERRORS), "the not-done message is not shown as an error"
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})",
                          driver.execute_script(CELLS + "[arguments[0]]", first_test))
    screenshot(driver, "02-run-all-not-done")

    answer = first_test - 1
    replace_cell_source(driver, answer, WRONG_DOT_SCORES)
    output = run_cell_and_next(driver, answer)
    assert "the scores are divided by √d_k" in output, output
    assert "Traceback" not in output, output
    screenshot(driver, "03-wrong-answer")

    solutions = [cell.source for cell in build_notebook(LESSON.script).cells
                 if cell.metadata.get("nbgrader", {}).get("solution")]
    replace_cell_source(driver, answer, solutions[0])
    output = run_cell_and_next(driver, answer)
    assert "✓ dot_scores: all checks passed" in output, output
    screenshot(driver, "04-right-answer")

    # The other exercises answered, then the whole notebook from the top.
    stubs = cell_indices("raise NotImplementedError()")
    assert stubs[0] == answer and len(stubs) == len(solutions)
    for index, source in zip(stubs[1:], solutions[1:]):
        replace_cell_source(driver, index, source)
    click_menu(driver, "Run", "Run All Cells")
    last_code = max(index for index, cell in enumerate(nbformat.read(LESSON.student, as_version=4).cells)
                    if cell.cell_type == "code")
    wait_for(lambda: kernel_idle(driver) and cell_prompt(driver, last_code).strip() not in ("[ ]:", "[*]:"),
             300, "the whole notebook to run")
    texts = driver.execute_script(CELLS + ".map(c => c.querySelector('.jp-OutputArea')?.textContent || '')")
    test_cells = cell_indices("from helpers.checks import")
    assert all("all checks passed" in texts[index] for index in test_cells), [texts[i] for i in test_cells]
    errors = driver.find_elements(By.CSS_SELECTOR, ERRORS)
    assert not errors, [error.get_attribute("textContent") for error in errors]
    images = driver.find_elements(By.CSS_SELECTOR, ".jp-RenderedImage img")
    assert len(images) >= 3 and all(driver.execute_script("return arguments[0].naturalWidth", i) > 0 for i in images)
    screenshot(driver, "05-whole-notebook")
    for number, image in enumerate(images, start=1):
        driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", image)
        image.screenshot(str(ARTIFACTS / f"06-figure-{number}.png"))
        drawn, shown = driver.execute_script("return [arguments[0].naturalWidth, arguments[0].width]", image)
        # a figure wider than the notebook is shrunk to fit, and its text with it
        assert shown >= 0.75 * drawn, (f"figure {number} is drawn {drawn} px wide but shown at {shown} px "
                                       f"in a {WIDTH} px window: its text shrinks to {shown / drawn:.0%}")
