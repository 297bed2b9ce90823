"""What real users give ``python -m xlsr.finetune``: clips too short for one frame (and empty files), a batch in
which nothing is masked, a fine-tuned model to continue (Hugging Face's layout, fairseq's) with no dictionary, and
a pretraining checkpoint of any kind (a sharded FSDP folder, a ``.pt`` training checkpoint)."""

import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import xlsr
from xlsr.finetune.config import compose_config
from xlsr.finetune.data import LabelledAudioDataset, frames_of
from xlsr.finetune.labels import Dictionary, LabelError, read_labels, words_to_letters
from xlsr.manifest import read_transcript_table, write_manifest

REPO = Path(__file__).resolve().parents[1]
DIGITS = REPO / "tests" / "fixtures" / "digits"
CTC_MINI = REPO / "tests" / "fixtures" / "fairseq" / "ctc_mini"
SHORT_CLIPS = (0, 160, 400, 480, 560)  # samples: 0 and 160 give no frame, the others one (tiny conv stack)


def overrides(manifest: Path, init_from: Path, out: Path, *extra: str) -> list[str]:
    """A fast command line: ``extra`` adds settings or replaces these (key=value)."""
    settings = [
        f"model.init_from={init_from}", f"data.manifest={manifest}", f"output_dir={out}", "data.num_workers=0",
        "data.max_tokens=200000", "log_interval=1", "progress_bar=false", "tensorboard=false", "device=cpu",
        "model.freeze_finetune_updates=0", "model.mask_prob=0.05", "model.mask_channel_prob=0.0",
        "model.layerdrop=0.0", "optim.lr=5e-3", "optim.max_update=2", *extra,
    ]
    return list({setting.split("=")[0]: setting for setting in settings}.values())


def train_updates(out: Path) -> list[int]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r["update"] for r in map(json.loads, lines) if r["split"] == "train"]


def run(args: list[str]):
    from xlsr.finetune.trainer import FineTuner

    trainer = FineTuner(compose_config(args))
    trainer.train()
    return trainer


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pretrained") / "tiny"
    torch.manual_seed(0)
    xlsr.Wav2Vec2Model(xlsr.Wav2Vec2Config.from_preset("tiny")).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def digits(tmp_path_factory) -> Path:
    """train.tsv + .ltr/.wrd of the 21 digits prompts, without a dict.ltr.txt beside them."""
    dest = tmp_path_factory.mktemp("digits")
    write_manifest(DIGITS, dest, valid_percent=0.0, progress=False,
                   transcripts=read_transcript_table(DIGITS / "transcripts.tsv"))
    (dest / "dict.ltr.txt").unlink()
    return dest / "train.tsv"


@pytest.fixture(scope="module")
def with_short_clips(tmp_path_factory) -> Path:
    """The digits prompts plus noise clips of SHORT_CLIPS samples (an empty .wav among them) transcribed 'SEVEN',
    listed among the real ones; the manifest is written by hand (xlsr.manifest leaves 0-sample files out)."""
    dest = tmp_path_factory.mktemp("short_clips")
    rows = [(str((DIGITS / name).resolve()), sf.info(DIGITS / name).frames, text)
            for name, text in sorted(read_transcript_table(DIGITS / "transcripts.tsv").items())]
    rng = np.random.default_rng(0)
    for position, size in enumerate(SHORT_CLIPS):
        path = dest / f"clip{size}.wav"
        sf.write(path, (0.1 * rng.standard_normal(size)).astype(np.float32), 16000)
        assert sf.info(path).frames == size
        rows.insert(3 * position + 1, (str(path), size, "SEVEN"))
    (dest / "train.tsv").write_text("/\n" + "".join(f"{p.lstrip('/')}\t{n}\n" for p, n, _ in rows))
    (dest / "train.ltr").write_text("".join(words_to_letters(text) + "\n" for *_, text in rows))
    return dest / "train.tsv"


# ---------------------------------------------------------------------- short and empty clips


def test_clips_without_a_frame_are_left_out_with_one_warning(with_short_clips):
    dictionary = Dictionary.from_transcripts(r for r in read_labels(with_short_clips) if r)
    conv_layers = xlsr.Wav2Vec2Config.from_preset("tiny").conv_layers
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dataset = LabelledAudioDataset(str(with_short_clips), dictionary, num_frames=frames_of(conv_layers))
    about_frames = [str(w.message) for w in caught if "too short for one frame" in str(w.message)]
    assert len(about_frames) == 1, [str(w.message) for w in caught]
    assert about_frames[0].startswith("2 item(s) left out") and "clip0.wav (0 samples)" in about_frames[0]
    assert "clip160.wav (160 samples)" in about_frames[0]
    assert sorted(Path(p).name for p, _ in dataset.dropped) == ["clip0.wav", "clip160.wav"]
    kept = sorted(Path(dataset.path(i)).name for i in range(len(dataset)))
    assert len(kept) == 21 + 3 and {"clip400.wav", "clip480.wav", "clip560.wav"} <= set(kept)
    assert frames_of(conv_layers)(np.array([400, 560])).tolist() == [1, 1]


def test_short_and_empty_clips_do_not_stop_the_finetune_command(with_short_clips, pretrained, tmp_path):
    """The recipe's masks (0.75 x 10 over time): the one-frame clips leave batches in which no frame is drawn."""
    out = tmp_path / "run"
    args = overrides(with_short_clips, pretrained, out, "model.mask_prob=0.75", "optim.max_update=8")
    result = subprocess.run([sys.executable, "-m", "xlsr.finetune", *args], cwd=REPO, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 item(s) left out, too short for one frame" in result.stderr
    assert train_updates(out) == list(range(1, 9))
    assert (out / "model" / "model.safetensors").is_file()


def test_a_batch_without_masked_frames_trains_unmasked_but_pretraining_needs_one():
    """fairseq: the fine-tuning encoder applies an all-False time mask as it is; the contrastive task refuses."""
    torch.manual_seed(0)
    cfg = xlsr.Wav2Vec2Config.from_preset("tiny")
    model = xlsr.Wav2Vec2Model(cfg).eval()
    source = torch.randn(2, 4000)
    frames = int(frames_of(cfg.conv_layers)(4000))
    nothing = torch.zeros(2, frames, dtype=torch.bool)
    with torch.no_grad():
        masked = model.extract_features_masked(source, mask_indices=nothing).x
        plain = model.extract_features(source).x
    assert torch.equal(masked, plain)
    with pytest.raises(ValueError, match="no frame is masked"):
        model(source, mask_indices=nothing)
