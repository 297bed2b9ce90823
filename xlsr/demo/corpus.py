"""The demo corpus: a small multilingual speech corpus for CPU pretraining, built once from Debian packages.

The sources are available from the Debian package archive, so the corpus can be built on any Debian/Ubuntu
machine (or CI runner) without downloading data sets from elsewhere:

* **Real speech** (:mod:`xlsr.demo.asterisk`) - the Asterisk PBX voice prompts shipped as
  ``asterisk-core-sounds-{en,es,fr,it,ru}-g722``: about 2,800 short studio recordings by one professional
  speaker per language (about 1,700 of them, 0.35-0.47 h per language, are speech of 1 s or longer), stored as
  raw 64 kbit/s G.722 bitstreams (16 kHz audio), decoded to 16 kHz mono 16-bit WAV (:mod:`xlsr.demo.g722`).
* **Synthetic speech** (:mod:`xlsr.demo.tts`, optional, on by default) - ten sentences per language spoken by
  ``espeak-ng`` in three voice variants, for German, Portuguese, Polish, Dutch, Swedish, Turkish, Hindi and
  Swahili, resampled to 16 kHz, in ``tts_<lang>/`` folders so that they can never be mistaken for real speech.

The result is a folder with ``train.tsv`` / ``valid.tsv`` in the fairseq manifest format (:mod:`xlsr.manifest`),
plus ``corpus.json`` (summary) and ``ATTRIBUTION.txt`` (licences, :mod:`xlsr.demo.attribution`).  Building it the
first time takes well under a minute once the packages are installed; later calls return at once.

Usage::

    from xlsr.demo.corpus import build_demo_corpus
    manifest_dir = build_demo_corpus()          # -> ~/.cache/xlsr/demo_corpus

    python -m xlsr.demo.corpus [--cache-dir DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import pathlib
import sys
import time
from typing import Iterator, Sequence

import numpy as np

from xlsr.audio import audio_info
from xlsr.demo import apt, asterisk, g722
from xlsr.demo.asterisk import ASTERISK_PACKAGES
from xlsr.demo.attribution import attribution_text
from xlsr.demo.clips import MIN_SECONDS, SAMPLE_RATE
from xlsr.demo.tts import ESPEAK_PACKAGE, TTS_LANGUAGES, synthesize
from xlsr.files import write_text_atomic
from xlsr.manifest import write_manifest_file

logger = logging.getLogger(__name__)

__all__ = [
    "build_demo_corpus",
    "load_summary",
    "default_cache_dir",
    "required_apt_packages",
    "write_split_manifests",
    "main",
]

# Bump when the corpus content or layout changes: it invalidates done-markers.
_CORPUS_VERSION = 1
_DONE_MARKER = ".done.json"


def default_cache_dir() -> pathlib.Path:
    """``$XLSR_CACHE/demo_corpus`` if ``XLSR_CACHE`` is set, else
    ``~/.cache/xlsr/demo_corpus``."""
    root = os.environ.get("XLSR_CACHE")
    base = pathlib.Path(root).expanduser() if root else pathlib.Path.home() / ".cache" / "xlsr"
    return base / "demo_corpus"


def required_apt_packages(tts: bool = True) -> list[str]:
    """The Debian packages this corpus needs (for CI scripts).

    The decoder package name is the one that fits this Debian release
    (``libspandsp2`` on bookworm)."""
    pkgs = list(ASTERISK_PACKAGES.values()) + [g722.spandsp_package()]
    if tts:
        pkgs.append(ESPEAK_PACKAGE)
    return pkgs


@contextlib.contextmanager
def _locked(path: pathlib.Path) -> Iterator[None]:
    """Exclusive advisory lock so that concurrent builders (e.g. several
    ranks of one job) do not step on each other."""
    try:
        import fcntl  # POSIX only
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _scan(root: pathlib.Path, folders: Sequence[str]) -> dict[str, list[tuple[str, int]]]:
    """``{folder: [(relpath, num_samples), ...]}`` for WAVs of >= MIN_SECONDS."""
    out: dict[str, list[tuple[str, int]]] = {}
    for folder in folders:
        entries = []
        for p in sorted((root / folder).rglob("*.wav")):
            frames, rate, channels = audio_info(p)
            if rate != SAMPLE_RATE or channels != 1:
                logger.warning("skipping %s: %d Hz, %d channel(s)", p, rate, channels)
                continue
            if frames < MIN_SECONDS * SAMPLE_RATE:
                continue
            entries.append((p.relative_to(root).as_posix(), frames))
        out[folder] = entries
    return out


def write_split_manifests(
    root: pathlib.Path,
    groups: dict[str, list[tuple[str, int]]],
    out_dir: pathlib.Path,
    *,
    valid_percent: float = 0.05,
    seed: int = 0,
) -> dict[str, tuple[int, int]]:
    """Write fairseq ``train.tsv`` / ``valid.tsv`` (:func:`xlsr.manifest.write_manifest_file`).

    ``groups`` maps a group name (language folder) to ``(relpath, samples)``
    pairs.  The validation split is drawn per group (so every language is in
    both splits when it has at least two files), deterministically from
    ``seed``.  Rows are sorted by path.  Returns ``{group: (n_train, n_valid)}``.
    """
    if not 0.0 <= valid_percent < 1.0:
        raise ValueError(f"valid_percent must be in [0, 1), got {valid_percent}")
    rng = np.random.default_rng(seed)
    train: list[tuple[str, int]] = []
    valid: list[tuple[str, int]] = []
    counts = {}
    for name in sorted(groups):
        entries = sorted(groups[name])
        n_valid = int(round(len(entries) * valid_percent))
        if valid_percent > 0 and n_valid == 0 and len(entries) >= 2:
            n_valid = 1
        picked = set(rng.permutation(len(entries))[:n_valid].tolist())
        for k, e in enumerate(entries):
            (valid if k in picked else train).append(e)
        counts[name] = (len(entries) - n_valid, n_valid)
    head = str(root.resolve())
    write_manifest_file(out_dir / "train.tsv", head, sorted(train))
    write_manifest_file(out_dir / "valid.tsv", head, sorted(valid))
    return counts


def _summary(root: pathlib.Path, groups: dict[str, list[tuple[str, int]]],
             counts: dict[str, tuple[int, int]], decoder: str | None, packages: Sequence[str],
             elapsed: float) -> dict:
    langs = {}
    for name in sorted(groups):
        entries = groups[name]
        synthetic = name.startswith("tts_")
        lang = name[4:] if synthetic else name
        langs[name] = {
            "language": lang,
            "synthetic": synthetic,
            "source": "espeak-ng" if synthetic else ASTERISK_PACKAGES.get(lang, "?"),
            "files": len(entries),
            "train_files": counts[name][0],
            "valid_files": counts[name][1],
            "hours": round(sum(n for _, n in entries) / SAMPLE_RATE / 3600, 4),
        }
    total = sum(n for e in groups.values() for _, n in e)
    real = sum(n for k, e in groups.items() if not k.startswith("tts_") for _, n in e)
    return {
        "version": _CORPUS_VERSION,
        "root": str(root.resolve()),
        "sample_rate": SAMPLE_RATE,
        "files": sum(len(e) for e in groups.values()),
        "hours": round(total / SAMPLE_RATE / 3600, 4),
        "real_hours": round(real / SAMPLE_RATE / 3600, 4),
        "synthetic_hours": round((total - real) / SAMPLE_RATE / 3600, 4),
        "train_files": sum(c[0] for c in counts.values()),
        "valid_files": sum(c[1] for c in counts.values()),
        "g722_decoder": decoder,
        "apt_packages": list(packages),
        "build_seconds": round(elapsed, 1),
        "languages": langs,
    }


def build_demo_corpus(
    cache_dir: pathlib.Path | None = None,
    *,
    install: bool = True,
    valid_percent: float = 0.05,
    seed: int = 0,
    tts: bool = True,
) -> pathlib.Path:
    """Build (once) the demo corpus and return the folder holding
    ``train.tsv`` and ``valid.tsv`` (fairseq manifests).

    Args:
        cache_dir: where to put the corpus; default :func:`default_cache_dir`
            (``$XLSR_CACHE/demo_corpus`` or ``~/.cache/xlsr/demo_corpus``).
        install: install missing Debian packages with apt-get (needs root).
            If False, a missing package raises ``RuntimeError`` naming it.
        valid_percent: fraction of files per language in ``valid.tsv``.
        seed: seed of the train/valid split.
        tts: also add espeak-ng synthetic speech (``tts_<lang>/`` folders).

    A second call with the same settings returns at once (done-marker).
    """
    root = pathlib.Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    root = root.resolve()
    config = {"version": _CORPUS_VERSION, "valid_percent": float(valid_percent),
              "seed": int(seed), "tts": bool(tts)}
    marker = root / _DONE_MARKER

    def _is_done() -> bool:
        try:
            done = json.loads(marker.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        if done.get("config") != config or done.get("root") != str(root):
            return False
        return all((root / f).is_file() for f in ("train.tsv", "valid.tsv", "corpus.json"))

    if _is_done():
        logger.info("demo corpus already built in %s", root)
        return root

    with _locked(root / ".lock"):
        if _is_done():  # another process finished it while we waited
            return root
        t0 = time.perf_counter()
        logger.info("building demo corpus in %s", root)
        marker.unlink(missing_ok=True)

        needed = list(ASTERISK_PACKAGES.values())
        if not g722.have_g722_decoder():
            needed.append(g722.spandsp_package())
        if tts:
            needed.append(ESPEAK_PACKAGE)
        apt.install_packages(needed, install=install)

        decoder = g722.g722_decoder().name
        for lang, pkg in ASTERISK_PACKAGES.items():
            sources = asterisk.asterisk_sources(lang, pkg)
            stats = asterisk.decode_asterisk(root, sources)
            logger.info("%s (%s): %d prompts; %s", lang, pkg, len(sources),
                        ", ".join(f"{k} {v}" for k, v in stats.items() if v))

        folders = list(ASTERISK_PACKAGES)
        if tts:
            stats = synthesize(root, TTS_LANGUAGES)
            logger.info("espeak-ng: %s", ", ".join(f"{k} {v}" for k, v in stats.items() if v))
            folders += [f"tts_{lang}" for lang in TTS_LANGUAGES]

        groups = _scan(root, folders)
        counts = write_split_manifests(root, groups, root, valid_percent=valid_percent, seed=seed)
        write_text_atomic(root / "ATTRIBUTION.txt",
                          attribution_text(list(ASTERISK_PACKAGES), TTS_LANGUAGES if tts else ()))
        packages = list(ASTERISK_PACKAGES.values()) + [g722.spandsp_package()]
        if tts:
            packages.append(ESPEAK_PACKAGE)
        summary = _summary(root, groups, counts, decoder, packages, time.perf_counter() - t0)
        write_text_atomic(root / "corpus.json", json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
        write_text_atomic(marker, json.dumps({"config": config, "root": str(root)}) + "\n")
        logger.info("demo corpus: %d files, %.2f h (%.2f h real, %.2f h synthetic) in %.1f s",
                    summary["files"], summary["hours"], summary["real_hours"],
                    summary["synthetic_hours"], summary["build_seconds"])
    return root


def load_summary(corpus_dir: pathlib.Path) -> dict:
    """The ``corpus.json`` summary of a built corpus."""
    return json.loads((pathlib.Path(corpus_dir) / "corpus.json").read_text(encoding="utf-8"))


def _format_summary(summary: dict) -> str:
    rows = [f"{'folder':<8} {'files':>6} {'train':>6} {'valid':>6} {'hours':>7}  source"]
    for name, s in summary["languages"].items():
        rows.append(f"{name:<8} {s['files']:>6} {s['train_files']:>6} {s['valid_files']:>6} "
                    f"{s['hours']:>7.3f}  {s['source']}")
    rows.append(f"{'total':<8} {summary['files']:>6} {summary['train_files']:>6} "
                f"{summary['valid_files']:>6} {summary['hours']:>7.3f}  "
                f"({summary['real_hours']:.3f} h real, {summary['synthetic_hours']:.3f} h synthetic)")
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m xlsr.demo.corpus``: build the corpus and print its summary; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m xlsr.demo.corpus",
        description="Build the small multilingual demo corpus (fairseq manifests).",
    )
    parser.add_argument("--cache-dir", type=pathlib.Path, default=None,
                        help=f"where to build it (default: {default_cache_dir()})")
    parser.add_argument("--no-install", action="store_true",
                        help="do not run apt-get; fail if Debian packages are missing")
    parser.add_argument("--no-tts", action="store_true", help="leave out espeak-ng synthetic speech")
    parser.add_argument("--valid-percent", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--print-packages", action="store_true",
                        help="print the Debian packages needed and exit")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.print_packages:
        print(" ".join(required_apt_packages(tts=not args.no_tts)))
        return 0
    t0 = time.perf_counter()
    try:
        path = build_demo_corpus(args.cache_dir, install=not args.no_install,
                                 valid_percent=args.valid_percent, seed=args.seed, tts=not args.no_tts)
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    summary = load_summary(path)
    print(f"demo corpus: {path}  ({time.perf_counter() - t0:.1f} s)")
    print(f"  manifests: {path / 'train.tsv'}, {path / 'valid.tsv'}")
    print(f"  G.722 decoder: {summary['g722_decoder']}")
    print(_format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
