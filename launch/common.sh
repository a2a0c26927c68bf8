# Sourced by run.sh and test.sh: installs what is missing, then configures and
# builds one build folder. Idempotent: a second run only rebuilds what changed.
set -euo pipefail
LOOM_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$LOOM_ROOT"

loom_jobs() { nproc 2>/dev/null || echo 2; }

# loom_build DIR [cmake args...]: configure (once) and build DIR.
loom_build() {
  local dir=$1; shift
  "$LOOM_ROOT/launch/install_deps.sh"
  if [ ! -f "$dir/build.ninja" ]; then
    cmake -S "$LOOM_ROOT" -B "$dir" -G Ninja -DCMAKE_BUILD_TYPE=Release "$@" >"$dir.configure.log" 2>&1 \
      || { cat "$dir.configure.log"; echo "[loom] cmake configure failed (log above)"; exit 1; }
  fi
  echo "[loom] building $dir"
  cmake --build "$dir" -j "$(loom_jobs)"
}

loom_has_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }
