"""Message cleaning as polars expressions (no Python loop per message), following the original project.

Rules, each switchable: remove @usernames (and e-mail addresses, whole); remove URLs (http, https, www);
remove characters that are not letters (accented Portuguese letters kept), digits, whitespace or basic
punctuation (emoji go); collapse whitespace. Messages shorter than `min_chars` after cleaning are dropped by
the caller, as are exact duplicates of an earlier cleaned message (forwards).
"""

from __future__ import annotations

import dataclasses

import polars as pl

# Basic punctuation kept by the symbol rule. Quotes, parentheses and dashes matter to Portuguese chat text;
# `<`, `|`, `>` are not kept, so the text "<|endoftext|>" can never survive cleaning.
DEFAULT_KEEP = ".,;:!?¿¡'\"()[]-–—/%&+=*#$€°…ºª"

URL = r"(?:[Hh][Tt][Tt][Pp][Ss]?://|[Ww][Ww][Ww]\.)\S+"
MENTION = r"@\w+"
# An address, matched before mentions so that its domain part is never read as a @username (which left
# "example .com" behind); a separate pass costs nothing: the regex engine scans for its inner `@`.
EMAIL = r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+"
EOT_TEXT = "<|endoftext|>"
_VARIATION_SELECTORS = r"[\x{FE00}-\x{FE0F}\x{E0100}-\x{E01EF}]"


@dataclasses.dataclass(frozen=True)
class CleanRules:
    """Which cleaning rules prepare applies (each is a --RULE flag) and the punctuation kept."""

    remove_mentions: bool = True
    remove_urls: bool = True
    remove_symbols: bool = True
    collapse_whitespace: bool = True
    keep_newlines: bool = True
    keep_chars: str = DEFAULT_KEEP
    # Texts removed wherever they occur: a tokenizer's special tokens (prepare --tokenizer), which its library
    # would read as those tokens inside a message (its EOS as a false message boundary).
    drop_texts: tuple[str, ...] = ()


def _class_escape(chars: str) -> str:
    """Escape characters for use inside a regex character class (Rust regex syntax)."""
    return "".join("\\" + c if c in "\\]-[^&~|" else c for c in chars)


def _literal_escape(text: str) -> str:
    """Escape a literal text for Rust regex syntax (which, unlike Python's re.escape, rejects escaped spaces)."""
    return "".join("\\" + c if c in "\\.+*?()|[]{}^$#&-~" else c for c in text)


def symbol_pattern(keep_chars: str = DEFAULT_KEEP) -> str:
    # \p{Mn}, \p{Mc}: combining accents of decomposed (NFD) text belong to their letter; but emoji variation
    # selectors (U+FE0F in "⚠️") are Mn too and go with their emoji, as does the keycap mark (Me).
    """The regex of characters --remove-symbols drops: not a letter (with its accents), digit, space or kept mark."""
    return rf"[^\p{{L}}\p{{Mn}}\p{{Mc}}\p{{N}}\s{_class_escape(keep_chars)}]|{_VARIATION_SELECTORS}"


def clean_expr(col: str | pl.Expr, rules: CleanRules = CleanRules()) -> pl.Expr:
    """An expression giving the cleaned text of `col` (a String column)."""
    e = pl.col(col) if isinstance(col, str) else col
    # URLs first: a URL may contain `@`, and its tail must not survive as a stray word.
    # Two passes are faster than one alternation (each has a literal prefix the regex engine scans for).
    if rules.remove_urls:
        e = e.str.replace_all(URL, " ")
    if rules.remove_mentions:
        e = e.str.replace_all(EMAIL, " ").str.replace_all(MENTION, " ")
    if rules.remove_symbols and not rules.remove_mentions:
        # Mentions and addresses stay: an address is matched whole (and put back) so that its `@`, a symbol
        # here, is not taken out of it.
        e = e.str.replace_all(f"({EMAIL})|{symbol_pattern(rules.keep_chars)}", "$1")
    elif rules.remove_symbols:
        e = e.str.replace_all(symbol_pattern(rules.keep_chars), "")
    else:
        e = e.str.replace_all(EOT_TEXT, "", literal=True)  # it would be read back as a message boundary
    if rules.drop_texts:  # after the symbols: removing an emoji must not leave a special token behind
        longest_first = sorted(rules.drop_texts, key=len, reverse=True)
        e = e.str.replace_all("|".join(_literal_escape(t) for t in longest_first), "")
    if rules.collapse_whitespace:
        if rules.keep_newlines:
            # Runs of blanks -> one space; any run of whitespace holding a newline -> one newline. The patterns
            # leave a lone space alone: replacing every single space by itself is 5x slower.
            e = e.str.replace_all(r"[^\S\n]{2,}|[^\S\n ]", " ").str.replace_all(r" ?\n\s*", "\n")
        else:
            e = e.str.replace_all(r"\s{2,}|[^\S ]", " ")
    return e.str.strip_chars()


def clean_series(s: pl.Series, rules: CleanRules = CleanRules()) -> pl.Series:
    """Clean a Series of messages (convenience for tests and tools)."""
    return pl.DataFrame({"m": s}).select(clean_expr("m", rules))["m"]
