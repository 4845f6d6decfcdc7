"""minivlmoe.heap: glibc's mmap and trim thresholds raised once, by the command line."""

import pytest

from minivlmoe import cli, heap


class FakeLibc:
    def __init__(self, result=1):
        self.calls, self.result = [], result

    def mallopt(self, param, value):
        self.calls.append((param, value))
        return self.result


def test_it_sets_both_thresholds(monkeypatch):
    libc = FakeLibc()
    monkeypatch.setattr(heap, "_glibc", lambda: libc)
    assert heap.keep_freed_heap({}) is True
    assert libc.calls == [(heap.M_MMAP_THRESHOLD, heap.MMAP_THRESHOLD),
                          (heap.M_TRIM_THRESHOLD, heap.TRIM_THRESHOLD)]


def test_it_says_when_mallopt_refuses(monkeypatch):
    monkeypatch.setattr(heap, "_glibc", lambda: FakeLibc(result=0))
    assert heap.keep_freed_heap({}) is False


@pytest.mark.parametrize("value", ["0", " 0 "])
def test_the_environment_turns_it_off(monkeypatch, value):
    libc = FakeLibc()
    monkeypatch.setattr(heap, "_glibc", lambda: libc)
    assert heap.keep_freed_heap({heap.ENV_VAR: value}) is False
    assert libc.calls == []


def test_nothing_happens_without_glibc(monkeypatch):
    monkeypatch.setattr(heap, "_glibc", lambda: None)
    assert heap.keep_freed_heap({}) is False


def test_on_glibc_the_real_mallopt_takes_the_values():
    if heap._glibc() is None:
        pytest.skip("the C library is not glibc")
    assert heap.keep_freed_heap({}) is True


def test_the_command_line_keeps_the_heap(monkeypatch, capsys):
    called = []
    monkeypatch.setattr(heap, "keep_freed_heap", lambda: called.append(True) or True)
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    capsys.readouterr()
    assert called == [True]
