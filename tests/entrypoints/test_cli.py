"""The `pagedformers` command: flags generated from EngineConfig, `generate`, and `serve` as a real process."""

import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest

from pagedformers import LLM, EngineArgs, SamplingParams
from pagedformers.entrypoints.cli import main, parse_args
from pagedformers.entrypoints.engine_args import engine_kwargs
from pagedformers.entrypoints.openai.server import load_chat_template

SMALL = ["--dtype", "float32", "--kv-cache-memory-bytes", str(1 << 22), "--max-model-len", "256"]


def test_serve_help_lists_every_engine_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    for flag in ("--model-impl", "--trust-remote-code", "--no-trust-remote-code", "--max-model-len", "--hf-overrides",
                 "--enable-prefix-caching", "--no-enable-prefix-caching", "--host", "--port", "--api-key",
                 "--served-model-name", "--chat-template"):
        assert flag in help_text, flag
    for f in dataclasses.fields(EngineArgs):
        assert f"--{f.name.replace('_', '-')}" in help_text, f.name


def test_serve_flags_become_engine_config_kwargs():
    args = parse_args(["serve", "org/model", "--max-model-len", "128", "--no-enable-prefix-caching",
                       "--trust-remote-code", "--hf-overrides", '{"rope_theta": 10.0}', "--model-impl", "transformers",
                       "--port", "9000", "--served-model-name", "a", "b"])
    assert engine_kwargs(args) == {"model": "org/model", "max_model_len": 128, "enable_prefix_caching": False,
                                   "trust_remote_code": True, "hf_overrides": {"rope_theta": 10.0},
                                   "model_impl": "transformers"}
    assert (args.port, args.served_model_name, args.host, args.api_key) == (9000, ["a", "b"], "0.0.0.0", None)
    assert engine_kwargs(parse_args(["serve", "--model", "m"])) == {"model": "m"}  # unset flags: config defaults


@pytest.mark.parametrize("argv, message", [
    (["serve", "m", "--hf-overrides", "[1]"], "expected a JSON object"),
    (["serve", "m", "--hf-overrides", "{bad"], "not valid JSON"),
    (["serve", "m", "--model-impl", "vllm"], "invalid choice"),
    (["serve", "m", "--max-model-len", "long"], "invalid int value"),
    (["serve"], "needs a MODEL"),
    (["serve", "a", "--model", "b"], "the model is given twice"),
])
def test_bad_flags_are_refused_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_chat_template_is_a_file_or_inline(tmp_path):
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    (tmp_path / "t.jinja").write_text(template)
    assert load_chat_template(str(tmp_path / "t.jinja")) == template == load_chat_template(template)
    assert load_chat_template(None) is None
    with pytest.raises(ValueError, match="neither a file nor a Jinja template"):
        load_chat_template(str(tmp_path / "missing.jinja"))


def test_generate_prints_the_completion(tiny_llama, capsys):
    llm = LLM(model=tiny_llama, dtype="float32", kv_cache_memory_bytes=1 << 22, max_model_len=256)
    expected = llm.generate("Hello, my name is", SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True),
                            use_tqdm=False)[0].outputs[0].text
    code = main(["generate", tiny_llama, "--prompt", "Hello, my name is", "--max-tokens", "8", "--temperature", "0",
                 "--ignore-eos", *SMALL])
    assert code == 0 and capsys.readouterr().out == expected + "\n"


def test_generate_reports_a_bad_config_value(tiny_llama, capsys):
    assert main(["generate", tiny_llama, "--prompt", "Hi", "--dtype", "float8"]) == 2
    assert "dtype='float8'" in capsys.readouterr().err


def test_python_m_pagedformers_serve_answers_openai_clients(tiny_llama):
    with socket.socket() as sock:  # a free port (the server binds it itself)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "pagedformers", "serve", tiny_llama, "--host", "127.0.0.1", "--port", str(port),
           "--served-model-name", "tiny", "--api-key", "k", "--uvicorn-log-level", "warning", *SMALL]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PAGEDFORMERS_LOGGING_LEVEL": "WARNING"})
    try:
        _wait_for_health(f"http://127.0.0.1:{port}/health", proc)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0)
        response = client.completions.create(model="tiny", prompt="Hello", max_tokens=4, temperature=0.0,
                                             extra_body={"ignore_eos": True})
        assert response.usage.completion_tokens == 4
        # SIGTERM while a stream runs: the stream still ends whole, then the server exits 0
        long = dict(model="tiny", prompt="Hello", max_tokens=100, temperature=0.0, extra_body={"ignore_eos": True})
        whole = client.completions.create(**long).choices[0].text
        stream = client.completions.create(**long, stream=True)
        chunks = [next(stream)]
        proc.send_signal(signal.SIGTERM)
        chunks += list(stream)
        assert chunks[-1].choices[0].finish_reason == "length"
        assert "".join(c.choices[0].text for c in chunks if c.choices) == whole
        output = proc.communicate(timeout=30)[0]  # the SIGTERM's shutdown
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output


def _wait_for_health(url: str, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[0]
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError("the server did not become healthy in 60 s")
