#!/usr/bin/env bash
# Triton's perf_analyzer, for the serving benchmarks, in a cache outside the repository:
# the binary that the tritonclient 2.50.0 manylinux1 wheel bundles (installed as <venv>/bin/perf_analyzer),
# in a venv of its own with the CUDA runtime it links against (nvidia-cuda-runtime-cu12), plus the
# Debian package libb64-0d for libb64.so.0d. Later wheels need glibc 2.38; Debian 12 has 2.36.
# Writes a wrapper <cache>/bin/perf_analyzer that puts the venv's libcudart on LD_LIBRARY_PATH;
# reuses whatever is already there and prints the wrapper's path on stdout.
set -euo pipefail

TRITONCLIENT_VERSION=${TRITONCLIENT_VERSION:-2.50.0}
CUDART_VERSION=${CUDART_VERSION:-12.9.79}
CACHE=${MOE_CACHE:-$HOME/.cache/moe-operator}
VENV=$CACHE/perf-analyzer/venv
WRAPPER=$CACHE/bin/perf_analyzer
STAMP=$VENV/.installed-tritonclient-$TRITONCLIENT_VERSION-cudart-$CUDART_VERSION
log() { echo "perf-analyzer: $*" >&2; }
die() { log "error: $*"; exit 1; }

# libb64.so.0d: a Debian package, installed the way hack/system-deps.sh installs its packages.
if ! PATH=$PATH:/sbin:/usr/sbin ldconfig -p 2>/dev/null | grep -q 'libb64\.so\.0d '; then
  command -v apt-get >/dev/null || die "libb64.so.0d is missing and there is no apt-get: install libb64 (Debian: libb64-0d)"
  SUDO=""; [[ $(id -u) -eq 0 ]] || SUDO=sudo
  log "installing libb64-0d"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends libb64-0d >/dev/null \
    || die "apt-get install libb64-0d failed"
fi

# The venv: only the base wheel is needed, the binary is wheel data (tritonclient-*.data/data/bin).
if [[ ! -e $STAMP ]]; then
  log "installing tritonclient==$TRITONCLIENT_VERSION and nvidia-cuda-runtime-cu12==$CUDART_VERSION into $VENV"
  [[ -x $VENV/bin/python ]] || python3 -m venv "$VENV" \
    || die "python3 -m venv $VENV failed (Debian: apt-get install python3-venv)"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check \
    "tritonclient==$TRITONCLIENT_VERSION" "nvidia-cuda-runtime-cu12==$CUDART_VERSION" >&2 \
    || die "pip install into $VENV failed"
  [[ -x $VENV/bin/perf_analyzer ]] \
    || die "the tritonclient $TRITONCLIENT_VERSION wheel for this platform has no bin/perf_analyzer (it ships only in the manylinux x86_64 wheel)"
  rm -f "$VENV"/.installed-*; touch "$STAMP"
fi

CUDART_LIB=$("$VENV/bin/python" -c 'import nvidia.cuda_runtime as m; print(list(m.__path__)[0] + "/lib")')
[[ -e $CUDART_LIB/libcudart.so.12 ]] || die "no libcudart.so.12 in $CUDART_LIB"

# The wrapper, rewritten only when its text changes (another cache or version).
text="#!/bin/sh
# Written by hack/perf-analyzer.sh: tritonclient $TRITONCLIENT_VERSION's perf_analyzer with its venv's CUDA runtime.
export LD_LIBRARY_PATH=\"$CUDART_LIB\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}\"
exec \"$VENV/bin/perf_analyzer\" \"\$@\"
"
if [[ ! -x $WRAPPER || $(cat "$WRAPPER") != "${text%$'\n'}" ]]; then
  mkdir -p "$(dirname "$WRAPPER")"
  printf '%s' "$text" > "$WRAPPER.tmp"; chmod +x "$WRAPPER.tmp"; mv "$WRAPPER.tmp" "$WRAPPER"
  # Checked once, when written: a missing library or a too old glibc shows up here.
  if ! out=$("$WRAPPER" --version 2>&1); then
    rm -f "$WRAPPER"
    die "$WRAPPER --version failed (perf_analyzer $TRITONCLIENT_VERSION needs glibc >= 2.34):
$out"
  fi
fi

echo "$WRAPPER"
