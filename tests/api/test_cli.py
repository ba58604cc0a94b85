"""The CLI's clients (generate, status) against a live server, and the bundled model's first use."""

from __future__ import annotations

import json

import pytest

from cluster import cli
from workers.sampling import SamplingParams


def run_cli(capsys, *argv: str) -> str:
    capsys.readouterr()
    cli.main(list(argv))
    return capsys.readouterr().out


def test_generate_unary_and_stream(api, capsys):
    prompt_ids = api.engine.tokenizer.encode("Once upon a time")
    _, ref_text, _ = api.reference(prompt_ids, SamplingParams(max_new_tokens=12, temperature=0.0))
    flags = ("--target", api.target, "--max-tokens", "12", "--temperature", "0")
    assert run_cli(capsys, "generate", "Once upon a time", *flags) == ref_text + "\n"
    assert run_cli(capsys, "generate", "Once upon a time", "--stream", *flags) == ref_text + "\n"


def test_generate_json_and_chat(api, capsys):
    tokenizer = api.engine.tokenizer
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    prompt_ids = tokenizer.encode(tokenizer.apply_chat_template(messages, enable_thinking=False))
    ref_ids, _, _ = api.reference(prompt_ids, SamplingParams(max_new_tokens=6, temperature=0.0, logprobs=1))
    out = run_cli(capsys, "generate", "Hi", "--chat", "--system", "Be brief.", "--no-thinking", "--json",
                  "--target", api.target, "--max-tokens", "6", "--temperature", "0", "--logprobs", "1")
    reply = json.loads(out)
    assert reply["token_ids"] == ref_ids
    assert reply["usage"]["prompt_tokens"] == len(prompt_ids)
    assert len(reply["logprobs"]) == len(ref_ids)
    lines = run_cli(capsys, "generate", "Hi", "--stream", "--json", "--target", api.target, "--max-tokens", "3",
                    "--ignore-eos").splitlines()
    assert len(lines) == 3 and json.loads(lines[-1])["finish_reason"] == "FINISH_REASON_LENGTH"


def test_generate_error_exits_nonzero(api, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["generate", "hi", "--target", api.target, "--top-p", "2"])
    assert info.value.code == 1
    assert "INVALID_ARGUMENT: sampling.top_p" in capsys.readouterr().err


def test_status_table_and_json(api, capsys):
    table = run_cli(capsys, "status", "--target", api.target)
    assert "ROLE" in table and "KV BLOCKS USED" in table and "attention+expert" in table
    assert f"model {api.engine.model_name}" in table and "ready: yes" in table and "0 running" in table
    status = json.loads(run_cli(capsys, "status", "--json", "--target", api.target))
    assert status["ready"] is True and len(status["placement"]["experts"]) == 16


def test_ranges():
    assert cli._ranges([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"
    assert cli._ranges([]) == "-"


def test_default_checkpoint_built_once(tmp_path, monkeypatch):
    monkeypatch.setenv("MOECLUSTER_HOME", str(tmp_path))
    folder = cli.default_checkpoint()
    assert folder == tmp_path / "tiny-air-0"
    assert (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file()
    mtime = (folder / "config.json").stat().st_mtime_ns
    assert cli.default_checkpoint() == folder
    assert (folder / "config.json").stat().st_mtime_ns == mtime
    assert [p.name for p in tmp_path.iterdir()] == ["tiny-air-0"]


@pytest.mark.parametrize(("flags", "named"), [
    (["--expert-workers", "0"], "num_expert_workers"),
    (["--step-timeout", "5", "--dispatch-timeout", "30"], "step_timeout_s=5.0 must exceed dispatch_timeout_s=30.0"),
])
def test_serve_with_bad_settings_exits_with_a_message_not_a_traceback(tmp_path, monkeypatch, capsys, flags, named):
    monkeypatch.setenv("MOECLUSTER_HOME", str(tmp_path))
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["serve", *flags, "--port", "0"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "moecluster serve: error:" in err and named in err and "Traceback" not in err
