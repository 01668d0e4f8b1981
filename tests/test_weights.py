"""Pretrained weights: downloaded on first use through torchvision's and timm's own loaders, then read
from their caches; offline, one line naming file, URL and folder; ``cxrmem-weights`` fetches them ahead.

Every download here is served by the test itself over HTTP on 127.0.0.1; any other address is refused.
"""

import hashlib
import io
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
import torchvision

from helpers import refuse_network, run_cli, set_hub_offline
from cxrmem.utils.errors import UserError
from cxrmem.models.backbones import BACKBONES, HubFile, build_backbone, pretrained_file
from cxrmem.models.weights import main as weights_main

TIMM_NAME = "timm/resnet10t"
TIMM_REPO = "timm/resnet10t.c3_in1k"  # where timm takes resnet10t's default pretrained weights from






@pytest.fixture(autouse=True)
def loopback_only(monkeypatch):
    refuse_network(monkeypatch)


@pytest.fixture
def hub_offline(monkeypatch):
    set_hub_offline(monkeypatch)


class WeightsServer:
    """Serves ``files`` (path -> bytes) on 127.0.0.1 with the headers the Hugging Face hub sends
    (commit, ETag), and records every request as ``(method, path)``."""

    COMMIT = "0123456789abcdef0123456789abcdef01234567"

    def __init__(self, files: dict[str, bytes]):
        self.files, self.requests = files, []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_HEAD(self):
                self.answer(send_body=False)

            def do_GET(self):
                self.answer(send_body=True)

            def answer(self, send_body):
                server.requests.append((self.command, self.path))
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("ETag", f'"{hashlib.sha256(body).hexdigest()}"')
                self.send_header("X-Repo-Commit", server.COMMIT)
                self.end_headers()
                if send_body:
                    self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


@pytest.fixture
def serve():
    servers = []

    def start(files):
        servers.append(WeightsServer(files))
        return servers[-1]

    yield start
    for server in servers:
        if server.thread.is_alive():
            server.stop()


@pytest.fixture(scope="module")
def resnet18_weights():
    """A resnet18 state dict, its bytes as torch.save writes them, and the sha256 prefix torchvision checks."""
    torch.manual_seed(0)
    state = torchvision.models.resnet18().state_dict()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    data = buffer.getvalue()
    return state, data, hashlib.sha256(data).hexdigest()[:8]


def point_resnet18_at(monkeypatch, url):
    """torchvision's resnet18 weights entry, with its URL moved to ``url`` (all else as torchvision has it)."""
    monkeypatch.setattr(torchvision.models.ResNet18_Weights.DEFAULT.value, "url", url)


def assert_same_weights(module, state, prefix=""):
    for key, value in module.state_dict().items():
        assert torch.equal(value, state[prefix + key]), key


# --------------------------------------------------------------------------- torchvision: download, cache, offline


def test_torchvision_weights_are_downloaded_once_then_read_from_the_torch_cache(
        empty_caches, serve, monkeypatch, resnet18_weights):
    state, data, sha = resnet18_weights
    filename = f"resnet18-{sha}.pth"  # torchvision verifies this prefix against the file's sha256
    server = serve({f"/models/{filename}": data})
    point_resnet18_at(monkeypatch, f"{server.url}/models/{filename}")
    cached = empty_caches / "torch" / "hub" / "checkpoints" / filename
    assert pretrained_file("resnet18").cached() is None

    first = build_backbone("resnet18", pretrained=True)
    assert server.requests == [("GET", f"/models/{filename}")]
    assert cached.read_bytes() == data and pretrained_file("resnet18").cached() == cached
    assert_same_weights(first.body, state)

    second = build_backbone("resnet18", pretrained=True)
    assert len(server.requests) == 1  # from the cache: no new request
    assert_same_weights(second.body, state)


def test_torchvision_download_whose_hash_does_not_match_its_name_is_refused(
        empty_caches, serve, monkeypatch, resnet18_weights):
    _, data, sha = resnet18_weights
    wrong = f"{(int(sha, 16) + 1) % 16 ** 8:08x}"
    server = serve({f"/resnet18-{wrong}.pth": data})
    point_resnet18_at(monkeypatch, f"{server.url}/resnet18-{wrong}.pth")
    with pytest.raises(UserError, match="could not be downloaded .*invalid hash value") as error:
        build_backbone("resnet18", pretrained=True)
    assert "\n" not in str(error.value)
    assert len(server.requests) == 1 and pretrained_file("resnet18").cached() is None


def test_offline_torchvision_message_names_file_url_and_folder_and_following_it_works(
        empty_caches, serve, monkeypatch, resnet18_weights):
    state, data, sha = resnet18_weights
    filename = f"resnet18-{sha}.pth"
    server = serve({f"/{filename}": data})
    url = f"{server.url}/{filename}"
    point_resnet18_at(monkeypatch, url)
    server.stop()  # nothing listens on that port any more

    with pytest.raises(UserError) as error:
        build_backbone("resnet18", pretrained=True)
    message = str(error.value)
    folder = empty_caches / "torch" / "hub" / "checkpoints"
    assert "\n" not in message
    assert f"put {filename} from {url} into {folder}" in message
    assert "model.pretrained: false" in message and "model.weights: <file>" in message
    assert "cxrmem-weights download resnet18" in message

    folder.mkdir(parents=True, exist_ok=True)
    (folder / filename).write_bytes(data)  # what the message says to do
    assert_same_weights(build_backbone("resnet18", pretrained=True).body, state)
    assert server.requests == []


def test_cached_file_that_does_not_load_is_named_for_deletion(empty_caches):
    cached = empty_caches / "torch" / "hub" / "checkpoints" / pretrained_file("resnet18").filename
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"half a download")
    with pytest.raises(UserError) as error:
        build_backbone("resnet18", pretrained=True)
    message = str(error.value)
    assert f"cached pretrained weights {cached} for resnet18 could not be loaded" in message
    assert "delete the file" in message and "\n" not in message


# --------------------------------------------------------------------------- timm: Hugging Face hub


@pytest.fixture
def timm_weights():
    """resnet10t's state dict and its bytes as the hub serves them (safetensors)."""
    import safetensors.torch
    import timm

    torch.manual_seed(0)
    state = timm.create_model("resnet10t").state_dict()
    return state, safetensors.torch.save(state)


@pytest.fixture
def fake_hub(serve, monkeypatch, timm_weights):
    """A Hugging Face hub on 127.0.0.1 holding resnet10t's weights (HF_ENDPOINT, read by the hub once at
    import, sets these two constants)."""
    import huggingface_hub.constants as hub

    server = serve({f"/{TIMM_REPO}/resolve/main/model.safetensors": timm_weights[1]})
    monkeypatch.setattr(hub, "ENDPOINT", server.url)
    monkeypatch.setattr(hub, "HUGGINGFACE_CO_URL_TEMPLATE", server.url + "/{repo_id}/resolve/{revision}/{filename}")
    set_hub_offline(monkeypatch, False)
    return server


def test_timm_weights_are_downloaded_from_the_hub_once_then_read_from_its_cache(empty_caches, fake_hub, timm_weights):
    state, data = timm_weights
    first = build_backbone(TIMM_NAME, pretrained=True)
    weights_requests = [request for request in fake_hub.requests if request[1].startswith(f"/{TIMM_REPO}/")]
    # (the hub may also ask its endpoint for other things of its own, e.g. /api/agent-harnesses)
    assert set(weights_requests) <= {("HEAD", f"/{TIMM_REPO}/resolve/main/model.safetensors"),
                                     ("GET", f"/{TIMM_REPO}/resolve/main/model.safetensors")}
    assert weights_requests.count(("GET", f"/{TIMM_REPO}/resolve/main/model.safetensors")) == 1
    cached = pretrained_file(TIMM_NAME).cached()
    assert cached is not None and cached.read_bytes() == data
    assert (empty_caches / "hf" / "hub") in cached.parents
    assert_same_weights(first.body.model, state)

    seen = len(fake_hub.requests)
    second = build_backbone(TIMM_NAME, pretrained=True)
    assert len(fake_hub.requests) == seen  # from the cache: not even a HEAD request
    assert_same_weights(second.body.model, state)


def test_offline_timm_message_names_file_url_and_folder_and_following_it_works(
        empty_caches, fake_hub, hub_offline, timm_weights):
    state, data = timm_weights
    with pytest.raises(UserError) as error:
        build_backbone(TIMM_NAME, pretrained=True)
    message = str(error.value)
    folder = empty_caches / "hf" / "hub" / f"models--{TIMM_REPO.replace('/', '--')}" / "snapshots" / "main"
    assert "\n" not in message
    url = f"{fake_hub.url}/{TIMM_REPO}/resolve/main/model.safetensors"
    assert f"put model.safetensors from {url} into {folder}" in message
    assert "model.pretrained: false" in message and "model.weights: <file>" in message
    assert fake_hub.requests == []

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.safetensors").write_bytes(data)  # what the message says to do
    assert_same_weights(build_backbone(TIMM_NAME, pretrained=True).body.model, state)
    assert fake_hub.requests == []


HUB_CACHE_ENVIRONMENTS = [
    {},
    {"XDG_CACHE_HOME": "/xdg"},
    {"XDG_CACHE_HOME": "/xdg", "HF_HOME": "~/hf-home"},
    {"HF_HOME": "/hf-home", "HUGGINGFACE_HUB_CACHE": "/legacy"},
    {"HF_HOME": "/hf-home", "HUGGINGFACE_HUB_CACHE": "/legacy", "HF_HUB_CACHE": "$HOME/hub-cache"},
]


def test_hub_cache_folder_is_the_one_the_hub_itself_resolves(monkeypatch):
    """The hub resolves its cache once, at import: reload it in a child process for each environment."""
    import json
    import subprocess
    import sys

    script = (
        "import importlib, json, os, sys\n"
        "import huggingface_hub.constants as constants\n"
        "for env in json.loads(sys.argv[1]):\n"
        "    for key in ('HF_HOME', 'HF_HUB_CACHE', 'HUGGINGFACE_HUB_CACHE', 'XDG_CACHE_HOME'):\n"
        "        os.environ.pop(key, None)\n"
        "    os.environ.update(env)\n"
        "    print(importlib.reload(constants).HF_HUB_CACHE)\n"
    )
    child = subprocess.run([sys.executable, "-c", script, json.dumps(HUB_CACHE_ENVIRONMENTS)],
                           capture_output=True, text=True, check=True, env={"HOME": "/home/someone"})
    for env, expected in zip(HUB_CACHE_ENVIRONMENTS, child.stdout.splitlines(), strict=True):
        monkeypatch.setenv("HOME", "/home/someone")
        for key in ("HF_HOME", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "XDG_CACHE_HOME"):
            monkeypatch.delenv(key, raising=False)
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        assert HubFile(TIMM_REPO, ("model.safetensors",)).cache_dir == Path(expected), env


def test_hub_safetensors_file_as_model_weights(tmp_path, timm_weights):
    state, data = timm_weights
    (tmp_path / "model.safetensors").write_bytes(data)
    assert_same_weights(build_backbone(TIMM_NAME, weights=tmp_path / "model.safetensors").body.model, state)


def test_timm_model_without_pretrained_weights_is_a_one_line_user_error():
    assert pretrained_file("timm/resnetblur18") is None  # timm lists it untrained
    with pytest.raises(UserError, match="timm has no pretrained weights for timm/resnetblur18; set model.pretrained"):
        build_backbone("timm/resnetblur18", pretrained=True)


# --------------------------------------------------------------------------- cxrmem-weights


def test_weights_command_downloads_ahead_and_prints_where_each_file_went(
        empty_caches, serve, monkeypatch, resnet18_weights, capsys):
    _, data, sha = resnet18_weights
    filename = f"resnet18-{sha}.pth"
    server = serve({f"/{filename}": data})
    point_resnet18_at(monkeypatch, f"{server.url}/{filename}")
    cached = empty_caches / "torch" / "hub" / "checkpoints" / filename

    status, out, _ = run_cli(weights_main, ["list", "resnet18"], capsys)
    assert status == 0 and f"not cached  {server.url}/{filename} -> {cached.parent}" in out

    status, out, _ = run_cli(weights_main, ["download", "resnet18"], capsys)
    assert status == 0 and out.splitlines()[-1] == f"resnet18: {cached} (downloaded)"  # after torch.hub's own line
    assert cached.read_bytes() == data and len(server.requests) == 1

    status, out, _ = run_cli(weights_main, ["download", "resnet18"], capsys)
    assert status == 0 and out == f"resnet18: {cached} (already cached)\n"
    assert len(server.requests) == 1

    status, out, _ = run_cli(weights_main, ["list"], capsys)
    lines = out.splitlines()
    assert status == 0 and all(any(line.startswith(name + " ") for line in lines) for name in BACKBONES)
    assert any(line.startswith("resnet18 ") and line.endswith(f"cached      {cached}") for line in lines)


def test_weights_command_mistakes_are_one_line_errors(empty_caches, capsys, serve, monkeypatch):
    server = serve({})
    point_resnet18_at(monkeypatch, f"{server.url}/resnet18-00000000.pth")
    for argv, expected in ((["download", "resnt18"], "did you mean resnet18?"),
                           (["download", "resnet18"], "could not be downloaded")):
        status, out, err = run_cli(weights_main, argv, capsys)
        assert status == 2 and err.startswith("error: ") and expected in err and err.count("\n") == 1
