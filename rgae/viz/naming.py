"""File names of exported figures: the original R-GAE tool's scheme, made safe for any caption.

The released tool writes ``R_t_q-rgae-A-pot-of-green-plants-qformer2_144-.png``: a figure prefix, the method, the
caption with spaces turned into ``-``, the projector spec, a trailing ``-`` and an optional ``_suffix`` before the
extension. :func:`figure_filename` reproduces that exactly for plain captions and stays filesystem-safe for anything
else (accents, scripts other than Latin, slashes, control characters, Windows reserved names, very long captions).

Example:
    >>> slugify("A pot of green plants")
    'A-pot-of-green-plants'
    >>> figure_filename("R_t_q", "rgae", "A pot of green plants", "qformer2_144", suffix="_grid")
    'R_t_q-rgae-A-pot-of-green-plants-qformer2_144-_grid.png'
"""

from __future__ import annotations

import hashlib
import re
import unicodedata

# Most filesystems cap a name at 255 bytes; keep the caption part well under that so prefix, method, projector,
# suffix and extension always fit.
MAX_SLUG_BYTES = 80
_HASH_CHARS = 8

# Names Windows refuses whatever the extension (checked on each whole slug, which may end up as a name on its own).
_WINDOWS_RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(10)), *(f"LPT{i}" for i in range(10))}


def _safe_char(ch: str) -> bool:
    # Unicode letters/digits are safe on every modern filesystem; punctuation, separators, symbols and control
    # characters are not all safe (/, \, :, *, ?, ", <, >, |, NUL...), so all of them become word breaks.
    return ch == "_" or unicodedata.category(ch)[0] in "LN"


def slugify(text: str, max_bytes: int = MAX_SLUG_BYTES) -> str:
    """Caption → filesystem-safe slug: words joined by ``-``, original case kept.

    Compatibility forms are unfolded (NFKD: ``"ﬁ"`` → ``"fi"``), accents are stripped when the letter has an ASCII
    base (``"café"`` → ``"cafe"``); other letters (CJK, Cyrillic, ...) keep their marks, in NFC form. Every run
    of other characters (spaces, punctuation, slashes, control characters) becomes one ``-``. A slug longer than
    ``max_bytes`` UTF-8 bytes is cut at a character boundary and ends with ``-`` plus a short hash of the full
    text, so different long captions never collide. An empty result becomes
    ``"empty"``; a Windows reserved name (``CON``, ``NUL``...) gets a ``_`` appended.

    Example:
        >>> slugify("Crème brûlée / dessert")
        'Creme-brulee-dessert'
        >>> len(slugify("word " * 100).encode()) <= MAX_SLUG_BYTES
        True
    """
    if not isinstance(text, str):
        raise ValueError(f"slugify expects a str, got {type(text).__name__}")
    if max_bytes < _HASH_CHARS + 2:
        raise ValueError(f"max_bytes must be at least {_HASH_CHARS + 2}, got {max_bytes}")
    decomposed = unicodedata.normalize("NFKD", text)
    # Drop accents only from ASCII letters (é → e); marks on other scripts carry meaning (が ≠ か) and stay.
    kept, base_is_ascii = [], False
    for ch in decomposed:
        if unicodedata.combining(ch):
            if not base_is_ascii:
                kept.append(ch)
            continue
        kept.append(ch)
        base_is_ascii = ch.isascii()
    normalized = unicodedata.normalize("NFC", "".join(kept))
    slug = "".join(ch if _safe_char(ch) else "-" for ch in normalized)
    slug = re.sub(r"-{2,}", "-", slug).strip("-")
    if not slug:
        slug = "empty"
    if len(slug.encode("utf-8")) > max_bytes:
        digest = hashlib.sha1(text.encode("utf-8")).hexdigest()[:_HASH_CHARS]
        budget = max_bytes - _HASH_CHARS - 1
        cut = slug.encode("utf-8")[:budget].decode("utf-8", errors="ignore").rstrip("-")
        slug = f"{cut}-{digest}"
    if slug.split(".")[0].upper() in _WINDOWS_RESERVED:
        slug += "_"
    return slug


def figure_stem(prefix: str, method: str, text: str, projector: str | None, suffix: str = "") -> str:
    """``{prefix}-{method}-{slug}-{projector}-{suffix}`` without extension (the original tool's scheme).

    ``projector=None`` (an explanation that does not know its projector) is written as ``unknown``.
    """
    if any(not (_safe_char(ch) or ch in "-.") for ch in suffix) or len(suffix.encode("utf-8")) > 64:
        raise ValueError(f"suffix must be at most 64 bytes of letters, digits, '_', '.' or '-', got {suffix!r}")
    method_part = slugify(method or "unknown", max_bytes=40)
    projector_part = slugify(projector or "unknown", max_bytes=40)
    return f"{prefix}-{method_part}-{slugify(text)}-{projector_part}-{suffix}"


def figure_filename(
    prefix: str, method: str, text: str, projector: str | None, suffix: str = "", ext: str = "png"
) -> str:
    """File name of one exported figure, e.g. ``R_t_i-rgae-A-pot-of-green-plants-qformer2_144-.png``."""
    ext = ext.lower().lstrip(".")
    if not re.fullmatch(r"[a-z0-9]+", ext):
        raise ValueError(f"ext must be a file extension like 'png', got {ext!r}")
    return f"{figure_stem(prefix, method, text, projector, suffix)}.{ext}"
