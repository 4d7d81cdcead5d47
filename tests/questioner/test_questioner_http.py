"""The HTTP backend against a loopback OpenAI-compatible server started by each test."""

import json
import socket

import pytest

from unigen.questioner import Failure, GenerationSettings, UsageError
from unigen.questioner.backends.http import HTTPBackend
from unigen.questioner.cli import main
from unigen.questioner.prompt import PromptTemplate


def ok(completion):
    def behaviour(state, path, body):
        return 200, {"choices": [{"text": completion(body["prompt"])}]}, 0.02

    return behaviour


def cli(src, out, endpoint, *extra):
    return main(["--captions", str(src), "--out", str(out), "--backend", "http", "--endpoint", endpoint,
                 "--model", "tiny", "--no-progress", "--backoff", "0.01", *extra])


def test_end_to_end_with_bounded_concurrency(tmp_path, http_server, completion, captions):
    url, state = http_server(ok(completion))
    src = tmp_path / "caps.txt"
    src.write_text("\n".join(captions(60)) + "\n")
    out = tmp_path / "out.jsonl"
    assert cli(src, out, url, "--concurrency", "3", "--batch-size", "12") == 0
    assert len(state.requests) == 60
    assert 1 < state.max_in_flight <= 3
    path, body = state.requests[0]
    assert path == "/v1/completions"
    assert body["model"] == "tiny" and body["stop"] == ["<sentence>"] and body["temperature"] == 0.0
    assert body["prompt"].endswith("<question>")
    summary = json.loads((tmp_path / "out.jsonl.summary.json").read_text())
    assert summary["total"]["captions"] == 60 and summary["total"]["pairs_kept"] == 45
    assert len(out.read_text().splitlines()) == 45


def test_chat_route(http_server, completion):
    def behaviour(state, path, body):
        prompt = body["messages"][0]["content"]
        return 200, {"choices": [{"message": {"role": "assistant", "content": completion(prompt)}}]}, 0

    url, state = http_server(behaviour)
    backend = HTTPBackend(url, "m", api="chat", concurrency=2)
    try:
        caption = "a man sits on a bench."
        [text] = backend.generate([PromptTemplate().render(caption)], [caption])
    finally:
        backend.close()
    assert state.requests[0][0] == "/v1/chat/completions"
    assert text.startswith("A man sits on what? <answer> bench")


def test_timeout_is_retried_then_succeeds(http_server, completion):
    def behaviour(state, path, body):
        slow = len(state.requests) == 1  # only the first attempt hangs
        return 200, {"choices": [{"text": completion(body["prompt"])}]}, (1.0 if slow else 0)

    url, state = http_server(behaviour)
    backend = HTTPBackend(url, timeout=0.3, retries=2, backoff=0.01, concurrency=1)
    try:
        caption = "two dogs in the snow"
        [text] = backend.generate([PromptTemplate().render(caption)], [caption])
    finally:
        backend.close()
    assert len(state.requests) == 2
    assert "<answer> two" in text


def test_persistent_timeout_becomes_a_retryable_failure(http_server):
    url, state = http_server(lambda state, path, body: (200, {"choices": [{"text": "x"}]}, 0.6))
    backend = HTTPBackend(url, timeout=0.2, retries=1, backoff=0.01)
    try:
        [result] = backend.generate(["p"], ["c"])
    finally:
        backend.close()
    assert isinstance(result, Failure) and result.retryable and result.reason == "endpoint_error"
    assert len(state.requests) == 2


def test_error_status_retried_and_run_stops_when_a_whole_batch_fails(tmp_path, http_server, captions):
    url, state = http_server(lambda state, path, body: (503, {"error": "overloaded"}, 0))
    src = tmp_path / "caps.txt"
    src.write_text("\n".join(captions(8)) + "\n")
    out = tmp_path / "out.jsonl"
    assert cli(src, out, url, "--retries", "2", "--batch-size", "4") == 1
    assert len(state.requests) == 4 * 3  # one batch, every request tried three times
    summary = json.loads((tmp_path / "out.jsonl.summary.json").read_text())
    assert summary["status"] == "failed" and summary["total"]["captions"] == 0
    assert summary["this_run"]["backend_errors"] == {"endpoint_error": 4}


def test_invalid_request_is_recorded_not_retried(tmp_path, http_server, completion, captions):
    def behaviour(state, path, body):
        if "cyclist" in body["prompt"].rsplit("<sentence>", 1)[1]:
            return 400, {"error": "prompt is longer than the maximum context length"}, 0
        return 200, {"choices": [{"text": completion(body["prompt"])}]}, 0

    url, state = http_server(behaviour)
    caps = ["a cyclist rides on the road.", "a man sits on a bench."]
    src = tmp_path / "caps.txt"
    src.write_text("\n".join(caps) + "\n")
    out = tmp_path / "out.jsonl"
    assert cli(src, out, url) == 0
    assert len(state.requests) == 2
    summary = json.loads((tmp_path / "out.jsonl.summary.json").read_text())
    assert summary["total"]["rejected"] == {"endpoint_rejected_request": 1}
    assert [json.loads(l)["key"] for l in out.read_text().splitlines()] == ["000000001"]


def test_wrong_route_is_fatal(tmp_path, http_server, capsys):
    url, state = http_server(lambda state, path, body: (404, {"error": "no such model"}, 0))
    src = tmp_path / "caps.txt"
    src.write_text("a man sits on a bench.\n")
    assert cli(src, tmp_path / "o.jsonl", url) == 1
    assert len(state.requests) == 1  # not retried: no retry can fix a wrong URL or model name
    assert "answered HTTP 404" in capsys.readouterr().err


def test_refused_connection_is_a_clear_error(tmp_path, capsys):
    with socket.socket() as s:  # a port nobody listens on: bind, note it, release it
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    src = tmp_path / "caps.txt"
    src.write_text("a man sits on a bench.\n")
    assert cli(src, tmp_path / "o.jsonl", f"http://127.0.0.1:{port}/v1", "--retries", "1") == 1
    err = capsys.readouterr().err
    assert "error: --endpoint" in err and "unreachable after 2 attempts" in err


def test_bad_json_body_is_a_failure(http_server):
    url, _ = http_server(lambda state, path, body: (200, b"<html>not json</html>", 0))
    backend = HTTPBackend(url)
    try:
        [result] = backend.generate(["p"], ["c"])
    finally:
        backend.close()
    assert isinstance(result, Failure) and result.reason == "bad_endpoint_response"


@pytest.mark.parametrize(
    "kwargs, message",
    [({"timeout": 0}, "--timeout"), ({"retries": -1}, "--retries"), ({"concurrency": 0}, "--concurrency"),
     ({"api": "embeddings"}, "--api")],
)
def test_arguments_validated(kwargs, message):
    with pytest.raises(UsageError, match=message):
        HTTPBackend("http://127.0.0.1:1/v1", **kwargs)


def test_generation_settings_are_sent(http_server):
    url, state = http_server(lambda state, path, body: (200, {"choices": [{"text": "q? <answer> a"}]}, 0))
    backend = HTTPBackend(url + "/completions",
                          settings=GenerationSettings(max_new_tokens=7, temperature=0.5, top_p=0.9),
                          api_key="sk-test")
    try:
        assert backend.generate(["p1", "p2"], ["c1", "c2"]) == ["q? <answer> a"] * 2
    finally:
        backend.close()
    body = state.requests[0][1]
    assert (body["max_tokens"], body["temperature"], body["top_p"]) == (7, 0.5, 0.9)
    assert "model" not in body and state.requests[0][0] == "/v1/completions"
    assert state.headers[0]["Authorization"] == "Bearer sk-test"


def test_dropped_connection_is_retried(http_server):
    def behaviour(state, path, body):
        if len(state.requests) == 1:
            return 200, None, 0
        return 200, {"choices": [{"text": "What is it? <answer> a bench"}]}, 0

    url, state = http_server(behaviour)
    backend = HTTPBackend(url, retries=1, backoff=0.01)
    try:
        assert backend.generate(["p"], ["c"]) == ["What is it? <answer> a bench"]
    finally:
        backend.close()
    assert len(state.requests) == 2
