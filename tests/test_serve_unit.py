"""The serve layer's parts that need no cluster: tokenizer and chat template (vs transformers),
incremental detokenizing and stop strings, the error shape, deployment args and paths."""
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from raypp.config import DeploymentConfig
from raypp.errors import UserError
from raypp.runtime.checkpoint_dir import ensure_checkpoint
from raypp.serve import parse_args
from raypp.serve import protocol as P
from raypp.serve.checkpoint import resolve_paths, served_name
from raypp.serve.errors import install as install_errors
from raypp.serve.textstream import IncrementalDetokenizer, TextStream
from raypp.serve.tokenizer import Tokenizer

CONVERSATIONS = [
    [{"role": "user", "content": "Hello there"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why is the sky blue?"},
     {"role": "assistant", "content": "Rayleigh scattering."}, {"role": "user", "content": "And at dusk?"}],
]
TEXTS = ["Hello world", "héllo wörld, naïve café — 日本語のテキスト 🙂🙂 ok", "  leading spaces\nand\ttabs  "]


@pytest.fixture(scope="module")
def tok(tiny_ckpt):
    return Tokenizer(tiny_ckpt)


@pytest.fixture(scope="module")
def hf_tok(tiny_ckpt):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(tiny_ckpt))


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_match_transformers(tok, hf_tok, text):
    ids = tok.encode(text)
    assert ids == hf_tok(text)["input_ids"]
    assert tok.decode(ids) == hf_tok.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(tok, hf_tok, messages, add_generation_prompt):
    expected = hf_tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    if isinstance(expected, dict) or hasattr(expected, "input_ids"):  # transformers 5 returns a BatchEncoding
        expected = expected["input_ids"]
    assert tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == list(expected)


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_detokenizer_concatenates_to_the_full_decode(tok, text):
    prompt = tok.encode("Say:")
    ids = tok.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tok, prompt)
    pieces = [detok.step([i]) for i in ids]
    assert "".join(pieces) == tok.decode(ids)
    assert all("\ufffd" not in p for p in pieces)  # split multi-byte characters wait for their last byte


def test_stop_string_cuts_text_and_never_leaks_a_partial_match(tok):
    text = "The answer is 42. END of story"
    ids = tok.encode(text, add_special_tokens=False)
    stream = TextStream(tok, [], stop=["END", "nothing"])
    sent, stopped = "", False
    for i in ids:
        delta, stopped = stream.feed([i])
        sent += delta
        assert "EN" not in sent  # the prefix of a stop string is held back until it resolves
        if stopped:
            break
    assert stopped and sent == "The answer is 42. "


def test_stop_string_spanning_tokens_and_held_back_text_flushed_at_the_end(tok):
    ids = tok.encode("abc xyz", add_special_tokens=False)
    stream = TextStream(tok, [], stop=["xyzw"])
    out = "".join(stream.feed([i])[0] for i in ids[:-1])
    delta, stopped = stream.feed(ids[-1:], final=True)
    assert not stopped and out + delta == "abc xyz"


def _app_with(model):
    app = FastAPI()
    install_errors(app)

    @app.post("/x")
    async def x(body: model):
        return {"ok": True}
    return TestClient(app)


@pytest.mark.parametrize("body,param,needle", [
    ({"model": "m", "prompt": "p", "max_token": 3}, "max_token", "unknown field"),
    ({"prompt": "p"}, "model", "field required"),
    ({"model": "m", "prompt": "p", "temperature": "hot"}, "temperature", "number"),
    ({"model": "m", "prompt": "p", "n": 0}, "n", "greater than or equal to 1"),
    ({"model": "m", "prompt": "p", "stop": ["a", ""]}, "stop", "must not be empty"),
    ({"model": "m", "prompt": "p", "logprobs": 3}, "logprobs", "only the sampled token"),
    ({"model": "m", "prompt": "p", "presence_penalty": 0.5}, "presence_penalty", "not supported"),
    ({"model": "m", "prompt": []}, "prompt", "must not be an empty list"),
])
def test_validation_errors_are_400_in_openai_shape_naming_the_field(body, param, needle):
    r = _app_with(P.CompletionRequest).post("/x", json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["param"] == param and needle in err["message"] and err["type"] == "invalid_request_error"


def test_chat_message_fields_are_named_with_their_index():
    r = _app_with(P.ChatCompletionRequest).post("/x", json={"model": "m", "messages": [
        {"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages[1].role"


def test_invalid_json_is_400():
    r = _app_with(P.CompletionRequest).post("/x", content=b'{"model": ', headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]


def test_bad_deployment_args_name_every_field():
    with pytest.raises(UserError) as e:
        parse_args({"model": {"path": "x"}, "parallel": {"tp": 0, "devcie": "cpu"}})
    msg = str(e.value)
    assert "args.parallel.tp: Input should be greater than or equal to 1 (got 0)" in msg
    assert "args.parallel.devcie: unknown field" in msg
    with pytest.raises(UserError, match="args.model: field required|args.model: Field required"):
        parse_args({})


def test_relative_model_path_resolves_against_the_launch_directory(tmp_path):
    cfg = resolve_paths(DeploymentConfig.model_validate({"model": {"path": "checkpoints/tiny"}}), base=tmp_path)
    assert cfg.model.path == str(tmp_path / "checkpoints" / "tiny")
    assert served_name(cfg) == "tiny"


def test_make_tiny_if_missing_writes_a_complete_checkpoint_once(tmp_path):
    cfg = resolve_paths(DeploymentConfig.model_validate(
        {"model": {"path": "ck/tiny", "make_tiny_if_missing": "tiny"}}), base=tmp_path)
    ensure_checkpoint(cfg)
    files = {p.name for p in (tmp_path / "ck" / "tiny").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= files
    mtime = (tmp_path / "ck" / "tiny" / "model.safetensors").stat().st_mtime_ns
    ensure_checkpoint(cfg)  # present: untouched
    assert (tmp_path / "ck" / "tiny" / "model.safetensors").stat().st_mtime_ns == mtime
    assert not [p for p in (tmp_path / "ck").iterdir() if p.name.startswith(".")]  # no temp dir left
