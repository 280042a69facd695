"""QEMU's JSON message splitter and parser, byte for byte (``qobject/json-*.c``, QEMU 7.2).

A QMP client writes JSON values back to back; QEMU cuts the stream into messages with a
lexer and a brace counter, not with line breaks. :class:`JSONStreamer` does the same and is
fed bytes as they arrive; every complete value, or the error QEMU reports instead of it,
comes out in order. What QEMU accepts beyond RFC 8259, and what it refuses:

* strings may be single-quoted (``{'execute': 'qmp_capabilities'}``), ``\\'`` is an escape;
* input is modified UTF-8: ``\\xC0\\x80`` is U+0000; noncharacters (U+FFFE, U+FDD0...) and
  surrogates are refused, also as ``\\u`` escapes; control characters must be escaped;
* an integer becomes an int64, else a uint64, else a double (``1e400`` is ``inf``);
  ``1.0`` stays a double, which no integer parameter accepts;
* duplicate keys are an error (``JSON parse error, duplicate key``).

Errors and recovery, as measured on QEMU 7.2:

* a byte no token can start with, or a malformed token, is reported at once as
  ``JSON parse error, stray '<token so far>'``; input is then skipped up to the next
  ``{ } [ ] : ,`` or control character, and whatever was pending is dropped;
* a value is parsed as soon as its brackets balance, or go negative: a lone ``}`` is
  ``JSON parse error, expecting value``. After any error the counts restart from zero, so
  the rest of a broken message is read as new top-level input and may cause more errors;
* limits: the tokens of one message may total 64 MiB (``JSON token size limit exceeded``),
  count 2 Mi (``... token count ...``) and nest 1024 deep (``... nesting depth ...``).
  Whitespace between tokens is not counted.

End of input (:meth:`JSONStreamer.flush`, QEMU's ``json_message_parser_flush``) ends a pending
number or keyword, makes any other unfinished token a ``stray`` error and parses an unbalanced
message as it stands (``premature EOI``). :func:`parse_json_text` is ``qobject_from_json``:
exactly one value from a whole text, as QEMU reads ``-blockdev '{...}'``.

Memory: the text of the pending message (its tokens) is held until it completes, at most
64 MiB, as QEMU holds it; on any error it is dropped at once.
"""

from __future__ import annotations

import re
from array import array
from dataclasses import dataclass
from typing import Any

__all__ = [
    "MAX_NESTING",
    "MAX_TOKEN_COUNT",
    "MAX_TOKEN_SIZE",
    "JSONStreamer",
    "ParseError",
    "decode_mutf8",
    "parse_json_text",
]

MAX_TOKEN_SIZE = 64 << 20
MAX_TOKEN_COUNT = 2 << 20
MAX_NESTING = 1 << 10

INT64_MIN, INT64_MAX, UINT64_MAX = -(1 << 63), (1 << 63) - 1, (1 << 64) - 1


@dataclass(frozen=True, slots=True)
class ParseError:
    """What the streamer yields instead of a value: QEMU's error text."""

    desc: str


# Token kinds (the streamer stores one byte per token).
LCURLY, RCURLY, LSQUARE, RSQUARE, COLON, COMMA, INTEGER, FLOAT, KEYWORD, STRING = range(10)
_SINGLE = {ord("{"): LCURLY, ord("}"): RCURLY, ord("["): LSQUARE, ord("]"): RSQUARE,
           ord(":"): COLON, ord(","): COMMA}  # fmt: skip

# Lexer states. Those with a run pattern loop on themselves for a whole run of bytes.
(START, RECOVERY, DQ, DQ_ESC, SQ, SQ_ESC, ZERO, SIGN, DIGITS, MANTISSA, MANTISSA_DIGITS,
 EXP_E, EXP_SIGN, EXP_DIGITS, KEYWORD_ST) = range(15)  # fmt: skip
_RUNS = {
    DQ: re.compile(rb"[\x20\x21\x23-\x5b\x5d-\xfd]+"),
    SQ: re.compile(rb"[\x20-\x26\x28-\x5b\x5d-\xfd]+"),
    DIGITS: re.compile(rb"[0-9]+"),
    MANTISSA_DIGITS: re.compile(rb"[0-9]+"),
    EXP_DIGITS: re.compile(rb"[0-9]+"),
    KEYWORD_ST: re.compile(rb"[a-z]+"),
}
# Recovery skips everything but structural characters, control characters other than TAB,
# and the bytes 0xFE/0xFF, which can never occur in UTF-8 (clients send them to resync).
_RECOVERY_RUN = re.compile(rb"[\t\x20-\x2b\x2d-\x39\x3b-\x5a\x5c\x5e-\x7a\x7c\x7e-\xfd]*")
_WHITESPACE = re.compile(rb"[ \t\r\n]*")
# Number states that end a token on any byte that does not continue it (lookahead).
_TERMINAL = {ZERO: INTEGER, DIGITS: INTEGER, MANTISSA_DIGITS: FLOAT, EXP_DIGITS: FLOAT,
             KEYWORD_ST: KEYWORD}  # fmt: skip
_DIGIT = frozenset(b"0123456789")


def _span_end(pattern: re.Pattern[bytes], data: bytes, pos: int) -> int:
    """Where a run of ``pattern`` (which may match nothing) starting at ``pos`` ends."""
    m = pattern.match(data, pos)
    return m.end() if m is not None else pos


def _step(state: int, ch: int) -> int | None:
    """The next state after consuming ``ch`` in a multi-byte token, or ``None`` for an
    error. Only called when ``ch`` does not end a terminal token (handled by the caller)."""
    if state in (DQ, SQ):
        if ch == 0x5C:
            return DQ_ESC if state == DQ else SQ_ESC
        return None  # a control character or 0xFE/0xFF (quotes are handled by the caller)
    if state in (DQ_ESC, SQ_ESC):
        return (DQ if state == DQ_ESC else SQ) if 0x20 <= ch <= 0xFD else None
    if state == SIGN:
        return ZERO if ch == 0x30 else DIGITS if ch in _DIGIT else None
    if state in (MANTISSA, EXP_SIGN):
        return (MANTISSA_DIGITS if state == MANTISSA else EXP_DIGITS) if ch in _DIGIT else None
    if state == EXP_E:
        return EXP_SIGN if ch in b"+-" else EXP_DIGITS if ch in _DIGIT else None
    if state == ZERO:
        return MANTISSA if ch == 0x2E else None
    if state == DIGITS:
        return MANTISSA if ch == 0x2E else EXP_E
    return EXP_E  # MANTISSA_DIGITS on e/E


def _continues(state: int, ch: int) -> bool:
    """Whether ``ch`` continues the terminal token being lexed in ``state``."""
    if state == ZERO:
        return ch == 0x2E or ch in _DIGIT  # "01" is an error, not two tokens
    if state == DIGITS:
        return ch in b".eE" or ch in _DIGIT
    if state == MANTISSA_DIGITS:
        return ch in b"eE" or ch in _DIGIT
    if state == EXP_DIGITS:
        return ch in _DIGIT
    return 0x61 <= ch <= 0x7A  # KEYWORD_ST


class JSONStreamer:
    """Incremental splitter + parser: :meth:`feed` bytes, get values or :class:`ParseError`.

    Values are ``dict`` (insertion order = input order), ``list``, ``str``, ``int``,
    ``float``, ``bool`` and ``None``.

    Error texts that quote input (``stray '...'``, ``... is not a valid Unicode character``)
    show each bad UTF-8 sequence as U+FFFD, as QEMU's QMP replies do. With ``raw_errors``
    they show the input bytes as they are, decoded with ``surrogateescape``, as QEMU prints
    them on its command line (raw bytes to stderr).
    """

    def __init__(self, *, raw_errors: bool = False) -> None:
        self._raw = raw_errors
        self._state = START
        self._token = bytearray()  # the token being lexed
        # The pending message: token kinds, their concatenated text and end offsets.
        self._kinds = bytearray()
        self._text = bytearray()
        self._ends: array[int] = array("Q")
        self._brace = 0
        self._bracket = 0
        self._out: list[Any] = []

    @property
    def buffered(self) -> int:
        """Bytes held for the message in progress (token text, pending tokens)."""
        return len(self._token) + len(self._text)

    def feed(self, data: bytes) -> list[Any]:
        """Lex ``data``; return the values (or errors) completed by it, in order."""
        pos, end = 0, len(data)
        tok = self._token
        while pos < end:
            state = self._state
            if state == START:
                pos = _span_end(_WHITESPACE, data, pos)
                if pos == end:
                    break
                ch = data[pos]
                pos += 1
                kind = _SINGLE.get(ch)
                if kind is not None:
                    self._emit(kind, data[pos - 1 : pos])
                    continue
                tok.append(ch)
                if ch == 0x22:
                    self._state = DQ
                elif ch == 0x27:
                    self._state = SQ
                elif ch == 0x30:
                    self._state = ZERO
                elif 0x31 <= ch <= 0x39:
                    self._state = DIGITS
                elif ch == 0x2D:
                    self._state = SIGN
                elif 0x61 <= ch <= 0x7A:
                    self._state = KEYWORD_ST
                else:
                    self._error()
                continue
            if state == RECOVERY:
                pos = _span_end(_RECOVERY_RUN, data, pos)
                if pos < end:
                    self._state = START  # the resync byte is lexed again from START
                continue
            run = _RUNS.get(state)
            if run is not None:
                # Take a whole run at once, but stop where QEMU's per-byte size check fires.
                stop = min(end, pos + MAX_TOKEN_SIZE + 1 - len(tok))
                m = run.match(data, pos, stop)
                if m is not None:
                    tok += m.group()
                    pos = m.end()
                    if len(tok) > MAX_TOKEN_SIZE:
                        self._oversize()
                        continue
                    if pos == end:
                        break
            ch = data[pos]
            terminal = _TERMINAL.get(state)
            if terminal is not None and not _continues(state, ch):
                self._emit(terminal, tok)  # lookahead: ch is lexed again from START
                tok.clear()
                self._state = START
                continue
            pos += 1
            tok.append(ch)
            if (state == DQ and ch == 0x22) or (state == SQ and ch == 0x27):
                self._emit(STRING, tok)
                tok.clear()
                self._state = START
                continue
            nxt = _step(state, ch)
            if nxt is None:
                self._error()
            else:
                self._state = nxt
                if len(tok) > MAX_TOKEN_SIZE:
                    self._oversize()
        out, self._out = self._out, []
        return out

    def flush(self) -> list[Any]:
        """End of input (``json_message_parser_flush``): return what it completes.

        A pending number or keyword token ends; any other unfinished token (``"abc``, ``-``,
        ``1.``) is a ``stray`` error. Then a message whose brackets never balanced is parsed
        as it stands, which normally gives ``premature EOI``. The streamer can be fed again.
        """
        state = self._state
        terminal = _TERMINAL.get(state)
        if terminal is not None:
            self._emit(terminal, self._token)
        elif state not in (START, RECOVERY):
            self._error()
        self._token.clear()
        self._state = START
        if self._kinds:  # JSON_END_OF_INPUT: no limit checks, just parse what is pending
            self._finish(self._parse())
        out, self._out = self._out, []
        return out

    # -- lexer -> streamer (json_message_process_token) ------------------------------------
    def _error(self) -> None:
        """A byte that no token accepts: QEMU reports the token so far, then resyncs."""
        self._finish(ParseError(f"JSON parse error, stray '{_c_text(self._token, self._raw)}'"))
        self._token.clear()
        self._state = RECOVERY

    def _oversize(self) -> None:
        """One token grew past 64 MiB: the message fails and lexing restarts at START, in the
        middle of the token (QEMU does exactly this)."""
        self._finish(ParseError("JSON token size limit exceeded"))
        self._token.clear()
        self._state = START

    def _emit(self, kind: int, text: bytes | bytearray) -> None:
        if kind == LCURLY:
            self._brace += 1
        elif kind == RCURLY:
            self._brace -= 1
        elif kind == LSQUARE:
            self._bracket += 1
        elif kind == RSQUARE:
            self._bracket -= 1
        if len(self._text) + len(text) + 1 > MAX_TOKEN_SIZE:
            self._finish(ParseError("JSON token size limit exceeded"))
            return
        if len(self._kinds) + 1 > MAX_TOKEN_COUNT:
            self._finish(ParseError("JSON token count limit exceeded"))
            return
        if self._brace + self._bracket > MAX_NESTING:
            self._finish(ParseError("JSON nesting depth limit exceeded"))
            return
        self._kinds.append(kind)
        self._text += text
        self._ends.append(len(self._text))
        if (self._brace > 0 or self._bracket > 0) and self._brace >= 0 and self._bracket >= 0:
            return
        self._finish(self._parse())

    def _parse(self) -> Any:
        """The pending message's value, or its :class:`ParseError`."""
        try:
            return _Parser(self._kinds, self._text, self._ends, self._raw).parse()
        except _Fail as exc:
            return ParseError(f"JSON parse error, {exc.message[:1023]}")

    def _finish(self, value: Any) -> None:
        self._out.append(value)
        self._brace = self._bracket = 0
        self._kinds = bytearray()
        self._text = bytearray()
        self._ends = array("Q")


def parse_json_text(text: str | bytes) -> Any:
    """Exactly one JSON value, or the :class:`ParseError` for it (``qobject_from_json``).

    The whole text is fed to a :class:`JSONStreamer`, which is then flushed, so a value cut
    off at the end gets QEMU's error for it (``premature EOI``, or ``stray`` for a broken last
    token). The first message decides: an error is returned as it is; a value followed by
    any other message (value or error) gives ``Expecting at most one JSON value``; no message
    at all (empty or blank text) is ``JSON parse error, expecting value``.

    A ``str`` is encoded as UTF-8; code points U+DC80..U+DCFF that Python's
    ``surrogateescape`` made of undecodable bytes (as in ``sys.argv``) become those bytes
    again, so the text is judged byte for byte as QEMU judges its command line. Any other lone
    surrogate is encoded as one (CESU-8), which QEMU refuses like any surrogate. Error texts
    quote the input raw (see :class:`JSONStreamer`), as QEMU's command line prints them: a
    ``str`` from ``sys.argv`` gets its own characters back.
    """
    if isinstance(text, str):
        try:
            data = text.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:
            data = text.encode("utf-8", "surrogatepass")
    else:
        data = text
    streamer = JSONStreamer(raw_errors=True)
    results = streamer.feed(data)
    if not results or not isinstance(results[0], ParseError):
        results += streamer.flush()  # an error is final: what follows it does not matter
    if not results:
        return ParseError("JSON parse error, expecting value")
    if len(results) > 1 and not isinstance(results[0], ParseError):
        return ParseError("Expecting at most one JSON value")
    return results[0]


# -- parser (json-parser.c) --------------------------------------------------------------------


class _Fail(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


_NONCHAR = re.compile(
    "[\ufdd0-\ufdef"
    + "".join(f"{chr(p << 16 | 0xFFFE)}{chr(p << 16 | 0xFFFF)}" for p in range(17))
    + "]"
)
_HEX = frozenset(b"0123456789abcdefABCDEF")
_ESCAPES = {ord('"'): '"', ord("'"): "'", ord("\\"): "\\", ord("/"): "/", ord("b"): "\b",
            ord("f"): "\f", ord("n"): "\n", ord("r"): "\r", ord("t"): "\t"}  # fmt: skip


def _valid_codepoint(cp: int) -> bool:
    return (
        0 <= cp <= 0x10FFFF
        and not 0xFDD0 <= cp <= 0xFDEF
        and cp & 0xFFFE != 0xFFFE
        and not 0xD800 <= cp <= 0xDFFF
    )


def _mutf8_codepoints(data: bytes) -> list[int]:
    """QEMU's ``mod_utf8_codepoint`` over ``data``: code points, -1 for each bad sequence."""
    out: list[int] = []
    i, n = 0, len(data)
    while i < n:
        byte = data[i]
        i += 1
        if byte < 0x80:
            out.append(byte)
            continue
        if byte >= 0xFE or not byte & 0x40:
            out.append(-1)  # impossible byte, or a continuation byte out of place
            continue
        length = 8 - (byte ^ 0xFF).bit_length()
        cp = byte & (0xFF >> (length + 1))
        for _ in range(1, length):
            if i >= n or data[i] & 0xC0 != 0x80:
                cp = -1
                break
            cp = cp << 6 | data[i] & 0x3F
            i += 1
        else:
            min_cp = (0x80, 0x800, 0x10000, 0x200000, 0x4000000)[length - 2]
            if not _valid_codepoint(cp) or (cp < min_cp and not (length == 2 and cp == 0)):
                cp = -1
        out.append(cp)
    return out


def decode_mutf8(data: bytes, *, strict: bool = True) -> str | None:
    """Decode QEMU's modified UTF-8. Invalid input gives ``None`` if ``strict``, else one
    U+FFFD per bad sequence (how QEMU prints such bytes in error messages)."""
    try:
        text = data.decode("utf-8")
        if not _NONCHAR.search(text):
            return text
    except UnicodeDecodeError:
        pass
    cps = _mutf8_codepoints(data)
    if strict and -1 in cps:
        return None
    return "".join(chr(cp) if cp >= 0 else "\ufffd" for cp in cps)


def _c_text(data: bytes | bytearray, raw: bool) -> str:
    """A token as QEMU prints it in a message: a C string (ends at NUL), bad bytes U+FFFD
    (as in QMP replies), or if ``raw`` bad bytes as ``surrogateescape`` code points."""
    data = bytes(data).split(b"\0", 1)[0]
    if raw:
        return data.decode("utf-8", "surrogateescape")
    text = decode_mutf8(data, strict=False)
    assert text is not None
    return text


def _parse_string(token: bytes, raw: bool) -> str:
    """``parse_string``: a quoted token (quotes included) to its value."""
    quote, body = token[0], token[1:]
    parts: list[str] = []
    i = 0
    while True:
        j = body.find(b"\\", i)
        if j < 0:
            j = len(body) - 1  # the closing quote
        if j > i:
            seg = decode_mutf8(body[i:j])
            if seg is None:
                raise _Fail("invalid UTF-8 sequence in string")
            parts.append(seg)
        if j == len(body) - 1 and body[j] == quote:
            return "".join(parts)
        esc = body[j + 1]
        if esc != ord("u"):
            if esc not in _ESCAPES:
                raise _Fail("invalid escape sequence in string")
            parts.append(_ESCAPES[esc])
            i = j + 2
            continue
        digits, k = body[j + 2 : j + 6], j + 6
        cp = int(digits, 16) if len(digits) == 4 and _HEX.issuperset(digits) else -1
        if 0xD800 <= cp <= 0xDBFF and body[k : k + 2] == b"\\u":
            trail = body[k + 2 : k + 6]
            low = int(trail, 16) if len(trail) == 4 and _HEX.issuperset(trail) else -1
            if 0xDC00 <= low <= 0xDFFF:
                cp = 0x10000 + ((cp & 0x3FF) << 10 | low & 0x3FF)
                k += 6
            else:
                cp = -1
        if not _valid_codepoint(cp):
            shown = _c_text(body[j:k], raw)
            raise _Fail(f"{shown} is not a valid Unicode character")
        parts.append(chr(cp))
        i = k


def _parse_number(kind: int, text: bytes) -> int | float:
    if kind == INTEGER and len(text) <= 21:
        value = int(text)
        if INT64_MIN <= value <= UINT64_MAX:
            return value
    return float(text)  # strtod: beyond 64 bits, or a float token


class _Parser:
    """``json_parser_parse`` over one message's tokens, without recursion (1024 levels)."""

    def __init__(self, kinds: bytearray, text: bytearray, ends: array[int], raw: bool) -> None:
        self.kinds, self.text, self.ends, self.raw = kinds, text, ends, raw
        self.pos = 0

    def _pop(self) -> int:
        if self.pos >= len(self.kinds):
            raise _Fail("premature EOI")
        self.pos += 1
        return self.kinds[self.pos - 1]

    def _peek(self) -> int:
        if self.pos >= len(self.kinds):
            raise _Fail("premature EOI")
        return self.kinds[self.pos]

    def _literal(self) -> Any:
        i = self.pos
        kind = self._pop()
        text = bytes(self.text[self.ends[i - 1] if i else 0 : self.ends[i]])
        if kind == STRING:
            return _parse_string(text, self.raw)
        if kind in (INTEGER, FLOAT):
            return _parse_number(kind, text)
        if kind == KEYWORD:
            if text in (b"true", b"false", b"null"):
                return {b"true": True, b"false": False, b"null": None}[text]
            raise _Fail(f"invalid keyword '{text.decode('ascii')}'")
        raise _Fail("expecting value")

    def parse(self) -> Any:
        # Each frame: [container, expecting_key, key]; a value completes into the top frame.
        stack: list[list[Any]] = []
        while True:
            kind = self._peek()
            value: Any
            if kind in (LCURLY, LSQUARE):
                self.pos += 1
                close = RCURLY if kind == LCURLY else RSQUARE
                if self._peek() != close:
                    stack.append([{} if kind == LCURLY else [], kind == LCURLY, None])
                    continue
                self.pos += 1
                value = {} if kind == LCURLY else []
            else:
                value = self._literal()
            while True:  # complete ``value`` into its container; close finished containers
                if not stack:
                    return value
                frame = stack[-1]
                container = frame[0]
                if isinstance(container, dict):
                    if frame[1]:
                        if not isinstance(value, str):
                            raise _Fail("key is not a string in object")
                        if self._pop() != COLON:
                            raise _Fail("missing : in object pair")
                        frame[1], frame[2] = False, value
                        break
                    if frame[2] in container:
                        raise _Fail("duplicate key")
                    container[frame[2]] = value
                    frame[1] = True
                    sep, close, what = self._pop(), RCURLY, "dict"
                else:
                    container.append(value)
                    sep, close, what = self._pop(), RSQUARE, "list"
                if sep == close:
                    value = stack.pop()[0]
                    continue
                if sep != COMMA:
                    raise _Fail(f"expected separator in {what}")
                break
