"""Fixtures for the questioner tests: generated captions, a tiny HF model, a loopback HTTP server.

Nothing is downloaded: captions come from templates, the model is a randomly initialised 2-layer
GPT-2 with a BPE tokenizer trained here on the prompt text, and the HTTP server binds 127.0.0.1.
"""

from __future__ import annotations

import json
import random
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

_SUBJECTS = ["a man", "a woman", "a worker", "a child", "the dog", "an old lady", "a cyclist", "a tourist"]
_VERBS = ["sits", "stands", "walks", "waits", "rests", "plays", "poses", "reads a book"]
_PREPS = ["on", "in front of", "next to", "near", "behind", "under", "at", "in"]
_OBJECTS = ["a bench", "the beach", "a wooden table", "the old bridge", "a large tree", "the city hall",
            "a small boat", "the train station", "a group of young people"]
_COLOURS = ["red", "blue", "green", "black", "white", "yellow"]
_NOUNS = ["car", "dress", "umbrella", "house", "bicycle", "door"]
_COUNTS = ["two", "three", "four", "five"]
_PLURALS = ["dogs", "children", "birds", "horses", "boats"]


def make_captions(n: int, seed: int = 0) -> list[str]:
    """``n`` CC3M-like captions, mixing relations, colours and counts (and a few with none)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        kind = i % 4
        if kind == 0:
            out.append(f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_PREPS)} {rng.choice(_OBJECTS)}.")
        elif kind == 1:
            out.append(f"a {rng.choice(_COLOURS)} {rng.choice(_NOUNS)} {rng.choice(_PREPS)} {rng.choice(_OBJECTS)}")
        elif kind == 2:
            out.append(f"{rng.choice(_COUNTS)} {rng.choice(_PLURALS)} playing {rng.choice(_PREPS)} "
                       f"{rng.choice(_OBJECTS)}")
        else:
            out.append(f"portrait of {rng.choice(_SUBJECTS)} smiling")  # nothing the rules can ask
    return out


@pytest.fixture
def captions():
    return make_captions


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A randomly initialised 2-layer GPT-2 + BPE tokenizer, saved like any HF model directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    from unigen.questioner.prompt import PromptTemplate

    path = tmp_path_factory.mktemp("tiny_gpt2")
    template = PromptTemplate()
    corpus = [template.render(c) for c in make_captions(64, seed=1)]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus, trainer)
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")
    hf_tok.save_pretrained(path)
    config = GPT2Config(vocab_size=len(hf_tok), n_positions=512, n_embd=32, n_layer=2, n_head=2,
                        eos_token_id=hf_tok.eos_token_id, bos_token_id=hf_tok.eos_token_id)
    import torch

    torch.manual_seed(1234)  # session fixture: its weights must not depend on which test ran first
    GPT2LMHeadModel(config).save_pretrained(path)
    return path


@dataclass
class ServerState:
    """What the fake server saw; ``behaviour(state, path, body) -> (status, payload, delay_s)``.

    A ``None`` payload makes the server close the connection without answering.
    """

    behaviour: object
    requests: list = field(default_factory=list)
    headers: list = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def completion_for(prompt: str) -> str:
    """What a well-behaved LLM would answer, computed from the prompt's last caption."""
    from unigen.questioner.backends.rule import RuleBackend

    caption = prompt.rsplit("<sentence>", 1)[1].rsplit("<question>", 1)[0].strip()
    return RuleBackend().generate([prompt], [caption])[0] + "\n"


@pytest.fixture
def http_server():
    """Factory: start a loopback OpenAI-compatible server with a given behaviour; stopped after."""
    servers = []

    def start(behaviour):
        state = ServerState(behaviour)

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with state.lock:
                    state.requests.append((self.path, body))
                    state.headers.append(dict(self.headers))
                    state.in_flight += 1
                    state.max_in_flight = max(state.max_in_flight, state.in_flight)
                try:
                    status, payload, delay = state.behaviour(state, self.path, body)
                    if delay:
                        time.sleep(delay)
                finally:
                    # Out of flight before the answer is sent: counted after it, the client's
                    # next request could arrive first and be seen as one too many in flight.
                    with state.lock:
                        state.in_flight -= 1
                if payload is None:  # hang up without an answer
                    self.close_connection = True
                    return
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout test): expected

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        thread.start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/v1", state

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture
def completion():
    return completion_for
