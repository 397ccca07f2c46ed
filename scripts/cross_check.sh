#!/usr/bin/env bash
# Compile the C core for another architecture: every native/*.c, the CPython
# module's native/cpython/*.c and the cffi module's generated source, in the normal build and with KNHK_PORTABLE=1,
# with native/build_native.py's flags plus -Werror. A compile check only
# (nothing is linked or run); Python's and numpy's headers are the host's.
# Not part of CI. Needs the Debian cross compiler, e.g.
# `apt-get install gcc-aarch64-linux-gnu`.
#
#   bash scripts/cross_check.sh                      # aarch64-linux-gnu
#   bash scripts/cross_check.sh riscv64-linux-gnu    # any gcc-<triplet>
#
# Environment: VENV (default .venv: its Python has cffi and numpy).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
TRIPLET=${1:-aarch64-linux-gnu}
CROSS_CC=$TRIPLET-gcc
PY=${VENV:-$ROOT/.venv}/bin/python
if ! command -v "$CROSS_CC" >/dev/null; then
  echo "cross_check: no $CROSS_CC; install it with: apt-get install gcc-$TRIPLET" >&2
  exit 2
fi

failed=0
for portable in 0 1; do
  out=build/cross/$TRIPLET/portable-$portable
  mkdir -p "$out"
  # build_native.py's flags as it computes them for this compiler (its probe
  # drops the x86-only assembler flag), one a line; and the module source.
  flags=$(CC=$CROSS_CC KNHK_PORTABLE=$portable KNHK_SANITIZE= "$PY" - "$out" <<'EOF'
import contextlib
import io
import sys
import sysconfig

sys.path.insert(0, "native")
import build_native as b

with contextlib.redirect_stdout(io.StringIO()):  # cffi says "generating ..."; stdout is for the flags
    b.ffibuilder.emit_c_code(f"{sys.argv[1]}/_native.c")
flags = b.compile_args() + ["-fPIC", "-Werror", "-I" + sysconfig.get_paths()["include"]]
import numpy

flags += ["-I" + d for d in [*b.INCLUDE_DIRS, numpy.get_include()]]
flags += [f"-D{name}" if value is None else f"-D{name}={value}" for name, value in b.FAST_DEFINE_MACROS]
print("\n".join(flags))
EOF
  )
  mapfile -t flags <<< "$flags"
  n=0
  for src in native/*.c native/cpython/*.c "$out/_native.c"; do
    n=$((n + 1))
    if ! "$CROSS_CC" "${flags[@]}" -c "$src" -o "$out/$(basename "$src" .c).o"; then
      echo "cross_check: $TRIPLET, KNHK_PORTABLE=$portable: $src does not compile" >&2
      failed=1
    fi
  done
  echo "cross_check: $TRIPLET, KNHK_PORTABLE=$portable: compiled $n files into $out"
done
exit $failed
