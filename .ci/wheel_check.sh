#!/usr/bin/env bash
# CI: build a wheel, install it into a fresh virtualenv outside the checkout, and run a 2-update pretraining of the
# tiny model from a directory that is not the checkout, so the wheel's own package data (xlsr/conf/) is what runs.
# Can be run alone: .ci/wheel_check.sh   (KEEP=1 keeps the temporary directory for a look afterwards)
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
start=$SECONDS

tmp="$(mktemp -d "${TMPDIR:-/tmp}/xlsr-wheel-check.XXXXXX")"
case "$tmp" in "$repo"|"$repo"/*) echo "wheel check: temp dir $tmp is inside the checkout" >&2; exit 1 ;; esac
if [ "${KEEP:-0}" = 1 ]; then echo "wheel check: keeping $tmp"; else trap 'rm -rf "$tmp"' EXIT; fi

# Build from a clean copy of the checkout: setuptools reuses a build/ folder, whose stale files (e.g. of a moved
# config) would otherwise end up in the wheel, and the shared checkout stays untouched.
mkdir "$tmp/src"
tar -C "$repo" -cf - --exclude=./.git --exclude=./build --exclude=./dist --exclude='*.egg-info' \
    --exclude=__pycache__ --exclude=.pytest_cache --exclude=./.venv --exclude=./runs --exclude=./outputs \
    --exclude=./multirun --exclude=./tests/fixtures . | tar -C "$tmp/src" -xf -
python3 -m pip wheel --quiet --no-deps -w "$tmp/dist" "$tmp/src"
wheel="$(ls "$tmp"/dist/xlsr-*.whl)"
echo "wheel check: built $(basename "$wheel") ($((SECONDS - start)) s)"
python3 - "$wheel" <<'EOF'
import sys, zipfile
names = set(zipfile.ZipFile(sys.argv[1]).namelist())
for need in ("xlsr/conf/pretrain.yaml", "xlsr/conf/model/tiny.yaml", "xlsr/conf/data/small.yaml"):
    assert need in names, f"{need} missing from the wheel"
EOF

# Fresh environment outside the checkout: the CPU torch build, then the wheel (its deps come from the registry).
python3 -m venv "$tmp/wheelenv"
py="$tmp/wheelenv/bin/python"
"$py" -m pip install --quiet "torch==2.13.0"
"$py" -m pip install --quiet "$wheel"
echo "wheel check: installed into $tmp/wheelenv ($((SECONDS - start)) s)"

# Everything below runs from a scratch directory with nothing of the checkout on sys.path.
mkdir "$tmp/work"
cd "$tmp/work"
unset PYTHONPATH
export PYTHONNOUSERSITE=1
"$py" - "$tmp/wheelenv" "$repo" <<'EOF'
import os, sys
import xlsr
env, repo = (os.path.realpath(p) for p in sys.argv[1:])
where = os.path.realpath(xlsr.__file__)
assert where.startswith(env + os.sep), f"xlsr imported from {where}, not from the wheel venv {env}"
inside = [p for p in map(os.path.realpath, (q or "." for q in sys.path)) if p == repo or p.startswith(repo + os.sep)]
assert not inside, f"the checkout is on sys.path: {inside}"
print("wheel check: xlsr from", where)
EOF

# A small synthetic corpus: 5 noisy AM tones of 1.2 to 2 s at 16 kHz.
"$py" - "$tmp/audio" <<'EOF'
import sys
from pathlib import Path
import numpy as np
import soundfile as sf
root = Path(sys.argv[1])
root.mkdir()
rng = np.random.default_rng(0)
for i in range(5):
    t = np.arange(int(rng.uniform(1.2, 2.0) * 16000)) / 16000
    wav = sum(np.sin(2 * np.pi * rng.uniform(90, 250) * k * t) / k for k in range(1, 6))
    wav = wav * (0.5 + 0.5 * np.sin(2 * np.pi * 4 * t)) + 0.05 * rng.standard_normal(len(t))
    sf.write(root / f"utt{i}.wav", (0.3 * wav / np.abs(wav).max()).astype(np.float32), 16000)
EOF
"$py" -m xlsr.manifest "$tmp/audio" --dest "$tmp/audio/manifest" --valid-percent 0
test -s "$tmp/audio/manifest/train.tsv"

"$py" -m xlsr.pretrain model=tiny data.manifest="$tmp/audio/manifest/train.tsv" output_dir="$tmp/run" \
    optim.max_update=2 optim.warmup_updates=1 data.num_workers=0 data.max_tokens=96000 \
    data.max_sample_size=32000 log_interval=1 progress_bar=false tensorboard=false device=cpu

test -f "$tmp/run/model/config.json" || { echo "wheel check: $tmp/run/model/config.json missing" >&2; exit 1; }
"$py" -c "import sys, xlsr; m = xlsr.Wav2Vec2Model.from_pretrained(sys.argv[1]); print('wheel check: loaded', type(m).__name__, sum(p.numel() for p in m.parameters()), 'parameters')" "$tmp/run/model"
echo "wheel check: passed in $((SECONDS - start)) s"
