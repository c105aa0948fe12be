"""The target languages: where Debian keeps a language's manual pages, and how a document is told
to be in that language rather than left in English.

Every language with a `manpages-LANG` package in Debian 12 can be the target (`--target LANG`).
Its pages lie under /usr/share/man/LANG/ (man1, man2, ... as in English, so a page has the same
name in both languages). Translated pages keep some untranslated English (authors, copyright,
code, whole sections a translator has not reached); a document counts as the target's when:

- the target has a script of its own (Japanese, Chinese, Cyrillic, Greek): `MIN_SCRIPT_SHARE`
  of its letters are in that script. Exact and cheap; for Japanese it is the kana/kanji rule the
  published runs used.
- the target is written in Latin letters, as English is (German, French, Polish, ...): letters
  cannot tell the two apart, so a language identifier decides between English and the target
  only. `py3langid` (a maintained fork of langid.py, 4.6 MB with its model, numpy only, no
  download at run time) does that in a few milliseconds per document.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

MIN_SCRIPT_SHARE = 0.2  # share of a document's letters that must be in the target's script

# Letters of the scripts other than Latin that Debian's translated manual pages are written in.
SCRIPTS = {
    "kana and kanji": r"\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uff66-\uff9f",
    "Han": r"\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff",
    "Cyrillic": r"\u0400-\u052f",
    "Greek": r"\u0370-\u03ff\u1f00-\u1fff",
}

_LETTER = re.compile(r"[^\W\d_]")


@dataclass(frozen=True)
class Target:
    """One target language of the experiment."""

    code: str  # as --target takes it and the corpus files are named: ja, de, zh_CN, pt_BR
    name: str  # in English, for tables and plots
    package: str  # the Debian package of its manual pages
    script: str | None  # a key of SCRIPTS, or None for a Latin-script language (language identification)
    langid_code: str  # its code in py3langid's model (used only when script is None)

    @property
    def man_dir(self) -> str:
        """Its pages' folder under /usr/share/man/."""
        return self.code


def _target(code: str, name: str, script: str | None = None, package: str | None = None,
            langid_code: str | None = None) -> Target:
    return Target(code, name, package or f"manpages-{code.lower().replace('_', '-')}", script,
                  langid_code or code.split("_")[0])


# Debian 12's manpages-LANG packages (`apt-cache search --names-only '^manpages-'`).
TARGETS = {t.code: t for t in (
    _target("cs", "Czech"), _target("da", "Danish"), _target("de", "German"), _target("el", "Greek", "Greek"),
    _target("es", "Spanish"), _target("fi", "Finnish"), _target("fr", "French"), _target("hu", "Hungarian"),
    _target("id", "Indonesian"), _target("it", "Italian"), _target("ja", "Japanese", "kana and kanji"),
    _target("mk", "Macedonian", "Cyrillic"), _target("nb", "Norwegian Bokmål", langid_code="no"),
    _target("nl", "Dutch"), _target("pl", "Polish"), _target("pt_BR", "Brazilian Portuguese"),
    _target("ro", "Romanian"), _target("ru", "Russian", "Cyrillic"), _target("sr", "Serbian", "Cyrillic"),
    _target("sv", "Swedish"), _target("tr", "Turkish"), _target("uk", "Ukrainian", "Cyrillic"),
    _target("vi", "Vietnamese"), _target("zh_CN", "Chinese (simplified)", "Han", package="manpages-zh"),
    _target("zh_TW", "Chinese (traditional)", "Han", package="manpages-zh"),
)}


def target(code: str) -> Target:
    """The target language `code`; the error lists the codes there are."""
    if code in TARGETS:
        return TARGETS[code]
    close = [c for c in TARGETS if c.lower() == code.lower() or c.split("_")[0] == code.lower()]
    hint = f"; did you mean {close[0]}?" if close else ""
    raise ValueError(f"--target {code!r}: not a target language{hint} (targets, as Debian's manpages-LANG "
                     f"packages name them: {', '.join(sorted(TARGETS))})")


def name(code: str) -> str:
    """A language's name for tables and plots ("English" for en)."""
    return "English" if code == "en" else TARGETS[code].name if code in TARGETS else code


@functools.lru_cache(maxsize=None)
def _script_letters(script: str) -> re.Pattern:
    return re.compile(f"[{SCRIPTS[script]}]")


def script_share(text: str, script: str) -> float:
    """The share of `text`'s letters that are in `script` (0 when it has no letters)."""
    letters = len(_LETTER.findall(text))
    return len(_script_letters(script).findall(text)) / letters if letters else 0.0


@functools.lru_cache(maxsize=None)
def _identifier(langid_code: str):
    """py3langid's identifier, choosing only between English and `langid_code`."""
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    ident = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
    ident.set_languages(["en", langid_code])
    return ident


def is_target_text(text: str, lang: Target) -> bool:
    """Whether a document of `lang`'s pages is in `lang` (not mostly untranslated English)."""
    if lang.script is not None:
        return script_share(text, lang.script) >= MIN_SCRIPT_SHARE
    return _identifier(lang.langid_code).classify(text)[0] == lang.langid_code


def rule(lang: Target) -> str:
    """The filter `is_target_text` applies, in words (recorded with the corpus)."""
    if lang.script is not None:
        return f"{100 * MIN_SCRIPT_SHARE:.0f}% of letters in {lang.script}"
    return f"py3langid: {lang.langid_code} rather than en"
