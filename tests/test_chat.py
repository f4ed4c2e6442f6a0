"""offload-moe chat: history, chat template or plain completion, /commands, Ctrl-C, piped stdin, errors."""

from __future__ import annotations

import io
import signal
import subprocess
import sys

import pytest
from rich.console import Console
from typer.testing import CliRunner

from offload_moe import ConfigError, demo_model_path
from offload_moe.chat import ChatSession, _ctrl_c_sets, run_chat
from offload_moe.cli import app

runner = CliRunner()
CHAT = [sys.executable, "-c", "from offload_moe.cli import main; main()", "chat"]


@pytest.fixture(scope="module")
def session():
    s = ChatSession.load(max_new_tokens=6, cache_experts=24, dtype="float32", progress=False)
    yield s
    s.close()


@pytest.fixture
def fresh(session):
    session.reset()
    session.max_new_tokens = 6
    return session


def spy_prompts(session, monkeypatch) -> list[str]:
    """The text of every prompt ``session`` hands to ``model.generate``, special tokens included."""
    seen, real = [], session.model.generate

    def generate(ids, **kwargs):
        seen.append(session.tokenizer.decode(ids[0]))
        return real(ids, **kwargs)

    monkeypatch.setattr(session.model, "generate", generate)
    return seen


def plain_model(tmp_path):
    """The bundled model without its chat template (linked, not copied)."""
    folder = tmp_path / "plain"
    folder.mkdir()
    for f in demo_model_path().iterdir():
        if f.name != "chat_template.jinja":
            (folder / f.name).symlink_to(f)
    return folder


def test_history_grows_across_turns_and_reset_clears_it(fresh):
    turns_before = fresh.turns
    first = fresh.send("def add(a, b):")
    second = fresh.send("Write a Python function `read_lines(path)`.")
    assert [m["role"] for m in fresh.history] == ["user", "assistant", "user", "assistant"]
    assert fresh.history[0]["content"] == "def add(a, b):" and fresh.history[1]["content"] == first.text
    assert fresh.history[3]["content"] == second.text and first.text
    assert 0 < second.new_tokens <= 6 and second.seconds > 0 and not second.stopped
    stats = fresh.stats()
    assert stats["turns"] == turns_before + 2 and stats["hits"] + stats["misses"] > 0
    assert stats["last_tokens_per_s"] > 0 and stats["tokens_per_s"] > 0 and 0 <= stats["hit_rate"] <= 1
    fresh.reset()
    assert fresh.history == [] and fresh.stats()["turns"] == turns_before + 2  # statistics carry on


def test_chat_template_holds_the_whole_conversation(fresh, monkeypatch):
    prompts = spy_prompts(fresh, monkeypatch)
    assert fresh.uses_template
    first = fresh.send("def add(a, b):")
    fresh.send("import os")
    assert prompts[0] == "<|bos|><|user|>\ndef add(a, b):\n<|assistant|>\n"
    assert prompts[1] == fresh.tokenizer.apply_chat_template(
        [{"role": "user", "content": "def add(a, b):"}, {"role": "assistant", "content": first.text},
         {"role": "user", "content": "import os"}], add_generation_prompt=True, tokenize=False)
    assert f"{first.text}<|eos|>\n<|user|>\nimport os\n<|assistant|>\n" in prompts[1]


def test_without_a_template_the_conversation_is_one_plain_document(tmp_path, monkeypatch):
    s = ChatSession.load(plain_model(tmp_path), max_new_tokens=5, cache_experts=24, dtype="float32", progress=False)
    try:
        prompts = spy_prompts(s, monkeypatch)
        assert not s.uses_template
        first = s.send("def add(a, b):")
        s.send("import os")
        assert prompts[0] == "<|bos|>def add(a, b):"
        assert prompts[1] == f"<|bos|>def add(a, b):{first.text}\nimport os"
    finally:
        s.close()


def test_stop_event_ends_the_answer_and_the_session_goes_on(fresh):
    fresh.max_new_tokens = 60
    pieces = []

    def stop_after_first(text):
        pieces.append(text)
        fresh.stop.set()  # what the Ctrl-C handler does

    reply = fresh.send("def add(a, b):", on_text=stop_after_first)
    assert reply.stopped and reply.new_tokens < 60 and not fresh.stop.is_set()
    assert fresh.history[-1] == {"role": "assistant", "content": reply.text}  # the partial answer is kept
    assert reply.text.startswith(pieces[0])
    cache = fresh.model.offload.cache
    cache.drain()
    cache.residency.check()
    assert not cache.residency.pins
    fresh.max_new_tokens = 4
    after = fresh.send("import os")
    assert not after.stopped and after.new_tokens == 4 and len(fresh.history) == 4


def test_ctrl_c_sets_the_event_then_interrupts():
    import threading

    event, before = threading.Event(), signal.getsignal(signal.SIGINT)
    with _ctrl_c_sets(event):
        signal.raise_signal(signal.SIGINT)
        assert event.is_set()
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before


def test_history_is_trimmed_to_the_model_context(fresh):
    fresh.context = 40
    try:
        for text in ("def add(a, b):", "import os", "class A:", "x = 1"):
            reply = fresh.send(text)
        assert reply.forgotten > 0 and fresh.history[0]["role"] == "user" and fresh.history[-2]["content"] == "x = 1"
        assert "def add(a, b):" not in [m["content"] for m in fresh.history]
        with pytest.raises(ConfigError, match="at most 40"):
            fresh.send("def " + "very_long_name_" * 30)
    finally:
        fresh.context = fresh.model.config.max_position_embeddings


def test_sampling_repeats_from_its_seed_and_checks_its_settings(session):
    s = ChatSession(session.model, session.tokenizer, max_new_tokens=8, temperature=1.0, top_p=0.9, seed=3)
    first = s.send("def add(a, b):").text
    s.reset()
    assert s.send("def add(a, b):").text == first
    with pytest.raises(ConfigError, match="temperature"):
        ChatSession(session.model, session.tokenizer, temperature=-1)


def test_run_chat_answers_lines_and_understands_commands(fresh):
    out = io.StringIO()
    turns = fresh.turns
    run_chat(fresh, ["def add(a, b):\n", "/stats\n", "/nope\n", "   \n", "/reset\n", "/quit\n", "never sent\n"],
             Console(file=out, width=100), interactive=False)
    text = out.getvalue()
    assert "hit rate" in text and "tokens/s" in text
    assert "unknown command /nope; /reset" in text and "/stats" in text and "/quit" in text
    assert "history cleared" in text and fresh.history == []
    assert fresh.turns == turns + 1  # the blank line and the line after /quit were not answered
    assert ">>>" not in text


def test_ctrl_c_or_eof_at_the_prompt_ends_the_loop(fresh):
    def typed():
        yield "def add(a, b):"
        raise KeyboardInterrupt

    out = io.StringIO()
    run_chat(fresh, typed(), Console(file=out), interactive=True)
    assert len(fresh.history) == 2 and out.getvalue().endswith("\n")
    run_chat(fresh, iter([]), Console(file=out), interactive=True)  # EOF straight away


def test_cli_reads_piped_stdin():
    result = runner.invoke(app, ["chat", "--max-new-tokens", "4", "--cache-experts", "24"],
                           input="def add(a, b):\n/stats\n/reset\n/quit\n")
    assert result.exit_code == 0, result.output
    out = result.stdout  # stderr has the load's start and done lines
    assert out.startswith("def") and "expert cache: 24 of 96 experts" in out
    assert "4 tokens in 1 answer" in out and "history cleared" in out and ">>>" not in out


@pytest.mark.slow
def test_piped_stdin_in_a_real_process():
    result = subprocess.run([*CHAT, "--max-new-tokens", "4", "--cache-experts", "24"], input="def add(a, b):\n/stats\n",
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("def") and "4 tokens in 1 answer" in result.stdout
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_stats_say_when_misses_are_computed_from_the_mapping():
    result = subprocess.run([*CHAT, "--max-new-tokens", "4", "--cache-experts", "24", "--io", "mmap"],
                            input="def add(a, b):\n/stats\n", capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert "computed in place from the mapped checkpoint" in result.stdout and "0 hits" in result.stdout


def run_main(args, monkeypatch, capsys) -> str:
    """stderr of ``offload-moe ARGS`` run in this process, which must exit with code 1."""
    from offload_moe.cli import main

    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", ["offload-moe", *args])
    with pytest.raises(SystemExit) as exit:
        main()
    assert exit.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error:") and "Traceback" not in err
    return err


def test_bad_model_path_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    err = run_main(["chat", str(tmp_path / "missing")], monkeypatch, capsys)
    assert "missing does not exist" in err and len(err.strip().splitlines()) == 1


def test_model_without_tokenizer_is_an_error(model_dir, monkeypatch, capsys):
    folder = model_dir("mixtral")
    err = run_main(["chat", str(folder)], monkeypatch, capsys)
    # one error, though transformers' own reason inside it spans several lines
    assert f"{folder} has no tokenizer" in err and err.count("error:") == 1


def test_help_has_an_example():
    result = runner.invoke(app, ["chat", "--help"])
    assert result.exit_code == 0 and "Example: offload-moe chat" in result.output


def test_each_turn_runs_only_its_new_tokens_and_answers_as_without_the_kept_cache(session):
    """The KV cache of the conversation is kept between turns: the answers are those of a full re-read, and
    the model (with its experts) sees only the new tokens."""
    turns = ["Write a Python function `add(a, b)`. Add two numbers.", "def read_lines(path):", "import os"]

    def converse(keep_cache: bool) -> tuple[list[str], int, int]:
        chat = ChatSession(session.model, session.tokenizer, max_new_tokens=8, keep_cache=keep_cache)
        session.model.offload.reset_stats()
        replies = [chat.send(text).text for text in turns]
        return replies, session.model.offload.stats()["tokens"], chat.reused_tokens

    kept, kept_tokens, reused = converse(True)
    fresh_replies, all_tokens, none_reused = converse(False)
    assert kept == fresh_replies
    assert none_reused == 0 and reused > 0
    assert kept_tokens == all_tokens - reused  # the reused prompt tokens never ran again


def test_reset_and_a_stopped_answer_keep_the_cache_consistent(fresh):
    fresh.send("def add(a, b):")
    assert fresh._kv is not None
    fresh.reset()
    assert fresh._kv is None and fresh.history == []
    fresh.send("import os", on_text=lambda text: fresh.stop.set())  # stopped after its first piece
    again = fresh.send("x = 1")
    assert again.new_tokens > 0 and fresh._kv.get_seq_length() == len(fresh._kv_ids)


def test_a_sliding_window_cache_that_cannot_be_cut_back_is_read_again(tmp_path):
    """GPT-OSS's sliding-window layers cannot crop a full window: the turn falls back to reading everything."""
    import shutil

    from tiny_models import make_model

    from offload_moe.generation import load_tokenizer

    folder = tmp_path / "gpt_oss"
    make_model("gpt_oss", folder, vocab_size=len(load_tokenizer(demo_model_path())))
    for f in demo_model_path().iterdir():
        if f.name.startswith("tokenizer") or f.name in ("special_tokens_map.json", "chat_template.jinja"):
            shutil.copy(f, folder / f.name)
    chat = ChatSession.load(folder, max_new_tokens=12, dtype="float32", progress=False, repetition_penalty=1.0)
    try:
        chat.send("def read_lines(path): return open(path).read().splitlines()  # long enough to fill the window")
        assert chat._kv.get_seq_length() > 16  # the tiny model's window
        chat.history[-1]["content"] = "a different answer"  # the next prompt shares only part of the kept cache
        reply = chat.send("import os")
        assert reply.new_tokens > 0
    finally:
        chat.close()


def test_paste_sends_the_lines_up_to_end_as_one_message(fresh, monkeypatch):
    from offload_moe.chat import Reply

    sent = []

    def send(text, on_text=None):
        sent.append(text)
        return Reply("", 0, 0.0)

    monkeypatch.setattr(fresh, "send", send)
    code = ["def f(path):\n", '    """Read it.\n', "\n", '    """\n', "    /usr/bin stays text\n"]
    run_chat(fresh, ["/paste\n", *code, "/end\n", "x = 1\n", "/paste\n", "tail without end\n"],
             Console(file=io.StringIO(), width=100), interactive=False)
    assert sent == ["".join(code).rstrip(), "x = 1", "tail without end"]


def test_trimming_a_long_history_leaks_no_tokenizer_warning(fresh, capfd):
    fresh.tokenizer.deprecation_warnings.pop("sequence-length-is-longer-than-the-specified-maximum", None)
    fresh.history = [{"role": "user", "content": "x = 1\n" * 400}, {"role": "assistant", "content": "y = 2"}]
    assert len(fresh.tokenizer(fresh.prompt(fresh.history), verbose=False).input_ids) > fresh.context
    reply = fresh.send("import os")
    assert reply.forgotten == 2
    captured = capfd.readouterr()
    assert "Token indices sequence length" not in captured.err + captured.out


def test_a_message_too_long_for_the_context_is_refused_on_stderr(fresh):
    out, errors = io.StringIO(), io.StringIO()
    run_chat(fresh, ["def " + "very_long_name_" * 400 + "\n"], Console(file=out, width=200), interactive=False,
             errors=Console(file=errors, width=200))
    assert "error:" not in out.getvalue()
    assert "reads at most 1024" in errors.getvalue() and "the prompt is" in errors.getvalue()


def test_the_documented_on_text_prints_the_answer_as_it_is(fresh, capsys):
    capsys.readouterr()
    fresh.max_new_tokens = 12
    reply = fresh.send("def add(a, b):", on_text=lambda s: print(s, end="", flush=True))
    assert capsys.readouterr().out == reply.text
    assert 'on_text=lambda s: print(s, end="", flush=True)' in ChatSession.send.__doc__
