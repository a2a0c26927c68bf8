#!/usr/bin/env bash
# Builds (like run.sh), prepares the tiny real-text corpus on the first run
# (Debian's license texts, through loom-prepare), then trains
# configs/tiny_text.textproto. Extra arguments go to loom-train.
source "$(dirname "$0")/common.sh"
loom_build build -DLOOM_CUDA=OFF
prefix=runs/corpora/tiny_text/licenses
if [ ! -f "$prefix.idx" ]; then
  mkdir -p "$(dirname "$prefix")"
  lic=/usr/share/common-licenses
  build/bin/loom-prepare --input "$lic/GPL-3,$lic/Apache-2.0,$lic/GFDL-1.3" --output-prefix "$prefix"
fi
exec build/bin/loom-train --config configs/tiny_text.textproto "$@"
