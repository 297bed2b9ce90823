"""xlsr.data.audio_dataset: bad files, cropping/padding, length batching, sharding, resume, alpha."""

import os
import warnings

import numpy as np
import pytest
import soundfile
import torch
import torch.nn.functional as F

from xlsr.audio import AudioError, AudioWarning, load_audio
from xlsr.manifest import write_manifest
from xlsr.data.audio_dataset import (
    AudioDataset,
    BadFilesError,
    DataConfig,
    LengthBatchSampler,
    build_dataloader,
    check_data_config,
    collate,
    set_loader_epoch,
)
from xlsr.data.batch import AudioBatch, CTCBatch
from xlsr.data.source import UtteranceSource

SR = 16000


def write_audio(path, num_samples, sample_rate=SR, channels=1, seed=0):
    rng = np.random.default_rng(seed)
    shape = (num_samples,) if channels == 1 else (num_samples, channels)
    soundfile.write(str(path), (0.1 * rng.standard_normal(shape)).astype(np.float32), sample_rate, subtype="FLOAT")


def make_corpus(folder, lengths, prefix="utt"):
    """Good files of the given lengths; returns (manifest path, list of file paths)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, n in enumerate(lengths):
        path = folder / f"{prefix}{i:03d}.wav"
        write_audio(path, n, seed=i)
        paths.append(os.path.realpath(path))
    write_manifest(folder, folder, valid_percent=0.0, progress=False, num_workers=1)
    return str(folder / "train.tsv"), paths


def write_manifest_lines(path, root, entries):
    with open(path, "w") as f:
        f.write(f"{root}\n")
        for rel, n in entries:
            f.write(f"{rel}\t{n}\n")
    return str(path)


def dataset_paths(dataset):
    return {dataset.path(i) for i in range(len(dataset))}


# --------------------------------------------------------------------------- bad files


def make_bad_file(kind, folder):
    """One bad file of ``kind``; returns (path, size claimed in the manifest, message pattern)."""
    path = folder / f"{kind}.wav"
    if kind == "corrupt":
        path.write_bytes(b"RIFF but not really" * 30)
        return path, 2000, "cannot"
    if kind == "empty":
        write_audio(path, 0)
        return path, 2000, r"empty \(0 samples\)"
    if kind == "8khz":
        write_audio(path, 2000, sample_rate=8000)
        return path, 2000, "8000 Hz, expected 16000 Hz"
    raise ValueError(kind)


@pytest.fixture
def good_corpus(tmp_path):
    folder = tmp_path / "data"
    _, paths = make_corpus(folder, [1500, 2000, 2500, 3000])
    return folder, paths


def manifest_with(folder, good_paths, extra):
    entries = [(os.path.basename(p), 2000) for p in good_paths] + extra
    return write_manifest_lines(folder / "mixed.tsv", os.path.realpath(folder), entries)


@pytest.mark.parametrize("kind", ["corrupt", "empty", "8khz"])
def test_bad_file_skipped_at_load_time(kind, good_corpus):
    folder, good = good_corpus
    bad_path, size, pattern = make_bad_file(kind, folder)
    manifest = manifest_with(folder, good, [(bad_path.name, size)])
    dataset = AudioDataset(manifest, min_sample_size=100, skip_bad=True)
    assert dataset_paths(dataset) == set(good) | {os.path.realpath(bad_path)}
    with pytest.warns(AudioWarning, match=pattern) as record:
        items = [dataset[i] for i in range(len(dataset))]
    assert any(str(bad_path.name) in str(w.message) for w in record)
    assert sum(item is None for item in items) == 1 and dataset.num_skipped == 1
    batch = collate(items, pad=True)
    assert {dataset.path(i) for i in batch.ids.tolist()} == set(good)  # no good file dropped


@pytest.mark.parametrize("kind", ["corrupt", "empty", "8khz"])
def test_bad_file_dropped_by_header_check(kind, good_corpus):
    folder, good = good_corpus
    bad_path, size, pattern = make_bad_file(kind, folder)
    manifest = manifest_with(folder, good, [(bad_path.name, size)])
    with pytest.warns(AudioWarning, match=pattern) as record:
        dataset = AudioDataset(manifest, min_sample_size=100, skip_bad=True, check_headers=True)
    assert any(bad_path.name in str(w.message) for w in record)
    assert dataset_paths(dataset) == set(good)
    assert [p for p, _ in dataset.dropped] == [os.path.realpath(bad_path)]


@pytest.mark.parametrize("kind", ["corrupt", "empty", "8khz"])
def test_bad_file_refused_without_skip_bad(kind, good_corpus):
    folder, good = good_corpus
    bad_path, size, pattern = make_bad_file(kind, folder)
    manifest = manifest_with(folder, good, [(bad_path.name, size)])
    with pytest.raises(BadFilesError, match=pattern) as info:
        AudioDataset(manifest, min_sample_size=100, skip_bad=False, check_headers=True)
    assert str(bad_path) in str(info.value)
    dataset = AudioDataset(manifest, min_sample_size=100, skip_bad=False)  # no header check
    bad_index = next(i for i in range(len(dataset)) if dataset.path(i) == os.path.realpath(bad_path))
    with pytest.raises(AudioError, match=pattern):
        dataset[bad_index]


def test_one_error_lists_every_bad_file(good_corpus):
    folder, good = good_corpus
    bad = [make_bad_file(kind, folder) for kind in ("corrupt", "empty", "8khz")]
    extra = [(p.name, n) for p, n, _ in bad] + [("missing.wav", 2000)]
    manifest = manifest_with(folder, good, extra)
    with pytest.raises(BadFilesError) as info:
        AudioDataset(manifest, min_sample_size=100, skip_bad=False, check_headers=True)
    listed = {path for path, _ in info.value.bad_files}
    assert listed == {os.path.realpath(p) for p, _, _ in bad} | {os.path.join(os.path.realpath(folder), "missing.wav")}
    assert "4 bad audio file(s)" in str(info.value)


def test_missing_file_dropped_or_refused(good_corpus):
    folder, good = good_corpus
    manifest = manifest_with(folder, good, [("gone.wav", 2000)])
    with pytest.warns(AudioWarning, match=r"gone\.wav: file not found"):
        dataset = AudioDataset(manifest, min_sample_size=100, skip_bad=True)
    assert dataset_paths(dataset) == set(good)
    with pytest.raises(BadFilesError, match=r"gone\.wav: file not found"):
        AudioDataset(manifest, min_sample_size=100, skip_bad=False)


def test_too_short_dropped_with_warning(good_corpus):
    folder, good = good_corpus
    write_audio(folder / "tiny.wav", 50)
    manifest = manifest_with(folder, good, [("tiny.wav", 50)])
    with pytest.warns(AudioWarning, match=r"tiny\.wav: too short \(50 samples < min_sample_size 100\)"):
        dataset = AudioDataset(manifest, min_sample_size=100)
    assert dataset_paths(dataset) == set(good)
    assert [os.path.basename(p) for p, _ in dataset.dropped] == ["tiny.wav"]


def test_stereo_downmixed_and_kept(good_corpus):
    folder, good = good_corpus
    write_audio(folder / "stereo.wav", 2000, channels=2)
    manifest = manifest_with(folder, good, [("stereo.wav", 2000)])
    dataset = AudioDataset(manifest, min_sample_size=100, check_headers=True)
    assert len(dataset) == len(good) + 1
    index = next(i for i in range(len(dataset)) if dataset.path(i).endswith("stereo.wav"))
    with pytest.warns(AudioWarning, match=r"stereo\.wav: 2 channels, downmixed"):
        item = dataset[index]
    assert item["source"].shape == (2000,)


def test_num_skipped_counts_across_workers(good_corpus):
    folder, good = good_corpus
    bad_path, size, _ = make_bad_file("corrupt", folder)
    manifest = manifest_with(folder, good, [(bad_path.name, size)])
    cfg = DataConfig(manifest=manifest, min_sample_size=100, max_sample_size=3000, max_tokens=3000, num_workers=2)
    loader = build_dataloader(cfg, manifest, normalize=False, seed=0, epoch=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AudioWarning)
        batches = [b for b in loader]
    ids = [i for b in batches if b is not None for i in b.ids.tolist()]
    assert {loader.dataset.path(i) for i in ids} == set(good)
    assert loader.dataset.num_skipped == 1


# --------------------------------------------------------------------------- items and collate


def test_item_cropped_deterministically(tmp_path):
    manifest, _ = make_corpus(tmp_path / "d", [5000, 800])
    dataset = AudioDataset(manifest, max_sample_size=1000, seed=3)
    long_index = int(np.argmax(dataset.sizes))
    first, again = dataset[long_index]["source"], dataset[long_index]["source"]
    assert first.shape == (1000,) and torch.equal(first, again)
    full = torch.from_numpy(load_audio(dataset.path(long_index)))
    windows = full.unfold(0, 1000, 1)
    assert (windows == first).all(dim=1).any()  # a contiguous window of the file
    dataset.set_epoch(1)
    assert not torch.equal(dataset[long_index]["source"], first)
    assert dataset[1 - long_index]["source"].shape == (800,)  # short items are not cropped


def test_normalisation_matches_layer_norm(tmp_path):
    manifest, paths = make_corpus(tmp_path / "d", [3000])
    dataset = AudioDataset(manifest, normalize=True)
    raw = torch.from_numpy(load_audio(paths[0]))
    torch.testing.assert_close(dataset[0]["source"], F.layer_norm(raw, raw.shape), rtol=0, atol=0)
    assert not torch.equal(AudioDataset(manifest, normalize=False)[0]["source"], dataset[0]["source"])


def test_collate_crop_to_shortest_and_pad_to_longest():
    waves = [torch.arange(n, dtype=torch.float32) + 1 for n in (5, 9, 7)]
    samples = [{"id": i, "source": w} for i, w in enumerate(waves)]

    cropped = collate(samples, pad=False, seed=1)
    assert cropped.source.shape == (3, 5) and cropped.padding_mask is None
    assert cropped.ids.tolist() == [0, 1, 2] and cropped.ids.dtype == torch.long
    for row, wave in zip(cropped.source, waves):
        start = int(row[0].item()) - 1
        assert torch.equal(row, wave[start : start + 5])  # a contiguous window
    assert torch.equal(collate(samples, pad=False, seed=1).source, cropped.source)

    padded = collate(samples, pad=True)
    assert padded.source.shape == (3, 9) and padded.padding_mask.dtype == torch.bool
    for row, mask, wave in zip(padded.source, padded.padding_mask, waves):
        n = len(wave)
        assert torch.equal(row[:n], wave) and (row[n:] == 0).all()
        assert not mask[:n].any() and mask[n:].all()


def test_collate_drops_none_and_empty_batch():
    sample = {"id": 4, "source": torch.ones(3)}
    batch = collate([None, sample, None], pad=False)
    assert batch.ids.tolist() == [4] and batch.source.shape == (1, 3)
    assert collate([None, None], pad=True) is None
    assert collate([], pad=False) is None


def test_batch_to_device_and_audio_seconds():
    """A batch moves every tensor (targets too) and counts its audio without the padding."""
    padded = collate([{"id": 0, "source": torch.ones(8)}, {"id": 1, "source": torch.ones(5)}], pad=True)
    assert isinstance(padded, AudioBatch) and padded.num_samples == 2
    assert padded.audio_seconds(sample_rate=1) == 13.0  # 8 + 5 samples, 3 of padding not counted
    assert collate([{"id": 0, "source": torch.ones(8)}], pad=False).audio_seconds(sample_rate=4) == 2.0
    batch = CTCBatch(source=padded.source, padding_mask=padded.padding_mask, ids=padded.ids,
                     target=torch.ones(2, 3, dtype=torch.long), target_lengths=torch.tensor([3, 2]))
    moved = batch.to("meta")
    assert isinstance(moved, CTCBatch)
    for name in ("source", "padding_mask", "ids", "target", "target_lengths"):
        assert getattr(moved, name).device.type == "meta" and getattr(batch, name).device.type == "cpu"
    assert AudioBatch(source=padded.source, padding_mask=None, ids=padded.ids).to("meta").padding_mask is None


# --------------------------------------------------------------------------- batching


def random_sizes(n=500, seed=0, low=100, high=3000):
    return np.random.default_rng(seed).integers(low, high, n)


def test_batches_respect_max_tokens_and_cover_all():
    sizes = random_sizes()
    sampler = LengthBatchSampler(sizes, max_tokens=12000, seed=5)
    batches = list(sampler)
    assert len(batches) == len(sampler) == sampler.total_batches
    for batch in batches:
        assert len(batch) * sizes[batch].max() <= 12000
    flat = sorted(i for b in batches for i in b)
    assert flat == list(range(len(sizes)))
    spreads = [sizes[b].max() - sizes[b].min() for b in batches]
    assert np.median(spreads) < 100  # batches group similar lengths


def test_required_batch_size_multiple():
    sizes = np.full(100, 1000)
    sampler = LengthBatchSampler(sizes, max_tokens=7000, required_batch_size_multiple=4)
    lengths = [len(b) for b in sampler]
    assert all(n % 4 == 0 for n in lengths[:-1]) and max(lengths) == 4 and sum(lengths) == 100


def test_item_longer_than_max_tokens_is_an_error():
    with pytest.raises(ValueError, match="max_tokens"):
        LengthBatchSampler([10, 5000], max_tokens=1000)


def test_same_seed_same_batches_other_epoch_other_order():
    sizes = random_sizes()
    a = list(LengthBatchSampler(sizes, 12000, seed=1, epoch=2))
    b = list(LengthBatchSampler(sizes, 12000, seed=1, epoch=2))
    c = list(LengthBatchSampler(sizes, 12000, seed=1, epoch=3))
    assert a == b and a != c
    unshuffled = LengthBatchSampler(sizes, 12000, shuffle=False)
    assert list(unshuffled) == list(LengthBatchSampler(sizes, 12000, shuffle=False, epoch=9))


@pytest.mark.parametrize("num_replicas", [2, 4])
def test_ranks_get_disjoint_equal_shards_of_every_batch(num_replicas):
    sizes = random_sizes(n=503)
    single = LengthBatchSampler(sizes, 12000, seed=4, epoch=1)
    everything = single.global_batches()
    assert len(everything) % num_replicas  # the case that used to lose the last batches
    shards = [list(LengthBatchSampler(sizes, 12000, seed=4, epoch=1, num_replicas=num_replicas, rank=r))
              for r in range(num_replicas)]
    rounds = -(-len(everything) // num_replicas)
    assert all(len(shard) == rounds for shard in shards)  # every rank takes as many steps
    for step in range(rounds):  # step s of rank r is global batch s * num_replicas + r, or empty past the end
        for rank, shard in enumerate(shards):
            position = step * num_replicas + rank
            assert shard[step] == (everything[position] if position < len(everything) else [])
    assert sorted(i for shard in shards for b in shard for i in b) == sorted(i for b in everything for i in b)
    assert list(single) == everything
    with pytest.raises(ValueError, match="rank"):
        LengthBatchSampler(sizes, 12000, num_replicas=2, rank=2)


def test_empty_padding_batch_collates_to_none(tmp_path):
    manifest, _ = make_corpus(tmp_path / "d", [1000, 1200, 1400])
    cfg = DataConfig(manifest=manifest, min_sample_size=0, max_sample_size=1400, max_tokens=1400, num_workers=0)
    rank_batches = [list(build_dataloader(cfg, manifest, normalize=False, seed=0, epoch=0, rank=r, world_size=2))
                    for r in (0, 1)]
    assert [len(b) for b in rank_batches] == [2, 2]
    assert rank_batches[1][1] is None and all(b is not None for b in rank_batches[0] + rank_batches[1][:1])
    assert sorted(int(i) for batches in rank_batches for b in batches if b is not None for i in b.ids) == [0, 1, 2]


def test_start_resumes_mid_epoch():
    sizes = random_sizes()
    sampler = LengthBatchSampler(sizes, 12000, seed=2, epoch=5)
    full = list(sampler)
    assert list(sampler.__iter__(start=7)) == full[7:]
    resumed = LengthBatchSampler(sizes, 12000, seed=2, epoch=5, start=7)
    assert list(resumed) == full[7:] and len(resumed) == len(full) - 7
    resumed.set_epoch(6)
    assert len(resumed) == resumed.total_batches  # a new epoch starts at 0


def test_dataloader_resume_and_worker_count_independence(tmp_path):
    lengths = list(np.random.default_rng(0).integers(600, 4000, 24))
    manifest, _ = make_corpus(tmp_path / "d", lengths)
    cfg = DataConfig(manifest=manifest, min_sample_size=500, max_sample_size=3000, max_tokens=9000, num_workers=0)

    def run(start, workers):
        cfg.num_workers = workers
        loader = build_dataloader(cfg, manifest, normalize=True, seed=11, epoch=3, start_batch=start)
        return [(b.ids.tolist(), b.source) for b in loader]

    full = run(0, 0)
    for ids, source in full:
        assert source.shape[0] * source.shape[1] <= 9000 and source.shape[1] <= 3000
    with_workers = run(0, 2)
    resumed = run(4, 0)
    assert [ids for ids, _ in with_workers] == [ids for ids, _ in full]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(with_workers, full))
    assert [ids for ids, _ in resumed] == [ids for ids, _ in full[4:]]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(resumed, full[4:]))


def test_pad_mode_loader(tmp_path):
    manifest, _ = make_corpus(tmp_path / "d", [600, 900, 1200, 2000, 2600])
    cfg = DataConfig(
        manifest=manifest, min_sample_size=500, max_sample_size=2000, max_tokens=4000, pad=True, num_workers=0
    )
    loader = build_dataloader(cfg, manifest, normalize=False, seed=0, epoch=0)
    batches = list(loader)
    assert sum(len(b.ids) for b in batches) == 5
    for batch in batches:
        assert batch.padding_mask is not None and batch.source.numel() <= 4000
        lengths = (~batch.padding_mask).sum(1)
        assert lengths.max() == batch.source.shape[1]


def test_set_loader_epoch(tmp_path):
    manifest, _ = make_corpus(tmp_path / "d", list(range(600, 3000, 100)))
    cfg = DataConfig(manifest=manifest, min_sample_size=500, max_sample_size=3000, max_tokens=6000, num_workers=0)
    loader = build_dataloader(cfg, manifest, normalize=False, seed=0, epoch=0)
    first = [b.ids.tolist() for b in loader]
    set_loader_epoch(loader, 1)
    second = [b.ids.tolist() for b in loader]
    fresh = build_dataloader(cfg, manifest, normalize=False, seed=0, epoch=1)
    assert second == [b.ids.tolist() for b in fresh] and second != first


def test_config_checks():
    check_data_config(DataConfig(manifest="x"))
    with pytest.raises(ValueError, match="max_tokens"):
        check_data_config(DataConfig(manifest="x", max_sample_size=10, min_sample_size=1, max_tokens=5))
    with pytest.raises(ValueError, match="min_sample_size"):
        check_data_config(DataConfig(manifest="x", min_sample_size=400000))
    with pytest.raises(ValueError, match="sampling_alpha"):
        check_data_config(DataConfig(manifest="x", sampling_alpha=0.0))


# --------------------------------------------------------------------------- several corpora


@pytest.fixture
def two_corpora(tmp_path):
    big, _ = make_corpus(tmp_path / "big", [1000] * 30, prefix="big")
    small, _ = make_corpus(tmp_path / "small", [1000] * 10, prefix="small")
    return big, small


def corpus_counts(dataset):
    return np.bincount(dataset.corpus_of(np.arange(len(dataset))), minlength=2)


def test_alpha_one_keeps_natural_shares(two_corpora):
    dataset = AudioDataset(",".join(two_corpora), sampling_alpha=1.0)
    assert corpus_counts(dataset).tolist() == [30, 10]
    np.testing.assert_allclose(dataset.corpus_ratios(), [1.0, 1.0])


def test_alpha_upsamples_small_corpus(two_corpora):
    dataset = AudioDataset(",".join(two_corpora), sampling_alpha=0.5, seed=1)
    # shares 0.75 / 0.25 -> sqrt and renormalise -> 0.634 / 0.366; total stays 40 files
    target = np.sqrt([0.75, 0.25]) / np.sqrt([0.75, 0.25]).sum()
    np.testing.assert_allclose(dataset.corpus_ratios(), target / [0.75, 0.25])
    counts = corpus_counts(dataset)
    assert counts.tolist() == [round(40 * target[0]), round(40 * target[1])]  # [25, 15]
    small_files = {dataset.path(i) for i in np.flatnonzero(dataset.corpus_of(np.arange(len(dataset))) == 1)}
    assert len(small_files) == 10  # upsampling repeats every small-corpus file at least once

    picks = [sorted(dataset.path(i) for i in range(len(dataset)))]
    dataset.set_epoch(1)
    picks.append(sorted(dataset.path(i) for i in range(len(dataset))))
    assert picks[0] != picks[1]  # a different subset each epoch
    again = AudioDataset(",".join(two_corpora), sampling_alpha=0.5, seed=1, epoch=1)
    assert sorted(again.path(i) for i in range(len(again))) == picks[1]  # deterministic

    sampler = LengthBatchSampler(dataset.sizes, 5000, seed=1, epoch=1)
    assert sorted(i for b in sampler for i in b) == list(range(len(dataset)))


def test_validation_loader_ignores_alpha(two_corpora):
    cfg = DataConfig(
        manifest=",".join(two_corpora),
        sampling_alpha=0.3,
        min_sample_size=500,
        max_sample_size=1000,
        max_tokens=4000,
        num_workers=0,
    )
    loader = build_dataloader(cfg, cfg.manifest, normalize=False, seed=0, epoch=0, shuffle=False)
    assert corpus_counts(loader.dataset).tolist() == [30, 10]
    train = build_dataloader(cfg, cfg.manifest, normalize=False, seed=0, epoch=0)
    assert corpus_counts(train.dataset)[1] > 10


def test_config_works_as_structured_config(tmp_path):
    omegaconf = pytest.importorskip("omegaconf")
    manifest, _ = make_corpus(tmp_path / "d", [1000, 1500, 2000])
    cfg = omegaconf.OmegaConf.structured(DataConfig)
    cfg.manifest = manifest
    cfg.merge_with({"min_sample_size": 500, "max_sample_size": 2000, "max_tokens": 4000, "num_workers": 0})
    loader = build_dataloader(cfg, cfg.manifest, normalize=True, seed=0, epoch=0)
    assert sum(len(b.ids) for b in loader) == 3


def test_resampled_items_are_sized_at_the_target_rate(tmp_path):
    """An 8 kHz file of 2 s is 32000 samples at 16 kHz: crops and size filters must count those, also with
    skip_bad=true (which otherwise reads no headers)."""
    root = tmp_path / "d"
    root.mkdir()
    soundfile.write(root / "narrowband.wav", np.random.default_rng(0).uniform(-0.3, 0.3, 16000).astype(np.float32), 8000)
    manifest = write_manifest_lines(root / "train.tsv", root, [("narrowband.wav", 16000)])  # the file's own count
    cfg = DataConfig(manifest=manifest, resample=True, skip_bad=True, min_sample_size=20000, max_sample_size=40000,
                     max_tokens=40000, num_workers=0)
    loader = build_dataloader(cfg, manifest, normalize=False, seed=0, epoch=0)
    assert loader.dataset.sizes.tolist() == [32000]
    (batch,) = list(loader)
    assert batch.source.shape == (1, 32000)


def test_alpha_weights_corpora_by_duration_not_file_count(tmp_path):
    """XLS-R's shares are hours of audio: 10 long files outweigh 30 short ones."""
    long, _ = make_corpus(tmp_path / "long", [4000, 5000] * 5, prefix="long")  # 10 files, 45000 samples
    short, _ = make_corpus(tmp_path / "short", [500, 1000, 1500] * 10, prefix="short")  # 30 files, 30000 samples
    dataset = AudioDataset(f"{long},{short}", sampling_alpha=0.5, seed=3)
    share = np.array([45000, 30000]) / 75000
    target = share**0.5 / (share**0.5).sum()
    np.testing.assert_allclose(dataset.corpus_ratios(), target / share)
    assert dataset.corpus_ratios()[0] < 1 < dataset.corpus_ratios()[1]  # by file count it would be the reverse
    counts = corpus_counts(dataset)
    expected = [round(10 * target[0] / share[0]), round(30 * target[1] / share[1])]
    assert counts.tolist() == expected


def test_loader_state_dict_resumes_where_the_batches_handed_out_end(tmp_path):
    """The loader's position counts what it handed out (not what its workers prefetched); a fresh loader given its
    state_dict yields exactly the rest of the epoch; a state of 1 rank on 2 ranks continues at the first global
    batch not handed out; a checkpoint's keys without ``num_replicas`` / ``epoch_offset`` (older runs) load."""
    lengths = list(np.random.default_rng(1).integers(600, 4000, 24))
    manifest, _ = make_corpus(tmp_path / "d", lengths)
    cfg = DataConfig(manifest=manifest, min_sample_size=500, max_sample_size=3000, max_tokens=9000, num_workers=2)
    full = [b.ids.tolist() for b in build_dataloader(cfg, manifest, normalize=False, seed=5, epoch=2)]
    assert len(full) >= 6
    loader = build_dataloader(cfg, manifest, normalize=False, seed=5, epoch=2)
    assert isinstance(loader.dataset, UtteranceSource) and loader.dataset.key(0) == loader.dataset.path(0)
    seen = []
    for batch in loader:
        seen.append(batch.ids.tolist())
        if len(seen) == 4:
            break
    assert seen == full[:4]
    state = loader.state_dict()
    assert state == {"epoch": 2, "batches_done_in_epoch": 4, "epoch_offset": 0, "num_replicas": 1}
    fresh = build_dataloader(cfg, manifest, normalize=False, seed=5, epoch=0)
    fresh.load_state_dict(state)
    assert [b.ids.tolist() for b in fresh] == full[4:] and fresh.position == len(full)
    old = build_dataloader(cfg, manifest, normalize=False, seed=5, epoch=0)
    old.load_state_dict({"epoch": 2, "batches_done_in_epoch": 4})  # a checkpoint written before the offset
    assert [b.ids.tolist() for b in old] == full[4:]
    ranks = [build_dataloader(cfg, manifest, normalize=False, seed=5, epoch=0, rank=r, world_size=2) for r in (0, 1)]
    for rank_loader in ranks:
        rank_loader.load_state_dict(state)
    rest = [[b.ids.tolist() if b is not None else None for b in rank_loader] for rank_loader in ranks]
    interleaved = [rest[r][s] for s in range(len(rest[0])) for r in (0, 1)]
    assert [ids for ids in interleaved if ids is not None] == full[4:]
    assert [ranks[0].global_index(p) for p in range(2)] == [4, 6] and ranks[1].global_index(0) == 5
    assert ranks[1].state_dict()["epoch_offset"] == 4 and ranks[1].state_dict()["num_replicas"] == 2
