#!/usr/bin/env bash
# What the GPU suite's device calls carry (docs/benchmarks.md, "GPU suite (how to run)"), made here:
#
#   .whl/       nibabel (the suite needs it) + the nnU-Net v2 stack minus SimpleITK   (~13 MB)
#   .whl_sitk/  SimpleITK alone (a 53 MB wheel)                                        (~53 MB)
#   .gpudata/Task04_Hippocampus/   a copy of ../shared/data/Task04_Hippocampus         (~16 MB)
#
# Wheels for the device's Python 3.12, manylinux x86_64, no dependencies resolved (each one named;
# everything else nnunetv2 imports is in the device image: torch, numpy, scipy, scikit-image,
# scikit-learn, pandas, matplotlib, seaborn, tqdm, einops, timm, tifffile, requests, msgpack, httpx,
# threadpoolctl, pyyaml, psutil). One version of each. All three folders are git-ignored. A call
# carries 64 MiB at most, the working tree included, so SimpleITK travels in a call of its own:
#   call 1 carries [".whl", ".gpudata"]   (the suite, or --install-only)
#   call 2 carries [".whl_sitk"]          (--peer: .whl's packages and .gpudata are still there while warm)
#
#   benchmarks/gpu_wheels.sh            # wheels + data, then the sizes against the limit
#   PYVER=3.11 WHL_MAIN=/tmp/w311 WHL_SITK=/tmp/w311s NO_DATA=1 benchmarks/gpu_wheels.sh   # for a local check
set -euo pipefail
cd "$(dirname "$0")/.."

PYVER=${PYVER:-3.12}
WHL_MAIN=${WHL_MAIN:-.whl}
WHL_SITK=${WHL_SITK:-.whl_sitk}
DATA_SRC=${DATA_SRC:-../shared/data/Task04_Hippocampus}
DATA_DST=${DATA_DST:-.gpudata/Task04_Hippocampus}
PY=${PYTHON:-python3}

# the suite itself
MAIN=(nibabel==5.4.2)
# nnunetv2 2.8.1 (the version of docs/benchmarks.md's CPU comparisons) and what it imports that the
# device image lacks: acvl_utils (sdist only: built here, pure Python), blosc2 with ndindex and numexpr,
# connected-components-3d (cc3d, for acvl_utils), batchgenerators' `future`, yacs, graphviz
PEER=(nnunetv2==2.8.1 dynamic-network-architectures==0.4.4 batchgenerators==0.25.5 batchgeneratorsv2==0.3.6
      blosc2==4.14.1 ndindex==1.10.1 numexpr==2.14.2 connected-components-3d==4.1.1 future==1.0.0
      yacs==0.1.8 graphviz==0.21)
SDIST=(acvl-utils==0.2.6)
SITK=(simpleitk==2.5.7)

PLAT=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
download() {  # download DIR SPEC...
  local dir=$1; shift
  "$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    "${PLAT[@]}" -d "$dir" "$@"
}

mkdir -p "$WHL_MAIN" "$WHL_SITK"
download "$WHL_MAIN" "${MAIN[@]}" "${PEER[@]}"
"$PY" -m pip wheel -q --no-deps --no-binary=:all: -w "$WHL_MAIN" "${SDIST[@]}"
download "$WHL_SITK" "${SITK[@]}"

if [[ -z "${NO_DATA:-}" ]]; then
  if [[ -f "$DATA_SRC/dataset.json" ]]; then
    mkdir -p "$(dirname "$DATA_DST")"
    rm -rf "$DATA_DST"
    cp -r "$DATA_SRC" "$DATA_DST"
    find "$DATA_DST" -name '._*' -delete  # macOS resource forks, if any
  else
    echo "warning: no dataset at $DATA_SRC; set DATA_SRC to a Task04_Hippocampus folder" >&2
  fi
fi

# sizes against the 64 MiB (67108864 bytes) one call carries, the working tree included
tree=$(git ls-files -z --cached --others --exclude-standard | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1)
size() { du -sb "$1" 2>/dev/null | cut -f1 || echo 0; }
main=$(size "$WHL_MAIN"); sitk=$(size "$WHL_SITK"); data=$(size "$DATA_DST")
ls -l "$WHL_MAIN" "$WHL_SITK"
printf 'working tree %9d bytes\n' "$tree"
printf '%-12s %9d bytes\n' "$WHL_MAIN" "$main" "$WHL_SITK" "$sitk" "$DATA_DST" "$data"
limit=67108864
call1=$((tree + main + data)); call2=$((tree + sitk))
printf 'call 1 (tree + %s + %s): %d of %d bytes\n' "$WHL_MAIN" "$DATA_DST" "$call1" "$limit"
printf 'call 2 (tree + %s):       %d of %d bytes\n' "$WHL_SITK" "$call2" "$limit"
if (( call1 > limit || call2 > limit )); then
  echo "error: a call would carry more than 64 MiB" >&2
  exit 1
fi
