"""Lhotse data: Shar shards written by ``python -m xlsr.manifest --to-shar`` and read by Lhotse itself; a Shar stream
that resumes exactly (1 and 2 ranks); a CutSet with supervisions that fine-tunes; cut boundaries; bad cuts named."""

import json
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import xlsr
from xlsr.audio import AudioError
from xlsr.data.lhotse_source import CutItems, LhotseCutSource, SharBatchLoader
from xlsr.manifest import read_manifest, read_transcript_table, write_manifest, write_shar
from xlsr.vocabulary import Dictionary

lhotse = pytest.importorskip("lhotse")

REPO = Path(__file__).resolve().parents[1]
DIGITS = Path(__file__).parent / "fixtures" / "digits"
SPEECH = Path(__file__).parent / "fixtures" / "speech"


def to_shar(manifest: Path, out: Path, shard_size: int) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "xlsr.manifest", str(manifest), "--to-shar", str(out), "--shard-size", str(shard_size)]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """The 21 number prompts: manifest + .wrd/.ltr, their Shar shards (8 cuts each) written by our command."""
    dest = tmp_path_factory.mktemp("digits")
    write_manifest(DIGITS, dest / "manifest", valid_percent=0.0, progress=False,
                   transcripts=read_transcript_table(DIGITS / "transcripts.tsv"))
    result = to_shar(dest / "manifest" / "train.tsv", dest / "shar", 8)
    assert result.returncode == 0, result.stderr[-2000:]
    return dest / "manifest" / "train.tsv", dest / "shar", result


@pytest.fixture(scope="module")
def speech_shar(tmp_path_factory):
    """tests/fixtures/speech (20 real utterances, 1.0 to 2.4 s) as 5 Shar shards of 4 cuts."""
    dest = tmp_path_factory.mktemp("speech")
    write_manifest(SPEECH, dest / "manifest", valid_percent=0.0, progress=False)
    write_shar(dest / "manifest" / "train.tsv", dest / "shar", shard_size=4, progress=False)  # the command's function
    return dest / "shar"


def test_to_shar_shards_are_read_by_lhotse(digits):
    manifest, shar, result = digits
    assert "wrote 3 shard(s)" in result.stdout
    root, entries = read_manifest(manifest)
    wrd = manifest.with_suffix(".wrd").read_text().splitlines()
    ltr = manifest.with_suffix(".ltr").read_text().splitlines()
    cuts = list(lhotse.CutSet.from_shar(in_dir=shar))  # Lhotse's own reader
    assert [c.id for c in cuts] == [rel for rel, _ in entries]
    for cut, (rel, num_samples), words, letters in zip(cuts, entries, wrd, ltr, strict=True):
        expected, rate = sf.read(Path(root) / rel, dtype="float32")
        assert rate == cut.sampling_rate == 16000 and cut.num_samples == num_samples
        assert np.array_equal(cut.load_audio()[0], expected), cut.id  # FLAC in, FLAC out: lossless
        assert cut.supervisions[0].text == words and cut.custom["wrd"] == words and cut.custom["ltr"] == letters


def test_to_shar_names_a_bad_file(tmp_path):
    for name in ("0.flac", "1.flac"):
        (tmp_path / name).write_bytes((DIGITS / name).read_bytes())
    write_manifest(tmp_path, tmp_path / "m", valid_percent=0.0, progress=False)
    (tmp_path / "1.flac").write_bytes(b"not audio at all" * 100)
    result = to_shar(tmp_path / "m" / "train.tsv", tmp_path / "shar", 8)
    assert result.returncode == 2
    assert "1.flac" in result.stderr and "line 3" in result.stderr, result.stderr


# ---------------------------------------------------------------------- cuts: boundaries, bad cuts


def write_cuts(path: Path, cuts) -> Path:
    lhotse.CutSet.from_cuts(cuts).to_file(path)
    return path


def test_a_cut_with_offset_and_duration_loads_its_slice(tmp_path):
    recording = lhotse.Recording.from_file(DIGITS / "20.flac", recording_id="twenty")
    whole, _ = sf.read(DIGITS / "20.flac", dtype="float32")
    sliced = recording.to_cut().truncate(offset=0.25, duration=0.5).with_id("twenty-slice")
    source = LhotseCutSource(str(write_cuts(tmp_path / "cuts.jsonl.gz", [sliced])), CutItems(crop=False))
    assert source.sizes.tolist() == [8000] and source.key(0) == "twenty-slice"
    assert torch.equal(source[0]["source"], torch.from_numpy(whole[4000:12000]))
    # at 8 kHz with resampling on, the size is the slice's length at 16 kHz, and the audio has it
    sf.write(tmp_path / "low.wav", whole[::2], 8000)
    low = lhotse.Recording.from_file(tmp_path / "low.wav", recording_id="low").to_cut().truncate(offset=0.25,
                                                                                                  duration=0.5)
    source = LhotseCutSource(str(write_cuts(tmp_path / "low.jsonl.gz", [low])), CutItems(crop=False, resample=True))
    assert source.sizes.tolist() == [8000] and source[0]["source"].shape == (8000,)


def test_a_bad_cut_is_named_by_its_id(tmp_path):
    (tmp_path / "bad.flac").write_bytes((DIGITS / "3.flac").read_bytes())
    good = lhotse.Recording.from_file(DIGITS / "2.flac", recording_id="good").to_cut()
    bad = lhotse.Recording.from_file(tmp_path / "bad.flac", recording_id="bad-rec").to_cut()
    bad.id = "the-bad-cut"
    cuts = write_cuts(tmp_path / "cuts.jsonl.gz", [good, bad])
    (tmp_path / "bad.flac").write_bytes(b"garbage" * 1000)
    strict = LhotseCutSource(str(cuts), CutItems(crop=False, skip_bad=False))
    with pytest.raises(AudioError, match="cut the-bad-cut: cannot load audio"):
        strict[1]
    lenient = LhotseCutSource(str(cuts), CutItems(crop=False, skip_bad=True))
    with pytest.warns(UserWarning, match="the-bad-cut"):
        assert lenient[1] is None
    assert lenient[0] is not None and lenient.num_skipped == 1


# ---------------------------------------------------------------------- the Shar stream


def stream(shar: Path, **kwargs) -> SharBatchLoader:
    settings = dict(max_tokens=80000, seed=3, epoch=1, buffer_size=3)
    settings.update(kwargs)
    return SharBatchLoader(str(shar), CutItems(min_sample_size=16000, max_sample_size=32000), **settings)


def as_lists(batches) -> list:
    return [None if b is None else (b.ids.tolist(), b.source) for b in batches]


def test_shar_stream_deals_shards_to_ranks_and_resumes_mid_epoch(speech_shar):
    one = stream(speech_shar)
    everything = {i for b in one for i in b.ids.tolist()}
    assert len(everything) == 20  # every cut once (min 1 s, cropped to 2 s)
    ranks = [stream(speech_shar, rank=r, world_size=2) for r in (0, 1)]
    seen = [{i for b in loader for i in b.ids.tolist()} for loader in ranks]
    assert not seen[0] & seen[1] and seen[0] | seen[1] == everything  # different data on each rank, none lost
    # the batches do not depend on the decoding threads, and a loader put at position 3 goes on as the straight one
    straight = as_lists(stream(speech_shar))
    threaded = as_lists(stream(speech_shar, num_workers=2))
    resumed = stream(speech_shar, epoch=5)
    resumed.load_state_dict({"epoch": 1, "batches_done_in_epoch": 3, "epoch_offset": 0, "num_replicas": 1})
    assert resumed.position == 3 and resumed.total_batches == len(straight)
    for x, y in zip(straight, threaded, strict=True):
        assert x[0] == y[0] and torch.equal(x[1], y[1])
    for x, y in zip(straight[3:], as_lists(resumed), strict=True):
        assert x[0] == y[0] and torch.equal(x[1], y[1])
    assert resumed.position == len(straight)
    with pytest.raises(ValueError, match="5 shard.s. for 6 ranks"):
        stream(speech_shar, rank=5, world_size=6)  # training: a rank without a shard would have no data
    assert stream(speech_shar, rank=5, world_size=6, shuffle=False).total_batches == 0  # validation: empty batches
    other_epoch = [ids for ids, _ in as_lists(stream(speech_shar, epoch=2))]
    assert other_epoch != [ids for ids, _ in straight]  # shards and batches reshuffled each epoch


PRETRAIN = ("model=tiny", "data.num_workers=0", "data.max_tokens=96000", "data.max_sample_size=32000",
            "data.min_sample_size=16000", "data.lhotse_shuffle_buffer=4", "optim.warmup_updates=4", "log_interval=1",
            "progress_bar=false", "tensorboard=false", "device=cpu", "threads=1", "optim.max_update=12",
            "checkpoint.save_interval_updates=3")


def pretrain_args(shar: Path, out: Path, *extra) -> list[str]:
    return [*PRETRAIN, f"data.lhotse_shar={shar}", f"output_dir={out}", *extra]


def final_parameters(out: Path, update: int) -> dict:
    return torch.load(out / "checkpoints" / f"checkpoint_{update}.pt", weights_only=False)["model"]


def assert_same_parameters(a: Path, b: Path, update: int) -> None:
    x, y = final_parameters(a, update), final_parameters(b, update)
    for key in x:
        assert torch.equal(x[key], y[key]), key


def first_epoch(out: Path) -> tuple[int, int]:
    """(updates, batches with data on all ranks) of the run's first complete epoch."""
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return next((r["updates"], r["num_batches"]) for r in lines if r["split"] == "epoch" and r["complete"])


def expected_first_epoch(shar: Path, world_size: int) -> tuple[int, int]:
    """(steps, batches with data) of epoch 1 on ``world_size`` ranks, from the loaders themselves: the ranks run as
    many steps as the one with most batches, and every batch trains once."""
    from xlsr.pretrain.config import compose_config

    seed = compose_config(pretrain_args(shar, Path("unused"))).seed
    loaders = [stream(shar, rank=r, world_size=world_size, max_tokens=96000, buffer_size=4, seed=seed)
               for r in range(world_size)]
    return max(loader.total_batches for loader in loaders), sum(b is not None for loader in loaders for b in loader)


def test_shar_pretraining_stopped_and_resumed_equals_straight_through(speech_shar, tmp_path):
    from xlsr.pretrain.config import compose_config
    from xlsr.pretrain.trainer import Trainer

    def run(*args):
        trainer = Trainer(compose_config(pretrain_args(speech_shar, *args)))
        trainer.train()
        return trainer

    straight = run(tmp_path / "straight")
    assert straight.epoch > 1  # the run crossed an epoch boundary
    assert first_epoch(tmp_path / "straight") == expected_first_epoch(speech_shar, 1)
    run(tmp_path / "stopped", "stop_at_update=3")
    resumed = run(tmp_path / "stopped")
    assert resumed.num_updates == 12
    assert_same_parameters(tmp_path / "straight", tmp_path / "stopped", 12)


def run_torchrun(args: list[str], port: int) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
           "-m", "xlsr.pretrain", *args, "distributed.backend=gloo"]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.slow
def test_shar_pretraining_on_two_ranks_stopped_and_resumed_equals_straight_through(speech_shar, tmp_path):
    """5 shards on 2 ranks: 3 and 2 shards, so one rank runs dry first and takes zero-weight passes."""
    run_torchrun(pretrain_args(speech_shar, tmp_path / "straight"), 29641)
    run_torchrun(pretrain_args(speech_shar, tmp_path / "stopped", "stop_at_update=3"), 29642)
    run_torchrun(pretrain_args(speech_shar, tmp_path / "stopped"), 29643)
    steps, batches = expected_first_epoch(speech_shar, 2)
    assert steps < batches < 2 * steps  # one rank ran dry before the other: zero-weight passes
    assert first_epoch(tmp_path / "straight") == (steps, batches)  # every batch of both ranks trained once
    assert_same_parameters(tmp_path / "straight", tmp_path / "stopped", 12)


# ---------------------------------------------------------------------- CTC fine-tuning on a CutSet


def test_ctc_finetuning_on_a_cutset_with_supervisions(tmp_path):
    from xlsr.finetune.config import compose_config
    from xlsr.finetune.trainer import FineTuner

    texts = read_transcript_table(DIGITS / "transcripts.tsv")
    cuts = []
    for name, text in sorted(texts.items()):
        cut = lhotse.Recording.from_file(DIGITS / name, recording_id=name).to_cut()
        cut.supervisions = [lhotse.SupervisionSegment(id=name, recording_id=name, start=0, duration=cut.duration,
                                                      text=text)]
        cuts.append(cut)
    cuts_path = write_cuts(tmp_path / "cuts.jsonl.gz", cuts)
    torch.manual_seed(0)
    xlsr.Wav2Vec2Model(xlsr.Wav2Vec2Config.from_preset("tiny")).save_pretrained(tmp_path / "pretrained")
    out = tmp_path / "run"
    trainer = FineTuner(compose_config([
        f"model.init_from={tmp_path / 'pretrained'}", f"data.lhotse_cuts={cuts_path}", f"output_dir={out}",
        "data.num_workers=0", "data.max_tokens=200000", "log_interval=1", "progress_bar=false", "tensorboard=false",
        "model.freeze_finetune_updates=0", "model.mask_prob=0.05", "model.mask_channel_prob=0.0",
        "model.encoder_layerdrop=0.0", "optim.lr=5e-3", "optim.max_update=30",
    ]))
    assert set(trainer.task.dictionary.symbols) >= set("ZEROTWNY|")  # built from the supervisions' words
    trainer.train()
    losses = [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
              if r["split"] == "train"]
    assert len(losses) == 30 and sum(losses[-5:]) < 0.7 * sum(losses[:5]), losses
    model = xlsr.Wav2Vec2ForCTC.from_pretrained(out / "model")
    assert model.vocab == list(trainer.task.dictionary.symbols)


def test_exactly_one_training_source_is_named():
    from types import SimpleNamespace

    from xlsr.data.source import training_data, validation_data

    assert training_data(SimpleNamespace(manifest="", lhotse_shar="s")) == "lhotse-shar:s"
    assert validation_data(SimpleNamespace(valid_manifest=None, valid_lhotse_cuts="c.jsonl.gz")) == "lhotse-cuts:c.jsonl.gz"
    for wrong in (SimpleNamespace(manifest=""), SimpleNamespace(manifest="t.tsv", lhotse_cuts="c.jsonl.gz")):
        with pytest.raises(ValueError, match="set exactly one of data.manifest, data.lhotse_cuts, data.lhotse_shar"):
            training_data(wrong)


def test_a_cutset_pretrains_exactly_as_the_manifest_of_the_same_files(tmp_path):
    """The same recordings, in the same order, as a CutSet and as a manifest: the same batches, crops and updates."""
    from xlsr.pretrain.config import compose_config
    from xlsr.pretrain.trainer import Trainer

    write_manifest(SPEECH, tmp_path / "m", valid_percent=0.0, progress=False)
    root, entries = read_manifest(tmp_path / "m" / "train.tsv")
    cuts = write_cuts(tmp_path / "cuts.jsonl.gz", [lhotse.Recording.from_file(Path(root) / rel, recording_id=rel).to_cut()
                                                   for rel, _ in entries])
    common = [*PRETRAIN, "optim.max_update=4", "checkpoint.save_interval_updates=4"]
    for name, data in (("manifest", f"data.manifest={tmp_path / 'm' / 'train.tsv'}"), ("cuts", f"data.lhotse_cuts={cuts}")):
        Trainer(compose_config([*common, data, f"output_dir={tmp_path / name}"])).train()
    assert_same_parameters(tmp_path / "manifest", tmp_path / "cuts", 4)


def test_ctc_finetuning_streams_shar_shards_with_their_labels(digits, tmp_path):
    """The digits' Shar shards (written by --to-shar with .wrd/.ltr) fine-tune: targets from the supervisions'
    text (default) or from the custom ``ltr`` field, the same letters either way."""
    from xlsr.finetune.config import compose_config
    from xlsr.finetune.trainer import FineTuner

    manifest, shar, _ = digits
    torch.manual_seed(0)
    xlsr.Wav2Vec2Model(xlsr.Wav2Vec2Config.from_preset("tiny")).save_pretrained(tmp_path / "pretrained")
    dictionaries = []
    for name, field in (("words", []), ("letters", ["data.lhotse_text_field=ltr", "data.labels=ltr"])):
        trainer = FineTuner(compose_config([
            f"model.init_from={tmp_path / 'pretrained'}", f"data.lhotse_shar={shar}", f"output_dir={tmp_path / name}",
            "data.num_workers=1", "data.max_tokens=200000", "progress_bar=false", "tensorboard=false",
            "model.freeze_finetune_updates=0", "optim.max_update=3", *field,
        ]))
        trainer.train()
        assert (tmp_path / name / "model").is_dir()
        dictionaries.append(list(trainer.task.dictionary.symbols))
    assert dictionaries[0] == dictionaries[1]
    assert set(dictionaries[0]) == set(Dictionary.load(manifest.parent / "dict.ltr.txt").symbols)
