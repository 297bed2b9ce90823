"""Sources and licences of the demo corpus: the text of its ``ATTRIBUTION.txt``."""

from __future__ import annotations

from typing import Sequence

from xlsr.demo.asterisk import ASTERISK_PACKAGES

# Per-language credits, as given in /usr/share/doc/<package>/copyright
# (asterisk-core-sounds 1.6.1-1, Debian bookworm).
ASTERISK_CREDITS: dict[str, tuple[str, str, str]] = {
    # lang: (speaker / copyright holder, licence, notes)
    "en": ("2003-2010 Allison Smith (recorded by Allison Smith, "
           "financial contributions by Digium, Inc.)", "CC-BY-SA-3.0", "en-US, female"),
    "es": ("2003-2010 Allison Smith (recorded by Allison Smith, "
           "financial contributions by Digium, Inc.)", "CC-BY-SA-3.0", "es-MX, female"),
    "fr": ("2006-2008 June Wallack (recorded by June Wallack; translated by "
           "Clod Patry, Kristopher Lalletti, June Wallack; financial contributions "
           "by Digium, Inc., Unlimitel, BGM Informatique)", "CC-BY-SA-3.0", "fr-CA, female"),
    "it": ("2012 Carlo Flora <http://www.segreterietelefoniche.it> (translated by "
           "Silvia Petrin)", "CC-BY-3.0", "it-IT, male"),
    "ru": ("2010 Maxim Topal <http://www.ivrvoice.ru>", "CC-BY-3.0", "ru-RU, female"),
}


def attribution_text(langs: Sequence[str], tts_langs: Sequence[str]) -> str:
    """``ATTRIBUTION.txt`` for the Asterisk languages ``langs`` and the espeak-ng languages ``tts_langs``."""
    lines = [
        "xlsr demo corpus - sources and licences",
        "=" * 40,
        "",
        "Real speech: Asterisk PBX core sound prompts (asterisk-core-sounds 1.6.1),",
        "as packaged by Debian (source package `asterisk-core-sounds`, upstream",
        "http://downloads.asterisk.org/pub/telephony/asterisk/).  The prompts were",
        "decoded from G.722 to 16 kHz 16-bit WAV; tones, beeps and silence files were",
        "left out.  Otherwise unmodified.  Full licence texts: the `copyright` file",
        "of each package, e.g. /usr/share/doc/asterisk-core-sounds-en-g722/copyright.",
        "",
    ]
    for lang in langs:
        holder, licence, notes = ASTERISK_CREDITS[lang]
        lines += [
            f"  {lang}/  ({notes})",
            f"    Debian package: {ASTERISK_PACKAGES[lang]}",
            f"    Copyright: {holder}",
            f"    Licence: {licence}",
            "",
        ]
    if tts_langs:
        lines += [
            "Synthetic speech (NOT real speech): folders " + ", ".join(f"tts_{lang}/" for lang in tts_langs),
            "  Generated with espeak-ng (Debian package `espeak-ng`; the engine and its",
            "  voice data are GPL-3.0-or-later) from sentences written for this corpus,",
            "  in three voice variants each, resampled to 16 kHz.",
            "",
        ]
    return "\n".join(lines)
