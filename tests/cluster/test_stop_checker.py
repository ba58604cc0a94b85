"""Stop strings across token boundaries, earliest match, inclusion, and hold-back of partial prefixes."""

import pytest

from cluster.stop_checker import StopCheck, StopChecker


def stream(checker: StopChecker, chunks: list[str]) -> tuple[str, list[str], bool]:
    """Feed chunks as a coordinator would; return (final output, streamed pieces, stopped)."""
    text, streamed_len, pieces = "", 0, []
    for chunk in chunks:
        text += chunk
        result = checker.check(text, len(chunk))
        end = result.truncate_to if result.stopped else len(text) - result.hold_back_chars
        assert end >= streamed_len, "streamed text would be retracted"
        pieces.append(text[streamed_len:end])
        streamed_len = end
        if result.stopped:
            return text[:end], pieces, True
    return text[:streamed_len], pieces, False


def test_stop_string_spanning_token_boundary() -> None:
    checker = StopChecker(["o w"], include_stop_str_in_output=False)
    assert checker.check("hello", 5) == StopCheck(stopped=False, truncate_to=None, hold_back_chars=1)
    assert checker.check("hello w", 2) == StopCheck(stopped=True, truncate_to=4, hold_back_chars=0)


def test_stop_string_completed_by_later_token() -> None:
    checker = StopChecker(["world"], include_stop_str_in_output=False)
    assert checker.check("hello wor", 9).hold_back_chars == 3
    result = checker.check("hello world!", 3)
    assert result.stopped and result.truncate_to == len("hello ")


def test_include_stop_str_in_output() -> None:
    checker = StopChecker(["o w"], include_stop_str_in_output=True)
    result = checker.check("hello wor", 4)
    assert result.stopped and "hello wor"[: result.truncate_to] == "hello w"
    # Included stop strings are never cut, so nothing needs holding back.
    assert checker.check("hello", 5).hold_back_chars == 0


def test_earliest_stop_string_wins() -> None:
    checker = StopChecker(["xyz", "b c", "a b"], include_stop_str_in_output=False)
    result = checker.check("1 a b c xyz", 11)
    assert result.stopped and result.truncate_to == 2


def test_first_completed_wins_regardless_of_chunking() -> None:
    checker = StopChecker(["abcd", "bc"], include_stop_str_in_output=False)
    one_chunk, _, _ = stream(checker, ["xabcd"])
    per_char, _, _ = stream(checker, list("xabcd"))
    assert one_chunk == per_char == "xa"


def test_same_end_prefers_earlier_start() -> None:
    checker = StopChecker(["bc", "abc"], include_stop_str_in_output=False)
    assert checker.check("xabc", 4).truncate_to == 1


def test_only_new_tail_is_searched() -> None:
    # An occurrence entirely inside text that was already checked is not reported again.
    checker = StopChecker(["ab"], include_stop_str_in_output=False)
    assert not checker.check("ab--", 1).stopped
    assert checker.check("ab--ab", 1).truncate_to == 4


def test_hold_back_partial_prefix() -> None:
    checker = StopChecker(["</end>", "STOP"], include_stop_str_in_output=False)
    assert checker.check("answer </e", 3).hold_back_chars == 3
    assert checker.check("answer ST", 2).hold_back_chars == 2
    assert checker.check("answer", 6).hold_back_chars == 0
    # The whole text can be a prefix.
    assert checker.check("</en", 4).hold_back_chars == 4


def test_held_back_text_is_released_when_no_stop_follows() -> None:
    checker = StopChecker(["</end>"], include_stop_str_in_output=False)
    output, pieces, stopped = stream(checker, ["a </", "en", "x> b"])
    assert not stopped and output == "a </enx> b"
    assert pieces == ["a ", "", "</enx> b"]


def test_streamed_text_never_includes_stop_string() -> None:
    checker = StopChecker(["o w", "!!"], include_stop_str_in_output=False)
    output, pieces, stopped = stream(checker, ["hel", "lo", " wor", "ld"])
    assert stopped and output == "hell" and "".join(pieces) == "hell"


def test_no_stop_strings() -> None:
    checker = StopChecker([], include_stop_str_in_output=False)
    assert checker.check("anything", 8) == StopCheck(stopped=False, truncate_to=None, hold_back_chars=0)


@pytest.mark.parametrize("new_text_len", [-1, 4])
def test_rejects_bad_new_text_len(new_text_len: int) -> None:
    with pytest.raises(ValueError, match="new_text_len"):
        StopChecker(["x"], include_stop_str_in_output=False).check("abc", new_text_len)


def test_rejects_empty_stop_string() -> None:
    with pytest.raises(ValueError, match="empty"):
        StopChecker(["ok", ""], include_stop_str_in_output=False)
