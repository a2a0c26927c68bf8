#!/usr/bin/env bash
# Installs the Debian packages Loom builds against, only those missing.
# Idempotent: a second run checks dpkg and returns at once.
set -euo pipefail
pkgs=(cmake ninja-build g++ pkg-config
      libprotobuf-dev protobuf-compiler libabsl-dev
      libgtest-dev libgmock-dev
      libopenmpi-dev openmpi-bin
      libopenblas-openmp-dev libxxhash-dev nlohmann-json3-dev
      # loom-prepare --tokenizer sentencepiece:MODEL; spm_train for its tests
      libsentencepiece-dev sentencepiece
      # The fuzz stage of test.sh: clang, libFuzzer and the sanitizers
      # (libclang-rt-dev; libclang-rt-14-dev on bookworm) and clang's OpenMP.
      clang libclang-rt-dev libomp-dev)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "[install] apt-get install ${missing[*]}"
  sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
