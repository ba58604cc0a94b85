"""Stop strings on the detokenized text stream, with hold-back so streamed text is never retracted.

A stop string can span token boundaries ("hello wor" + "ld" completes "o wo"), so it is matched on
text, not tokens. The coordinator keeps one `StopChecker` per request and, after appending each
step's newly detokenized text, calls::

    result = checker.check(text, new_text_len)

where `text` is the full output text so far and `new_text_len` the number of characters this step
added at its end. The returned `StopCheck` says:

* ``stopped`` / ``truncate_to``: a stop string ends within the new text; the output is
  ``text[:truncate_to]`` — cut before the stop string, or after it with
  ``include_stop_str_in_output`` — and the request finishes.
* ``hold_back_chars``: otherwise, how many trailing characters may still be the beginning of a stop
  string. Stream ``text[:len(text) - hold_back_chars]`` only; the held characters go out once the
  next steps show they are not part of a stop string. Held-back text is only ever needed when the
  stop string would be cut, so it is 0 with ``include_stop_str_in_output``.

Only the tail that can hold a newly completed stop string is searched (the new text plus the
``len(stop) - 1`` characters before it), so each call costs O(new text + stop lengths), not
O(output). When several stop strings complete, the one that completes first in the stream wins
(ties: the one starting first), so the result does not depend on how the text was chunked.
Together these guarantee that the streamed prefix never shrinks and `truncate_to` never falls
inside text already streamed.
"""

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class StopCheck:
    """Outcome of one `StopChecker.check` call; see the module docstring."""

    stopped: bool
    truncate_to: int | None
    hold_back_chars: int


class StopChecker:
    """Finds a request's stop strings in its growing output text."""

    def __init__(self, stop_strings: Sequence[str], include_stop_str_in_output: bool) -> None:
        if any(s == "" for s in stop_strings):
            raise ValueError("stop strings must not be empty")
        self.stop_strings = tuple(stop_strings)
        self.include_stop_str_in_output = include_stop_str_in_output

    def check(self, text: str, new_text_len: int) -> StopCheck:
        """Look for a stop string ending in the last `new_text_len` characters of `text`."""
        if not 0 <= new_text_len <= len(text):
            raise ValueError(f"new_text_len {new_text_len} must be in [0, len(text)={len(text)}]")
        new_start = len(text) - new_text_len
        best: tuple[int, int] | None = None  # (end, start) of the winning occurrence
        for stop in self.stop_strings:
            # The first occurrence ending inside the new text starts no earlier than this.
            start = text.find(stop, max(0, new_start - len(stop) + 1))
            if start != -1:
                candidate = (start + len(stop), start)
                best = candidate if best is None else min(best, candidate)
        if best is not None:
            end, start = best
            return StopCheck(
                stopped=True, truncate_to=end if self.include_stop_str_in_output else start, hold_back_chars=0
            )
        return StopCheck(stopped=False, truncate_to=None, hold_back_chars=self._partial_suffix_len(text))

    def _partial_suffix_len(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
        if self.include_stop_str_in_output:
            return 0
        longest = 0
        for stop in self.stop_strings:
            for length in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:length]):
                    longest = length
                    break
        return longest
