"""Text a user hands the CLI (arguments, stdin, chat lines, files): UTF-8 checks with one-line
errors that say which byte, and llama.cpp's -e escape processing of -p."""
from __future__ import annotations

from pathlib import Path

from ..errors import InputError


def utf8_text(text: str, what: str) -> str:
    """`text` if it is valid Unicode; command-line arguments (and stdin under a C locale) turn
    bytes that are not UTF-8 into lone surrogates, which no tokenizer can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = ord(text[exc.start])
        byte = f"byte 0x{bad - 0xDC00:02x}" if 0xDC80 <= bad <= 0xDCFF else f"U+{bad:04X}"
        raise InputError(f"{what} is not UTF-8 text ({byte} at character {exc.start})",
                         fix="pass UTF-8 text (check the terminal's or the file's encoding)") from None
    return text


def not_utf8(what: str, exc: UnicodeDecodeError, *, note: str = "", **kw) -> InputError:
    """The one-line error for bytes that are not UTF-8: which byte, at which offset."""
    return InputError(f"{what} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset "
                      f"{exc.start}){note}", **kw)


def process_escapes(text: str) -> str:
    r"""llama.cpp's -e (on by default) on -p: \n \r \t \' \" \\ and \xHH (two hex digits: one
    byte) become what they stand for; any other backslash stays as typed. It works on the UTF-8
    bytes, as llama.cpp does, so \xHH sequences may spell a multi-byte character."""
    simple = {ord("n"): b"\n", ord("r"): b"\r", ord("t"): b"\t", ord("'"): b"'", ord('"'): b'"',
              ord("\\"): b"\\"}
    hexdigits = b"0123456789abcdefABCDEF"
    data, out, i = text.encode("utf-8", "surrogateescape"), bytearray(), 0
    while i < len(data):
        if data[i] != ord("\\") or i + 1 == len(data):
            out.append(data[i])
            i += 1
            continue
        nxt = data[i + 1]
        digits = data[i + 2:i + 4]
        if nxt in simple:
            out += simple[nxt]
            i += 2
        elif nxt == ord("x") and len(digits) == 2 and all(d in hexdigits for d in digits):
            out.append(int(digits, 16))
            i += 4
        else:
            out += data[i:i + 2]
            i += 2
    try:
        return out.decode("utf-8")
    except UnicodeDecodeError:
        raise InputError("-p is not UTF-8 text (after its escapes were processed)",
                         fix="fix the text or its \\xHH sequences, or pass --no-escape") from None


def read_text_file(path: str, flag: str) -> str:
    """A UTF-8 text file for a flag, one trailing newline dropped (llama.cpp's -f / -sysf)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError("no such file", path=path, fix=f"check the {flag} path") from None
    except IsADirectoryError:
        raise InputError("is a directory", path=path, fix=f"give {flag} a file") from None
    except OSError as exc:
        raise InputError(f"cannot read it: {exc.strerror}", path=path,
                         fix=f"check the {flag} path") from None
    except UnicodeDecodeError:
        raise InputError("is not UTF-8 text", path=path, fix="convert it to UTF-8") from None
    return text[:-1] if text.endswith("\n") else text
