"""The synthetic speech of the demo corpus: fixed sentences in eight languages spoken by espeak-ng, at 16 kHz.

It goes to ``tts_<lang>/`` folders so that it can never be mistaken for real speech.
"""

from __future__ import annotations

import logging
import os
import pathlib
import shutil
import subprocess
import tempfile
from typing import Sequence

import numpy as np
import soundfile as sf
from tqdm import tqdm

from xlsr.demo.clips import MIN_SECONDS, SAMPLE_RATE, write_wav

logger = logging.getLogger(__name__)

ESPEAK_PACKAGE = "espeak-ng"

# espeak-ng voice variants x speaking rate (words/min) x pitch (0-99).
TTS_VARIANTS: tuple[tuple[str, int, int], ...] = (
    ("m1", 150, 45),
    ("f2", 165, 60),
    ("m3", 140, 35),
)

# Ten everyday sentences per language, the same content in each language.
# Written for this corpus; they are only used to drive the synthesiser.
TTS_SENTENCES: dict[str, tuple[str, ...]] = {
    "de": (
        "Der Wind weht heute kräftig über die weiten Felder im Norden des Landes.",
        "Am Morgen trinke ich meistens eine Tasse Kaffee und lese die Zeitung.",
        "Die Bibliothek in unserer Stadt hat am Wochenende leider geschlossen.",
        "Nach dem langen Winter freuen sich alle auf die ersten warmen Tage.",
        "Mein Bruder fährt jeden Tag mit dem Fahrrad zur Arbeit in die Innenstadt.",
        "Im Garten wachsen Tomaten, Bohnen und viele bunte Blumen.",
        "Der Zug nach Hamburg hat heute ungefähr zwanzig Minuten Verspätung.",
        "Kinder lernen neue Sprachen oft schneller als Erwachsene.",
        "Wir haben gestern Abend gemeinsam gekocht und bis spät in die Nacht geredet.",
        "Bitte schließen Sie das Fenster, bevor Sie das Haus verlassen.",
    ),
    "pt": (
        "O vento sopra com força sobre os campos largos do norte do país.",
        "De manhã costumo beber uma chávena de café e ler o jornal.",
        "A biblioteca da nossa cidade está fechada durante o fim de semana.",
        "Depois de um inverno longo, todos esperam pelos primeiros dias quentes.",
        "O meu irmão vai de bicicleta para o trabalho todos os dias.",
        "No jardim crescem tomates, feijões e muitas flores coloridas.",
        "O comboio para o Porto está atrasado cerca de vinte minutos.",
        "As crianças aprendem línguas novas mais depressa do que os adultos.",
        "Ontem à noite cozinhámos juntos e conversámos até muito tarde.",
        "Por favor, feche a janela antes de sair de casa.",
    ),
    "pl": (
        "Dzisiaj silny wiatr wieje nad szerokimi polami na północy kraju.",
        "Rano zwykle piję filiżankę kawy i czytam gazetę.",
        "Biblioteka w naszym mieście jest niestety zamknięta w weekend.",
        "Po długiej zimie wszyscy czekają na pierwsze ciepłe dni.",
        "Mój brat codziennie jeździ rowerem do pracy w centrum miasta.",
        "W ogrodzie rosną pomidory, fasola i wiele kolorowych kwiatów.",
        "Pociąg do Krakowa ma dzisiaj około dwudziestu minut opóźnienia.",
        "Dzieci często uczą się nowych języków szybciej niż dorośli.",
        "Wczoraj wieczorem gotowaliśmy razem i rozmawialiśmy do późna w nocy.",
        "Proszę zamknąć okno przed wyjściem z domu.",
    ),
    "nl": (
        "De wind waait vandaag hard over de wijde velden in het noorden van het land.",
        "'s Ochtends drink ik meestal een kop koffie en lees ik de krant.",
        "De bibliotheek in onze stad is in het weekend helaas gesloten.",
        "Na de lange winter kijkt iedereen uit naar de eerste warme dagen.",
        "Mijn broer fietst elke dag naar zijn werk in het centrum.",
        "In de tuin groeien tomaten, bonen en veel kleurrijke bloemen.",
        "De trein naar Amsterdam heeft vandaag ongeveer twintig minuten vertraging.",
        "Kinderen leren nieuwe talen vaak sneller dan volwassenen.",
        "Gisteravond hebben we samen gekookt en tot laat in de nacht gepraat.",
        "Wilt u alstublieft het raam sluiten voordat u het huis verlaat?",
    ),
    "sv": (
        "Vinden blåser kraftigt över de vida fälten i norra delen av landet.",
        "På morgonen dricker jag oftast en kopp kaffe och läser tidningen.",
        "Biblioteket i vår stad är tyvärr stängt under helgen.",
        "Efter den långa vintern längtar alla efter de första varma dagarna.",
        "Min bror cyklar till jobbet i centrum varje dag.",
        "I trädgården växer tomater, bönor och många färgglada blommor.",
        "Tåget till Göteborg är ungefär tjugo minuter försenat i dag.",
        "Barn lär sig ofta nya språk snabbare än vuxna.",
        "I går kväll lagade vi mat tillsammans och pratade till sent på natten.",
        "Var snäll och stäng fönstret innan du går hemifrån.",
    ),
    "tr": (
        "Bugün rüzgar ülkenin kuzeyindeki geniş tarlaların üzerinde sert esiyor.",
        "Sabahları genellikle bir fincan kahve içip gazete okurum.",
        "Şehrimizdeki kütüphane maalesef hafta sonu kapalı.",
        "Uzun kıştan sonra herkes ilk sıcak günleri bekliyor.",
        "Kardeşim her gün bisikletle şehir merkezindeki işine gidiyor.",
        "Bahçede domates, fasulye ve birçok renkli çiçek yetişiyor.",
        "Ankara treni bugün yaklaşık yirmi dakika gecikmeli.",
        "Çocuklar yeni dilleri çoğu zaman yetişkinlerden daha hızlı öğrenir.",
        "Dün akşam birlikte yemek pişirdik ve gece geç saatlere kadar sohbet ettik.",
        "Lütfen evden çıkmadan önce pencereyi kapatın.",
    ),
    "hi": (
        "आज देश के उत्तर में खुले खेतों पर तेज़ हवा चल रही है।",
        "सुबह मैं आम तौर पर एक कप चाय पीता हूँ और अख़बार पढ़ता हूँ।",
        "हमारे शहर का पुस्तकालय सप्ताहांत में बंद रहता है।",
        "लंबी सर्दी के बाद सब लोग पहले गरम दिनों का इंतज़ार कर रहे हैं।",
        "मेरा भाई हर दिन साइकिल से दफ़्तर जाता है।",
        "बगीचे में टमाटर, सेम और बहुत से रंग-बिरंगे फूल उगते हैं।",
        "दिल्ली जाने वाली ट्रेन आज लगभग बीस मिनट देर से चल रही है।",
        "बच्चे अक्सर बड़ों से जल्दी नई भाषाएँ सीख लेते हैं।",
        "कल शाम हमने साथ मिलकर खाना बनाया और देर रात तक बातें कीं।",
        "कृपया घर से निकलने से पहले खिड़की बंद कर दीजिए।",
    ),
    "sw": (
        "Leo upepo unavuma kwa nguvu juu ya mashamba mapana kaskazini mwa nchi.",
        "Asubuhi mimi hunywa kikombe cha chai na kusoma gazeti.",
        "Maktaba ya mji wetu imefungwa mwishoni mwa wiki.",
        "Baada ya msimu mrefu wa mvua, kila mtu anasubiri siku za jua.",
        "Kaka yangu huenda kazini kwa baiskeli kila siku.",
        "Bustanini kuna nyanya, maharage na maua mengi ya rangi mbalimbali.",
        "Treni ya kwenda Mombasa imechelewa kwa takriban dakika ishirini leo.",
        "Watoto mara nyingi hujifunza lugha mpya haraka kuliko watu wazima.",
        "Jana jioni tulipika chakula pamoja na tukazungumza hadi usiku sana.",
        "Tafadhali funga dirisha kabla ya kutoka nyumbani.",
    ),
}
TTS_LANGUAGES: tuple[str, ...] = tuple(TTS_SENTENCES)


def resample(x: np.ndarray, sr_in: int, sr_out: int) -> np.ndarray:
    """Resample float32 mono audio: soxr (HQ) if it is installed, else by cutting or padding the FFT spectrum.

    The demo must run without the optional soxr, so this does not use :func:`xlsr.audio.load_audio`'s resampler.
    """
    if sr_in == sr_out:
        return x
    try:
        import soxr  # optional dependency (xlsr[resample])

        return soxr.resample(x, sr_in, sr_out, quality="HQ").astype(np.float32)
    except ImportError:
        n_out = int(round(x.size * sr_out / sr_in))
        spec = np.fft.rfft(x)
        spec = spec[: n_out // 2 + 1]
        return (np.fft.irfft(spec, n_out) * (n_out / x.size)).astype(np.float32)


def synthesize(root: pathlib.Path, languages: Sequence[str]) -> dict[str, int]:
    """espeak-ng speech for the fixed sentences into ``root/tts_<lang>/``; returns counts of what happened."""
    stats = {"synthesized": 0, "cached": 0, "short": 0}
    jobs = []
    for lang in languages:
        for i, text in enumerate(TTS_SENTENCES[lang]):
            for j, (variant, rate, pitch) in enumerate(TTS_VARIANTS):
                rel = f"tts_{lang}/s{i:02d}_v{j}.wav"
                if (root / rel).exists():
                    stats["cached"] += 1
                else:
                    jobs.append((lang, text, variant, rate, pitch, rel))
    if not jobs:
        return stats
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise RuntimeError(f"espeak-ng not found (apt-get install {ESPEAK_PACKAGE})")
    logger.info("synthesizing %d utterances with espeak-ng", len(jobs))
    with tempfile.TemporaryDirectory(prefix="xlsr_tts_") as tmp:
        tmp_wav = os.path.join(tmp, "out.wav")
        for lang, text, variant, rate, pitch, rel in tqdm(jobs, desc="espeak-ng", unit="utt"):
            res = subprocess.run(
                [exe, "-b", "1", "-v", f"{lang}+{variant}", "-s", str(rate), "-p", str(pitch),
                 "-w", tmp_wav, "--", text],
                capture_output=True, text=True, check=False,
            )
            if res.returncode != 0:
                raise RuntimeError(f"espeak-ng failed for {lang}: {res.stderr.strip()}")
            x, sr = sf.read(tmp_wav, dtype="float32", always_2d=False)
            if x.ndim > 1:
                x = x.mean(axis=1)
            y = resample(x, sr, SAMPLE_RATE)
            if y.size < MIN_SECONDS * SAMPLE_RATE:
                stats["short"] += 1
                continue
            pcm = np.clip(np.round(y * 32767.0), -32768, 32767).astype(np.int16)
            write_wav(root / rel, pcm)
            stats["synthesized"] += 1
    return stats
