"""The demo page (demo/app.py): its analysis equals scripts/predict.py, and the page works in a real browser.

The browser test starts the app on 127.0.0.1 on a free port and drives it from headless Chromium (Debian's
`chromium` + `chromium-driver`, through selenium): a phantom upload shows predict.py's EF, a corrupt file shows
predict.py's reason, and a good upload after it still works. Without a browser it is skipped with the reason.
"""

import importlib.util
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import test_evaluation
from data_fixtures import tiny_corpus, truncate
from test_evaluation import load_script
from test_modeling import tiny_config

from modeling_echoai import EchoAIForPreTraining
from video_io_echoai import decode_all_frames, write_video
from video_processing_echoai import EchoAIVideoProcessor


REPO = Path(__file__).resolve().parents[1]
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
tiny_model_dir = test_evaluation.model_dir  # the fixture: a tiny saved EF model (4 frames of 32²)


def load_demo():
    spec = importlib.util.spec_from_file_location("echoai_demo_app", REPO / "demo" / "app.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while being defined
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir) -> Path:
    """The tiny saved EF model of the evaluation tests; `ECHOAI_DEMO_MODEL=<fine-tuned folder>` runs the tests (and
    takes the README's screenshot, with `ECHOAI_DEMO_SCREENSHOT=docs/images/demo.png`) on a real one."""
    return Path(os.environ["ECHOAI_DEMO_MODEL"]) if os.environ.get("ECHOAI_DEMO_MODEL") else tiny_model_dir


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> tuple[Path, Path]:
    """A phantom video and a file that is not a video."""
    good = sorted((tiny_corpus(tmp_path_factory) / "Videos").glob("*.avi"))[0]
    bad = tmp_path_factory.mktemp("bad") / "broken.avi"
    bad.write_bytes(b"RIFF" + os.urandom(2000))
    return good, bad


def predicted(model_dir: Path, video: Path, tmp_path: Path, protocol: str = "all_clips") -> dict:
    output = tmp_path / f"{video.stem}.json"
    load_script("predict").main([str(video), "--model_name_or_path", str(model_dir), "--protocol", protocol,
                                 "--output", str(output)])  # fmt: skip
    return json.loads(output.read_text())[0]


def test_the_analysis_is_predict_py(model_dir, videos, tmp_path):
    good, bad = videos
    demo = load_demo().EchoAIDemo(str(model_dir), work_dir=tmp_path / "work")
    for protocol in ("all_clips", "one_clip"):
        analysis = demo.analyse(good, protocol)
        shown = float(re.search(r"EF ([\d.]+) %", analysis.summary).group(1))
        assert shown == round(predicted(model_dir, good, tmp_path, protocol)["EF"], 1)
        assert Path(analysis.curve).stat().st_size > 1000 and Path(analysis.saliency).stat().st_size > 1000
    cut, empty, short = tmp_path / "cut.avi", tmp_path / "empty.avi", tmp_path / "two_frames.avi"
    shutil.copy(good, cut)
    truncate(cut)
    empty.write_bytes(b"")
    write_video(short, decode_all_frames(good)[:2], fps=50)
    for upload in (bad, cut, empty):  # predict.py's one-line reason, the file named but not its folder
        failure = demo.analyse(upload)
        assert failure.error == predicted(model_dir, upload, tmp_path)["error"].replace(str(upload), upload.name)
        assert not failure.summary
    two = demo.analyse(short)  # a 2-frame clip: predict.py scores it (the frames repeat), and so does the page
    assert float(re.search(r"EF ([\d.]+) %", two.summary).group(1)) == round(
        predicted(model_dir, short, tmp_path)["EF"], 1
    )


def test_a_dicom_upload_is_predict_py(model_dir, tmp_path):
    pytest.importorskip("pydicom", reason="pydicom is needed for DICOM (pip install -e .[dicom])")
    from dicom_fixtures import echo_frames, write_dicom

    cine = tmp_path / "IM_0001"  # no extension, as DICOMDIR exports name them
    write_dicom(cine, echo_frames(24, seed=1))
    analysis = load_demo().EchoAIDemo(str(model_dir), work_dir=tmp_path / "work").analyse(cine)
    assert analysis.error is None and analysis.saliency is not None
    assert float(re.search(r"EF ([\d.]+) %", analysis.summary).group(1)) == round(
        predicted(model_dir, cine, tmp_path)["EF"], 1
    )


def test_a_pretraining_checkpoint_shows_its_reconstruction(videos, tmp_path):
    good, bad = videos
    EchoAIForPreTraining(tiny_config()).save_pretrained(tmp_path / "pretrained")
    EchoAIVideoProcessor(num_frames=4, image_size=32).save_pretrained(tmp_path / "pretrained")
    demo = load_demo().EchoAIDemo(str(tmp_path / "pretrained"), work_dir=tmp_path / "work")
    analysis = demo.analyse(good)
    assert "Pretraining checkpoint" in analysis.summary and Path(analysis.reconstruction).stat().st_size > 1000
    assert "not a video" in demo.analyse(bad).error


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def browser():
    """Headless Chromium through selenium, or a skip that says what is missing."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e .[test])")
    pytest.importorskip("gradio", reason="gradio is not installed (pip install -e .[test])")
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip(
            "Debian's chromium and chromium-driver are not installed (apt-get install chromium chromium-driver)"
        )
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1400,1000"):  # fmt: skip
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))


@pytest.fixture
def app_url(model_dir, tmp_path):
    port = free_port()
    env = {**os.environ, "GRADIO_SERVER_NAME": "127.0.0.1", "GRADIO_SERVER_PORT": str(port),
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    log = (tmp_path / "app.log").open("w")
    process = subprocess.Popen([sys.executable, str(REPO / "demo" / "app.py"), "--model", str(model_dir)],
                               env=env, stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the demo exited with {process.returncode}: {(tmp_path / 'app.log').read_text()[-2000:]}")
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            time.sleep(0.5)
    else:
        process.kill()
        pytest.fail("the demo did not start within 120 s")
    yield url
    process.terminate()
    process.wait(timeout=30)
    log.close()


def upload_and_read(driver, path: Path, element_id: str, pattern: str, timeout: float = 120) -> str:
    """Upload `path` through the page's file input; return the text of `#element_id` once it matches `pattern`."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(driver, timeout)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#upload input[type=file]"))[0].send_keys(str(path))

    def matched(d):
        text = d.find_element(By.ID, element_id).text
        return text if re.search(pattern, text) else False

    return wait.until(matched)


def clear_upload(driver) -> None:
    from selenium.webdriver.common.by import By

    driver.find_element(By.CSS_SELECTOR, "#upload button[aria-label='Clear']").click()


def test_the_page_in_a_real_browser(app_url, model_dir, videos, tmp_path):
    good, bad = videos
    driver = browser()
    try:
        driver.get(app_url)
        assert "not a medical device" in driver.page_source
        text = upload_and_read(driver, good, "ef", r"EF [\d.]+ %")
        expected = predicted(model_dir, good, tmp_path)
        assert float(re.search(r"EF ([\d.]+) %", text).group(1)) == round(expected["EF"], 1)

        clear_upload(driver)
        error = upload_and_read(driver, bad, "error", "Could not read")
        assert predicted(model_dir, bad, tmp_path)["error"].replace(str(bad), bad.name) in error

        clear_upload(driver)
        text = upload_and_read(driver, good, "ef", r"EF [\d.]+ %")  # the page still works after a bad file
        assert float(re.search(r"EF ([\d.]+) %", text).group(1)) == round(expected["EF"], 1)
        screenshot = Path(os.environ.get("ECHOAI_DEMO_SCREENSHOT", tmp_path / "demo.png"))
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        assert driver.save_screenshot(str(screenshot))
    finally:
        driver.quit()
