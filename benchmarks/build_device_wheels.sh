#!/usr/bin/env bash
# Wheels for the offline GPU machine (BUILD.md, "Memory on one GPU" and the device check).
#
# Its image has jax 0.11 (CUDA), flax, optax, orbax, torch, transformers under Python 3.12 but no
# ott-jax, no ml_collections and no package registry. This builds, into device_wheels/ (ignored by
# git; carried to the machine with the device tool's `carry`), this project's wheel and those of
# the pure-Python packages it needs that the image may lack, plus matplotlib's (the reports'
# heatmaps) for CPython 3.12 on x86-64 Linux:
#
#     bash benchmarks/build_device_wheels.sh            # here, with the registry: device_wheels/ (~16 MB)
#     bash benchmarks/build_device_wheels.sh --install /tmp/site   # there: the wheels of what is missing
#
# --install puts into the folder only the wheels whose distributions the machine's python3 does not
# have (the image's own jax, numpy, absl-py... stay as they are), with --no-deps --no-index; then
# PYTHONPATH=/tmp/site makes them importable (BUILD.md has the whole command line).
set -euo pipefail
cd "$(dirname "$0")/.."
out=device_wheels

if [[ "${1:-}" == "--install" ]]; then
  target="${2:?--install needs a target folder, e.g. /tmp/site}"
  python="${PYTHON:-python3}"
  missing=()
  for wheel in "$out"/*.whl; do
    name="$(basename "$wheel" | cut -d- -f1)"
    if ! "$python" -c "import importlib.metadata, sys; importlib.metadata.version(sys.argv[1])" "$name" 2>/dev/null; then
      missing+=("$wheel")
    fi
  done
  # This project's wheel always: its metadata carries the `nexvitad` command and its entry points.
  missing+=("$out"/nexvitad_jax-*.whl)
  printf 'installing %s\n' "${missing[@]##*/}" | sort -u
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$target" \
    $(printf '%s\n' "${missing[@]}" | sort -u)
  exit 0
fi

# Versions: those this project is tested with (the CPU virtual environment's), pure Python except
# matplotlib's own compiled parts.
pure=(ott-jax==0.6.0 jaxopt==0.8.5 lineax==0.1.1 equinox==0.13.8 jaxtyping==0.3.11 wadler-lindig==0.1.8
      ml_collections==1.1.0 absl-py==2.5.1 tqdm==4.70.1 typing-extensions==4.16.0 cycler==0.12.1
      pyparsing==3.3.3 python-dateutil==4.0.0 six==1.17.0 packaging==26.4)
compiled=(matplotlib==3.11.2 contourpy==1.3.3 kiwisolver==1.5.1 fonttools==4.68.0)
platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$tag")
done

rm -rf "$out"
mkdir -p "$out"
python -m pip wheel -q --no-deps --no-build-isolation -w "$out" .
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation py \
  --platform any -d "$out" "${pure[@]}"
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d "$out" "${compiled[@]}"
ls -1 "$out"
du -sh "$out"
