"""The sweep's progress bar: tqdm on a terminal, nothing at all in a log."""
import io
import re
import sys

from tqdm import tqdm

from engine.sweep import beside, progress


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_quiet_when_stderr_is_not_a_terminal(monkeypatch):
    log = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log)
    items = progress([1, 2, 4], "ait ait")
    assert not isinstance(items, tqdm)
    assert list(items) == [1, 2, 4]
    assert log.getvalue() == ""


def test_tqdm_on_a_terminal(monkeypatch):
    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    items = progress([1, 2, 4], "pt eager")
    assert isinstance(items, tqdm)
    assert list(items) == [1, 2, 4]
    assert "pt eager:" in term.getvalue() and "0/3" in term.getvalue()


def test_forcing_overrides_the_terminal_check(monkeypatch):
    log = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log)
    bar = progress([1, 2], "forced", enabled=True)
    assert isinstance(bar, tqdm) and list(bar) == [1, 2]
    assert "forced:" in log.getvalue()
    monkeypatch.setattr(sys, "stderr", Terminal())
    assert progress([1, 2], "off", enabled=False) == [1, 2]


def test_log_lines_do_not_run_into_the_bar(monkeypatch):
    term = Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    bar = progress([1, 2], "ait ait")
    say = beside(bar, lambda m: print(m, file=sys.stderr))
    for batch in bar:
        say(f"batch {batch} done")
    out = term.getvalue()
    assert re.search(r"\rbatch 1 done\n", out) and re.search(r"\rbatch 2 done\n", out)
    assert not re.search(r"\]batch", out)


def test_log_is_unchanged_without_a_bar(monkeypatch):
    log = io.StringIO()
    monkeypatch.setattr(sys, "stderr", log)
    write = lambda m: print(m, file=sys.stderr)  # noqa: E731
    assert beside(progress([1], "x"), write) is write
    beside(progress([1], "x"), write)("hello")
    assert log.getvalue() == "hello\n"
