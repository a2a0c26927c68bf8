#!/usr/bin/env bash
# Installs, builds and runs every test. When nvcc is present the CUDA build
# (build-cuda/) is compiled first, so that a broken kernel build fails here,
# and its GPU tests run (they report "skipped: no GPU" on a machine without
# one); then the fuzz targets run for a bounded time (build-fuzz/, clang);
# then the CPU build runs the whole suite, last.
source "$(dirname "$0")/common.sh"
# ctest runs tests side by side: OpenMP workers that spin while waiting would
# steal the cores the other test needs.
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
if command -v nvcc >/dev/null 2>&1; then
  loom_build build-cuda -DLOOM_CUDA=ON
  (cd build-cuda && ctest --output-on-failure -R '^Gpu' --timeout 1200)
fi
# Fuzz stage: the readers of files Loom did not write (.idx/.bin,
# safetensors, checkpoint manifests) under libFuzzer with AddressSanitizer
# and UndefinedBehaviorSanitizer, a bounded run each (fuzz/CMakeLists.txt).
# Only the fuzz targets are built with clang, not the whole of Loom.
"$LOOM_ROOT/launch/install_deps.sh"
if [ ! -f build-fuzz/build.ninja ]; then
  mkdir -p build-fuzz  # its configure log stays inside it (ignored by git)
  CC=clang CXX=clang++ cmake -S "$LOOM_ROOT" -B build-fuzz -G Ninja -DCMAKE_BUILD_TYPE=Release -DLOOM_FUZZ=ON \
    >build-fuzz/configure.log 2>&1 || { cat build-fuzz/configure.log; echo "[loom] fuzz configure failed (log above)"; exit 1; }
fi
echo "[loom] building build-fuzz (fuzz targets only)"
cmake --build build-fuzz -j "$(loom_jobs)" --target loom_fuzz
(cd build-fuzz && ctest --output-on-failure -R '^Fuzz' -j "$(loom_jobs)" --timeout 300)
loom_build build -DLOOM_CUDA=OFF
(cd build && ctest --output-on-failure -j "$(loom_jobs)" --timeout 1200)
