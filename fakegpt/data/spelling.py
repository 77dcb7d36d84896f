"""Optional spelling normalisation of Portuguese chat text with Enelvo's lexicons (`pip install 'fakegpt[enelvo]'`).

Modes (`fakegpt prepare --spelling MODE`):
- `none` (default, as the original study): text is left as written.
- `slang`: Enelvo's internet-slang lexicon only (about 800 curated entries: vc -> você, pq -> porque,
  naum -> não, blz -> beleza).
- `enelvo`: Enelvo's own order for words outside its lexicon of correct words: the slang lexicon, then its
  learnt normalisation lexicon (143 k noisy forms). Enelvo's last resort, a lexical-similarity search, is left
  out: it took 0.68 s per unknown word here, 86 minutes for the 7,600 remaining unknown words of the WhatsApp
  corpus alone, and it rewrites exactly the words this research is about (covid, hidroxicloroquina, mandetta).
  The learnt lexicon is noisy too (psl -> coligação, pt -> partido), which is why `slang` exists.

Unlike Enelvo's `Normaliser.normalise`, only the changed words are touched: case (vc -> você, VC -> VOCÊ,
Vc -> Você), punctuation, spacing and line breaks stay as written. Each distinct word is looked up once per run,
and the replacement runs as polars expressions, not a Python loop per message.
"""

from __future__ import annotations

import functools
from typing import Any

import polars as pl

from fakegpt.errors import FakegptError

MODES = ("none", "slang", "enelvo")
_WORD = r"\p{L}+"


@functools.lru_cache(maxsize=1)
def _lexicons() -> Any:
    try:
        from enelvo import normaliser
    except ImportError:
        raise FakegptError("--spelling: needs Enelvo, an optional extra: pip install 'fakegpt[enelvo]'") from None
    return normaliser.Normaliser(tokenizer="readable")


class SpellingNormaliser:
    """Rewrites misspelt and slang words of a batch of messages; remembers every word it has looked up."""

    def __init__(self, mode: str):
        if mode not in MODES:
            raise FakegptError(f"--spelling: expected one of {', '.join(MODES)}, got {mode!r}")
        self.mode = mode
        self.fixes: dict[str, str | None] = {}  # lower-case word -> replacement (None: keep)
        self.replaced = 0  # words rewritten so far
        if mode != "none":
            _lexicons()  # fail before any work when Enelvo is missing

    def _fix(self, word: str) -> str | None:
        lex = _lexicons()
        if self.mode == "slang":
            return lex.in_lex.get(word)
        if word in lex.ok_lex:
            return None
        if word in lex.in_lex:
            return lex.in_lex[word]
        if word in lex.norm_lex:
            return max(lex.norm_lex[word], key=lambda cand: cand[1])[0]
        return None

    def normalise(self, texts: pl.Series) -> pl.Series:
        """The messages with slang and misspellings rewritten (mode `none`: unchanged)."""
        if self.mode == "none" or len(texts) == 0:
            return texts
        words = texts.str.extract_all(_WORD).explode().drop_nulls().str.to_lowercase().unique().to_list()
        for word in words:
            if word not in self.fixes:
                fix = self._fix(word)
                self.fixes[word] = fix if fix and fix != word else None
        changed = {w: f for w in words if (f := self.fixes[w])}
        if not changed:
            return texts
        table = pl.DataFrame({"lower": list(changed), "fix": list(changed.values())})
        # Messages as alternating runs of letters and of anything else, rejoined after the swap.
        parts = (
            texts.rename("m")
            .to_frame()
            .with_row_index("msg")
            .with_columns(pl.col("m").str.extract_all(r"\p{L}+|[^\p{L}]+").alias("part"))
            .select("msg", "part")
            .explode("part")
            .with_columns(pl.col("part").str.to_lowercase().alias("lower"))
            .join(table, on="lower", how="left", maintain_order="left")
        )
        self.replaced += int(parts["fix"].is_not_null().sum())
        part, fix = pl.col("part"), pl.col("fix")
        upper = (part == part.str.to_uppercase()) & (part.str.len_chars() > 1)
        title = part.str.slice(0, 1) == part.str.slice(0, 1).str.to_uppercase()
        swapped = (
            pl.when(fix.is_null())
            .then(part)
            .when(upper)
            .then(fix.str.to_uppercase())
            .when(title)
            .then(fix.str.slice(0, 1).str.to_uppercase() + fix.str.slice(1))
            .otherwise(fix)
        )
        joined = (
            parts.with_columns(swapped.fill_null("").alias("part"))
            .group_by("msg", maintain_order=True)
            .agg(pl.col("part").str.join(""))
            .sort("msg")
        )
        out = pl.Series(texts.name, [""] * len(texts), dtype=pl.String)
        return out.scatter(joined["msg"], joined["part"])
