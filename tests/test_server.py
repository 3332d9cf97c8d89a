"""``openldm serve``, a real server on uvicorn in a child process, driven by ``webuiapi`` (the web UI's
third-party client) and by plain HTTP for the job queue and the bad inputs."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

webuiapi = pytest.importorskip("webuiapi")

KEY = "s3cret-key"
PROMPT = "a red circle in the centre on a blue background"
AUTH = {"Authorization": f"Bearer {KEY}"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``openldm serve`` in a child process."""

    def __init__(self, data: Path, extra: list[str]) -> None:
        self.data, self.extra = data, extra
        self.port = _free_port()
        self.process: subprocess.Popen[str] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Server:
        argv = [sys.executable, "-m", "openldm", "serve", "--port", str(self.port), "--data", str(self.data)]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.process = subprocess.Popen(
            [*argv, "--api-key", KEY, "--threads", "1", *self.extra],
            env=env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/sdapi/v1/samplers", headers=AUTH, timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"the server ended: {self.process.stdout.read() if self.process.stdout else ''}"
                )
            time.sleep(0.2)
        raise TimeoutError("the server did not answer within 60 s")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tiny_single_file) -> dict[str, Path]:
    import shutil

    root = tmp_path_factory.mktemp("server")
    checkpoints = root / "checkpoints"
    checkpoints.mkdir()
    shutil.copy(tiny_single_file("sd1"), checkpoints / "tiny-sd1.safetensors")
    controlnets = root / "controlnets"
    (controlnets / "lines").mkdir(parents=True)
    _random_controlnet(controlnets / "lines" / "cn-lines.safetensors")
    return {"root": root, "checkpoints": checkpoints, "controlnets": controlnets}


def _random_controlnet(path: Path) -> None:
    """A ControlNet for the embedded model, every weight random (its zero convolutions too)."""
    import safetensors.torch
    import torch

    import openldm
    from openldm.nn.controlnet import ControlNetModel

    g = torch.Generator().manual_seed(4)
    net = ControlNetModel(openldm.load().unet.config)
    sd = {f"control_model.{k}": torch.randn(v.shape, generator=g) * 0.05 for k, v in net.state_dict().items()}
    safetensors.torch.save_file(sd, str(path))


@pytest.fixture(scope="module")
def server(folders) -> Iterator[Server]:
    extra = ["--ckpt-dir", str(folders["checkpoints"]), "--controlnet-dir", str(folders["controlnets"])]
    running = Server(folders["root"] / "data", extra).start()
    yield running
    running.stop()


@pytest.fixture()
def api(server) -> Any:
    client = webuiapi.WebUIApi(host="127.0.0.1", port=server.port, sampler="Euler a", steps=8)
    client.set_auth("user", KEY)
    return client


def _png_b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _wait(server: Server, job_id: str, timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = httpx.get(f"{server.url}/jobs/{job_id}", headers=AUTH).json()
        if job["state"] in ("done", "failed", "cancelled"):
            return job
        time.sleep(0.1)
    raise TimeoutError(job_id)


def test_txt2img_through_webuiapi_is_the_python_api_image(api) -> None:
    import openldm

    result = api.txt2img(prompt=PROMPT, width=64, height=64, seed=3, cfg_scale=7.5, batch_size=2)
    assert [im.size for im in result.images] == [(64, 64), (64, 64)]
    assert result.info["all_seeds"] == [3, 3] and "Sampler: Euler a" in result.info["infotexts"][0]
    again = api.txt2img(prompt=PROMPT, width=64, height=64, seed=3, cfg_scale=7.5, batch_size=2)
    assert np.array_equal(np.asarray(again.images[1]), np.asarray(result.images[1]))
    options = {"steps": 8, "width": 64, "height": 64, "seed": 3, "guidance_scale": 7.5, "eta": 1.0}
    ours = openldm.load().txt2img(PROMPT, sampler="euler_a", n_samples=2, progress=False, **options)
    difference = np.abs(np.asarray(ours.images[1], dtype=int) - np.asarray(result.images[1], dtype=int))
    assert difference.max() <= 1  # the same computation in another process (threads may round apart)
    merged = api.txt2img(
        prompt=PROMPT, width=64, height=64, seed=3, override_settings={"token_merging_ratio": 0.5}
    )
    assert "Token merging ratio: 0.5" in merged.info["infotexts"][0]


def test_img2img_inpainting_png_info_samplers_and_models(api, server) -> None:
    init = Image.new("RGB", (64, 64), (20, 40, 200))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    result = api.img2img(
        images=[init], mask_image=mask, prompt=PROMPT, denoising_strength=0.8, width=64, height=64
    )
    assert result.image.size == (64, 64)
    plain = api.img2img(images=[init], prompt=PROMPT, denoising_strength=0.5, width=64, height=64, seed=1)
    info = api.png_info(plain.image)
    assert info.info.startswith(PROMPT) and "Denoising strength: 0.5" in info.info
    assert "Euler a" in [s["name"] for s in api.get_samplers()]
    assert api.util_get_model_names() == ["embedded", "tiny-sd1.safetensors"]
    assert [s["name"] for s in api.get_schedulers()] == ["automatic", "karras"]


def test_controlnet_units_through_webuiapi_are_the_python_api_image(api, server, folders) -> None:
    import openldm
    from openldm.checkpoints.packaged import embedded_controlnet_file
    from openldm.control_images import preprocess
    from openldm.files import file_hash
    from openldm.pipelines.options import Control

    cn_file = folders["controlnets"] / "lines" / "cn-lines.safetensors"
    titles = [f"embedded-controlnet [{file_hash(embedded_controlnet_file())[:8]}]"]
    titles.append(f"cn-lines [{file_hash(cn_file)[:8]}]")
    assert api.controlnet_model_list() == titles
    assert {"none", "canny", "scribble", "invert"} <= set(api.controlnet_module_list())
    square = Image.new("RGB", (96, 96), (230, 230, 230))
    square.paste((10, 10, 10), (24, 24, 72, 72))
    found = api.controlnet_detect([square], module="canny").image
    assert np.array_equal(np.asarray(found), np.asarray(preprocess(square, "canny")))

    units = [
        webuiapi.ControlNetUnit(image=square, module="canny", model=titles[0], weight=0.8, guidance_end=0.5),
        webuiapi.ControlNetUnit(image=square, module="invert", model="cn-lines", weight=0.5, control_mode=2),
    ]
    # webuiapi writes the units into its default alwayson_scripts dict unless given one of our own
    result = api.txt2img(
        prompt=PROMPT, width=64, height=64, seed=5, steps=6, cfg_scale=7.0, controlnet_units=units,
        alwayson_scripts={},
    )  # fmt: skip
    infotext = result.info["infotexts"][0]
    assert 'ControlNet 0: "Module: canny, Model: embedded-controlnet [' in infotext
    assert "Control Mode: ControlNet is more important" in infotext

    model = openldm.load()
    controls = [
        Control(
            model.load_controlnet(embedded_controlnet_file()), preprocess(square, "canny"), 0.8, 0.0, 0.5
        ),
        Control(model.load_controlnet(cn_file), preprocess(square, "invert"), 0.5, mode="control"),
    ]
    options = {"steps": 6, "width": 64, "height": 64, "seed": 5, "sampler": "euler_a", "eta": 1.0}
    options["guidance_scale"] = 7.0
    ours = model.txt2img(PROMPT, progress=False, controls=controls, **options).images[0]
    plain = model.txt2img(PROMPT, progress=False, **options).images[0]
    served = np.asarray(result.image, dtype=int)
    assert np.abs(served - np.asarray(ours, dtype=int)).max() <= 1
    assert np.abs(served - np.asarray(plain, dtype=int)).max() > 10

    post = lambda units: httpx.post(  # noqa: E731
        server.url + "/sdapi/v1/txt2img",
        json={"prompt": "x", "width": 64, "height": 64, "alwayson_scripts": {"ControlNet": {"args": units}}},
        headers=AUTH,
        timeout=60,
    )
    image = _png_b64(square)
    wide = _png_b64(Image.new("RGB", (96, 64)))
    for unit, message in [
        ({"image": image, "model": "nowhere"}, "no ControlNet named 'nowhere'"),
        ({"image": image, "model": "../cn-lines"}, "must be a file name"),
        ({"image": image, "model": "cn-lines [00000000]"}, "another hash than 00000000"),
        ({"image": wide, "model": "cn-lines"}, "another aspect than the 64x64 output"),
        ({"image": image, "model": "cn-lines", "module": "openpose"}, "needs the OpenPose body model"),
        ({"image": image, "model": "cn-lines", "control_mode": "Loud"}, "control_mode must be one of"),
        ({"model": "cn-lines"}, "unit 1 has no image"),
    ]:
        response = post([unit])
        assert response.status_code == 422, response.text
        detail = response.json()["detail"][0]
        assert detail["loc"][-1] == "alwayson_scripts" and message in detail["msg"], detail


def test_options_switch_the_checkpoint(api) -> None:
    assert api.get_options()["sd_model_checkpoint"] == "embedded"
    api.set_options({"sd_model_checkpoint": "tiny-sd1.safetensors"})
    try:
        assert api.get_options()["sd_model_checkpoint"].endswith("tiny-sd1.safetensors")
        result = api.txt2img(prompt="a fox", width=64, height=64, steps=2)
        assert "Model: tiny-sd1" in result.info["infotexts"][0]
    finally:
        api.set_options({"sd_model_checkpoint": "embedded"})
    assert api.get_options()["sd_model_checkpoint"] == "embedded"


def test_jobs_answer_at_once_report_progress_and_previews_and_cancel(api, server) -> None:
    body = {"type": "txt2img", "prompt": PROMPT, "steps": 60, "width": 64, "height": 64, "seed": 5}
    first = httpx.post(f"{server.url}/jobs", json=body, headers=AUTH)
    second = httpx.post(f"{server.url}/jobs", json={**body, "seed": 6}, headers=AUTH)
    assert first.status_code == second.status_code == 202
    assert first.json()["state"] == "queued" and second.json()["position"] >= 1
    deadline = time.monotonic() + 60
    progress = api.get_progress()
    while not (progress["progress"] > 0 and progress["current_image"]) and time.monotonic() < deadline:
        time.sleep(0.1)
        progress = api.get_progress()
    assert progress["state"]["job"] == first.json()["id"] and 0 < progress["progress"] <= 1
    assert Image.open(io.BytesIO(base64.b64decode(progress["current_image"]))).size == (64, 64)
    cancelled = httpx.delete(f"{server.url}/jobs/{second.json()['id']}", headers=AUTH).json()
    assert cancelled["state"] == "cancelled"
    with httpx.stream(
        "GET", f"{server.url}/jobs/{first.json()['id']}/events", headers=AUTH, timeout=120
    ) as events:
        lines = [line for line in events.iter_lines() if line.startswith("event: ")]
    assert lines[-1] == "event: done" and lines.count("event: progress") >= 2
    done = _wait(server, first.json()["id"])
    assert done["state"] == "done" and done["progress"] == 1.0
    png = httpx.get(server.url + done["images"][0], headers=AUTH)
    assert png.headers["content-type"] == "image/png" and Image.open(io.BytesIO(png.content)).size == (64, 64)
    assert _wait(server, second.json()["id"])["state"] == "cancelled"


def test_interrupt_stops_the_running_job(api, server) -> None:
    body = {"type": "txt2img", "prompt": PROMPT, "steps": 400, "width": 64, "height": 64}
    job = httpx.post(f"{server.url}/jobs", json=body, headers=AUTH).json()
    deadline = time.monotonic() + 60
    while api.get_progress()["state"]["job"] != job["id"] and time.monotonic() < deadline:
        time.sleep(0.05)
    api.interrupt()
    assert _wait(server, job["id"], 60)["state"] == "cancelled"


def test_bad_requests_are_refused_with_their_field(server) -> None:
    url = server.url
    assert httpx.get(url + "/sdapi/v1/samplers").status_code == 401
    assert httpx.get(url + "/sdapi/v1/samplers", headers={"Authorization": "Bearer wrong"}).status_code == 401

    def field_of(response: httpx.Response) -> str:
        assert response.status_code == 422, response.text
        return response.json()["detail"][0]["loc"][-1]

    post = lambda path, body: httpx.post(url + path, json=body, headers=AUTH, timeout=60)  # noqa: E731
    assert field_of(post("/sdapi/v1/txt2img", {"prompt": "x", "width": 500})) == "width"
    assert field_of(post("/sdapi/v1/txt2img", {"prompt": "x", "steps": 0})) == "steps"
    assert field_of(post("/sdapi/v1/txt2img", {"prompt": "x", "sampler_name": "Banana"})) == "sampler_name"
    ratio = {"prompt": "x", "override_settings": {"token_merging_ratio": 1.5}}
    assert field_of(post("/sdapi/v1/txt2img", ratio)) == "token_merging"
    assert field_of(post("/sdapi/v1/img2img", {"init_images": ["not base64!"]})) == "init_images"
    huge = Image.new("L", (10_000, 10_000))  # 100 megapixels, a few hundred KB as a PNG
    response = post("/sdapi/v1/img2img", {"init_images": [_png_b64(huge)]})
    assert field_of(response) == "init_images" and "more than" in response.json()["detail"][0]["msg"]
    assert (
        field_of(post("/sdapi/v1/options", {"sd_model_checkpoint": "../../etc/passwd"}))
        == "sd_model_checkpoint"
    )
    bad_json = httpx.post(
        url + "/jobs", content=b"{not json", headers={**AUTH, "content-type": "application/json"}
    )
    assert field_of(bad_json) == "body"
    big = httpx.post(
        url + "/jobs", content=b"x" * (65 * 2**20), headers={**AUTH, "content-type": "application/json"}
    )
    assert big.status_code == 413


def test_a_job_survives_a_killed_server(folders) -> None:
    data = folders["root"] / "restart"
    first = Server(data, []).start()
    try:
        body = {"type": "txt2img", "prompt": PROMPT, "steps": 300, "width": 64, "height": 64, "seed": 9}
        job = httpx.post(f"{first.url}/jobs", json=body, headers=AUTH).json()
        queued = httpx.post(f"{first.url}/jobs", json={**body, "steps": 4}, headers=AUTH).json()
        deadline = time.monotonic() + 60
        while httpx.get(f"{first.url}/jobs/{job['id']}", headers=AUTH).json()["step"] < 2:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        first.kill()  # kill -9 mid-job
    second = Server(data, []).start()
    try:
        done = _wait(second, job["id"], 180)
        assert done["state"] == "done" and done["attempts"] == 2
        assert _wait(second, queued["id"])["state"] == "done"
        assert json.loads(json.dumps(done["info"]))["all_seeds"] == [9]
    finally:
        second.stop()


def _chromium() -> Any:
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    for path in ("/usr/bin/chromium", "/usr/bin/chromedriver"):
        if not Path(path).exists():
            pytest.fail(f"{path} is missing: .ci/run installs Debian's chromium and chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1200,1000"):
        options.add_argument(argument)
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)


def test_the_page_makes_an_image_and_shows_its_parameters(server) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import Select, WebDriverWait

    driver = _chromium()
    try:
        driver.get(server.url)
        driver.find_element(By.ID, "api-key").send_keys(KEY, Keys.TAB)
        wait = WebDriverWait(driver, 90)
        wait.until(lambda d: len(Select(d.find_element(By.ID, "sampler")).options) > 5)
        Select(driver.find_element(By.ID, "sampler")).select_by_visible_text("DDIM")
        prompt = driver.find_element(By.ID, "prompt")
        prompt.clear()
        prompt.send_keys("a green square on a yellow background")
        for field, value in (("steps", "6"), ("seed", "11")):
            element = driver.find_element(By.ID, field)
            element.clear()
            element.send_keys(value)
        before = len(driver.find_elements(By.CSS_SELECTOR, ".result"))
        driver.find_element(By.ID, "generate").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".result")) > before)
        card = driver.find_elements(By.CSS_SELECTOR, ".result")[0]
        text = card.find_element(By.CSS_SELECTOR, "pre.parameters").text
        assert text.startswith("a green square on a yellow background")
        assert "Steps: 6, Sampler: DDIM" in text and "Seed: 11" in text
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, ".result img[src^='blob:']")))
        assert driver.execute_script("return document.querySelector('.result img').naturalWidth") == 64
        assert driver.find_element(By.ID, "error").text == ""
        screenshot = os.environ.get("OPENLDM_SCREENSHOT")
        if screenshot:
            driver.save_screenshot(screenshot)
    finally:
        driver.quit()


LOAD_CLIENTS = 8
LOAD_JOBS = 50
LATENCIES: dict[str, float] = {}


def test_load_8_clients_50_jobs_each_done_once_in_order(server) -> None:
    """8 clients share 50 jobs, each posting its own in turn (no waiting in between) and then
    following them: every job completes exactly once, in each client's order, none lost."""
    import threading

    body = {"type": "txt2img", "prompt": PROMPT, "steps": 8, "width": 64, "height": 64}
    per_client = [LOAD_JOBS // LOAD_CLIENTS + (c < LOAD_JOBS % LOAD_CLIENTS) for c in range(LOAD_CLIENTS)]
    submitted: dict[int, list[str]] = {c: [] for c in range(LOAD_CLIENTS)}
    errors: list[str] = []

    def client(c: int) -> None:
        with httpx.Client(
            base_url=server.url, headers={**AUTH, "x-client": f"client-{c}"}, timeout=60
        ) as http:
            for n in range(per_client[c]):
                response = http.post("/jobs", json={**body, "seed": 100 * c + n})
                if response.status_code != 202:
                    errors.append(response.text)
                    return
                submitted[c].append(response.json()["id"])

    threads = [threading.Thread(target=client, args=(c,)) for c in range(LOAD_CLIENTS)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and sum(len(v) for v in submitted.values()) == LOAD_JOBS
    latencies = []
    for c, jobs in submitted.items():
        finished = []
        for job_id in jobs:
            job = _wait(server, job_id, 300)
            assert job["state"] == "done" and job["attempts"] == 1 and len(job["images"]) == 1, job
            assert job["client"] == f"client-{c}" and job["info"]["all_seeds"] == [int(job["info"]["seed"])]
            finished.append(job["finished"])
            latencies.append(job["finished"] - job["created"])
        assert finished == sorted(finished), f"client {c}'s jobs finished out of order"
    all_jobs = httpx.get(f"{server.url}/jobs?limit=1000", headers=AUTH).json()
    ids = [j["id"] for j in all_jobs]
    assert len(ids) == len(set(ids))
    latencies.sort()
    LATENCIES.update(
        wall=time.monotonic() - start,
        p50=latencies[len(latencies) // 2],
        p95=latencies[int(len(latencies) * 0.95) - 1],
        jobs=len(latencies),
    )
    print("load test:", {k: round(v, 2) for k, v in LATENCIES.items()})


def test_a_client_that_disconnects_mid_job(server) -> None:
    body = {"prompt": PROMPT, "steps": 150, "width": 64, "height": 64, "seed": 77}
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{server.url}/sdapi/v1/txt2img", json=body, headers=AUTH, timeout=1.0)
    jobs = httpx.get(f"{server.url}/jobs?limit=5", headers=AUTH).json()
    job = next(j for j in jobs if j["kind"] == "txt2img" and j["steps"] in (0, 150))
    done = _wait(server, job["id"], 120)
    assert done["state"] == "done" and done["info"]["all_seeds"] == [77]  # the job went on without its client
    assert httpx.get(f"{server.url}/sdapi/v1/options", headers=AUTH).status_code == 200


@pytest.fixture()
def redis_url(tmp_path) -> Iterator[str]:
    import shutil

    binary = shutil.which("redis-server")
    if binary is None:
        pytest.fail("redis-server is missing: .ci/run installs Debian's redis-server")
    port = _free_port()
    process = subprocess.Popen(
        [binary, "--port", str(port), "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + 20
    import redis

    while time.monotonic() < deadline:
        try:
            redis.Redis.from_url(url).ping()
            break
        except redis.ConnectionError:
            time.sleep(0.1)
    yield url
    process.terminate()
    process.wait(10)


def test_workers_share_the_queue_through_redis(folders, redis_url, tmp_path) -> None:
    workers = [
        subprocess.Popen(
            [sys.executable, "-m", "openldm", "worker", "--redis", redis_url, "--threads", "1"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(2)
    ]
    server = Server(tmp_path / "data", ["--redis", redis_url]).start()
    try:
        body = {"type": "txt2img", "prompt": PROMPT, "steps": 12, "width": 64, "height": 64}
        ids = [
            httpx.post(f"{server.url}/jobs", json={**body, "seed": n}, headers=AUTH).json()["id"]
            for n in range(6)
        ]
        cancelled = httpx.post(f"{server.url}/jobs", json={**body, "steps": 500}, headers=AUTH).json()["id"]
        httpx.delete(f"{server.url}/jobs/{cancelled}", headers=AUTH)
        done = [_wait(server, job_id, 180) for job_id in ids]
        assert [j["state"] for j in done] == ["done"] * 6
        assert sorted(j["info"]["all_seeds"][0] for j in done) == list(range(6))
        assert len({j["info"]["worker"] for j in done}) == 2  # both workers took jobs
        assert _wait(server, cancelled, 60)["state"] == "cancelled"
        png = httpx.get(server.url + done[0]["images"][0], headers=AUTH)
        assert Image.open(io.BytesIO(png.content)).size == (64, 64)
        client = webuiapi.WebUIApi(host="127.0.0.1", port=server.port, sampler="DDIM", steps=4)
        client.set_auth("user", KEY)
        assert client.txt2img(prompt=PROMPT, width=64, height=64, seed=1).image.size == (64, 64)
        # A running job: its progress and preview come back from its worker, and cancelling stops it.
        long = httpx.post(f"{server.url}/jobs", json={**body, "steps": 400}, headers=AUTH).json()["id"]
        deadline = time.monotonic() + 60
        progress = client.get_progress()
        while not (progress["progress"] > 0 and progress["current_image"]) and time.monotonic() < deadline:
            time.sleep(0.1)
            progress = client.get_progress()
        assert progress["state"]["job"] == long and progress["current_image"]
        httpx.delete(f"{server.url}/jobs/{long}", headers=AUTH)
        after = [
            httpx.post(f"{server.url}/jobs", json={**body, "steps": 4}, headers=AUTH).json()["id"]
            for _ in range(3)
        ]
        assert [_wait(server, job_id, 60)["state"] for job_id in after] == ["done"] * 3
    finally:
        server.stop()
        for worker in workers:
            worker.terminate()  # rq's warm shutdown: ends after the job at hand
            try:
                worker.wait(15)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait(10)
