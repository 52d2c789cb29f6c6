"""R1's language-consistency reward: the fraction of the CoT's words written in the target language
(spec section 3; R1 adds it to accuracy to stop mixed-language reasoning).

"Language" is decided by script, which is what mixing looks like in practice (Chinese inside an
English CoT): en = Latin letters, zh = Han characters, plus ru/ja/ko. LaTeX commands and one-letter
Latin tokens (maths variables such as the x in "设 x = 3") are not counted. Words: rewards/text.py.
"""

from __future__ import annotations

import re

from .registry import register
from .text import completion_text, split_reasoning, words

SCRIPTS = {
    "en": re.compile(r"[A-Za-z\u00c0-\u024f]+"),
    "zh": re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]"),
    "ru": re.compile(r"[\u0400-\u04ff]+"),
    "ja": re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff]"),  # kana and kanji
    "ko": re.compile(r"[\uac00-\ud7af]"),
}
_LATEX_COMMAND = re.compile(r"\\[A-Za-z]+")
_LATIN_LETTER = re.compile(r"[A-Za-z]")
_LANGUAGE_ALIASES = {"english": "en", "chinese": "zh", "zh-cn": "zh", "russian": "ru", "japanese": "ja", "korean": "ko"}


def _code(language: str) -> str:
    code = _LANGUAGE_ALIASES.get(str(language).lower(), str(language).lower())
    if code not in SCRIPTS:
        raise ValueError(f"language_consistency: language {language!r} is not supported; expected one of {sorted(SCRIPTS)}")
    return code


def language_fraction(text: str, language: str) -> float:
    """Fraction of words of `text` in `language`'s script (0.0 when there are no words)."""
    pattern = SCRIPTS[_code(language)]
    counted = [w for w in words(_LATEX_COMMAND.sub(" ", text)) if not (len(w) == 1 and _LATIN_LETTER.fullmatch(w))]
    if not counted:
        return 0.0
    return sum(bool(pattern.fullmatch(w)) for w in counted) / len(counted)


@register("language_consistency")
def language_consistency_reward(prompts=None, completions=(), language="en", **_) -> list[float]:
    """Fraction of CoT words in the target language. `language` is one code for the batch (a reward
    kwarg) or a per-sample column of codes."""
    langs = list(language) if isinstance(language, (list, tuple)) else [language] * len(completions)
    if len(langs) != len(completions):
        raise ValueError(f"column 'language' has {len(langs)} values for {len(completions)} completions")
    out = []
    for c, lang in zip(completions, langs):
        cot, _answer = split_reasoning(completion_text(c))
        out.append(language_fraction(cot, lang))
    return out
