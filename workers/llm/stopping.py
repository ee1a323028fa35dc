"""When a sequence stops, and how much of its text may be streamed: pure functions of a
Sequence after its newest token was appended (engine.py calls them in this order).

  by_token      "stop" on an end-of-sequence or stop token id, or when the grammar's value
                is complete; "length" when the grammar refused the token (never passed off
                as valid)
  cut_at_stop   a stop string in the text: the text is cut before it (True)
  new_text      the text to stream now: at the end everything left (an unfinished character
                flushed, unless cut), else all but what may still begin a stop string
"""

from __future__ import annotations

import logging

from zeroserve.workers.llm.sequence import Sequence

log = logging.getLogger("zeroserve.worker")


def by_token(seq: Sequence, token: int, eos_ids: frozenset[int]) -> str | None:
    sp = seq.params
    finish = None
    if token in sp.stop_token_ids or (token in eos_ids and not sp.ignore_eos):
        finish = "stop"
    if seq.matcher is not None:
        if not seq.matcher.consume_token(token):  # never for a masked sample: a bug
            log.warning("request %s: grammar refused token %d: %s", seq.key[1], token,
                        seq.matcher.get_error())
            return "length"
        if seq.matcher.is_stopped():  # the schema's value is complete
            return "stop"
    return finish


def cut_at_stop(seq: Sequence) -> bool:
    stops = seq.params.stop
    if not stops:
        return False
    text = seq.detok.text
    window_start = max(0, seq.emitted - max(map(len, stops)))
    hits = [i for i in (text.find(s, window_start) for s in stops) if i >= 0]
    if not hits:
        return False
    seq.detok.text = text[:min(hits)]
    return True


def new_text(seq: Sequence, finished: bool, cut: bool) -> str:
    text = seq.detok.text
    if finished and not cut:
        text += seq.detok.flush()  # bytes of an unfinished character, if any
    upto = len(text)
    if not finished and seq.params.stop:
        upto -= max(map(len, seq.params.stop)) - 1  # what may start a stop string waits
    out = text[seq.emitted:max(upto, seq.emitted)]
    seq.emitted = max(upto, seq.emitted)
    return out
