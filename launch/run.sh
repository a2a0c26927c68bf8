#!/usr/bin/env bash
# Installs, builds (Release, into build/) and trains configs/default.textproto.
# Extra arguments go to loom-train, e.g. ./launch/run.sh --set train.steps=50
source "$(dirname "$0")/common.sh"
cuda=OFF
loom_has_gpu && command -v nvcc >/dev/null 2>&1 && cuda=ON
loom_build build -DLOOM_CUDA=$cuda
exec build/bin/loom-train --config configs/default.textproto "$@"
