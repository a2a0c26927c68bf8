#!/usr/bin/env bash
# Installs, builds and runs every test. When nvcc is present the CUDA build
# (build-cuda/) is compiled first, so that a broken kernel build fails here,
# and its GPU tests run (they report "skipped: no GPU" on a machine without
# one); then the CPU build runs the whole suite.
source "$(dirname "$0")/common.sh"
# ctest runs tests side by side: OpenMP workers that spin while waiting would
# steal the cores the other test needs.
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
if command -v nvcc >/dev/null 2>&1; then
  loom_build build-cuda -DLOOM_CUDA=ON
  (cd build-cuda && ctest --output-on-failure -R '^Gpu' --timeout 1200)
fi
loom_build build -DLOOM_CUDA=OFF
(cd build && ctest --output-on-failure -j "$(loom_jobs)" --timeout 1200)
