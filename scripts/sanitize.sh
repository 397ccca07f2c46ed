#!/usr/bin/env bash
# The test suite against a C core built with AddressSanitizer and UBSan, in a
# copy of the working tree with its own virtual environment, so the normal
# build in .venv and knhk_memory/ is never touched.
#
#   bash scripts/sanitize.sh            # the suite (less what cannot run under ASan, below)
#   bash scripts/sanitize.sh tests/test_store.py -k close    # pytest arguments pass through
#
# Environment: KNHK_ASAN_DIR (default build/sanitize: the copy and its venv),
# KNHK_SANITIZE (default address,undefined). A sanitizer report aborts the
# test process (-fno-sanitize-recover=all), so any report fails the run.
#
# Left out: tests/test_distributed.py and tests/test_spiff*.py (Dask's and
# SpiffWorkflow's own processes and threads, no C of ours beyond the rest), the
# launcher's module (it skips itself: ASan's malloc serves the process), and the
# tick budgets (timing under ASan means nothing).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DEST=${KNHK_ASAN_DIR:-$ROOT/build/sanitize}
export KNHK_SANITIZE=${KNHK_SANITIZE:-address,undefined}
say() { printf '==> %s\n' "$*" >&2; }

# A fresh copy of what git would commit (tracked and new, not ignored files):
# no stale module or test from an earlier copy is left to run.
say "copying the tree to $DEST/src"
rm -rf "$DEST/src"
mkdir -p "$DEST/src"
(cd "$ROOT" && git ls-files -z --cached --others --exclude-standard | tar --null -T - -cf -) \
  | tar -xf - -C "$DEST/src"

# Set-up as the README's commands do it, with the sanitizer build switch (a
# build input of scripts/dev.sh: the venv rebuilds the extension for it).
VENV="$DEST/venv" bash "$DEST/src/scripts/dev.sh" setup

runtime=""
for lib in asan ubsan; do
  path=$(gcc -print-file-name="lib$lib.so")
  if [ "$lib" = asan ] && [[ ",$KNHK_SANITIZE," != *,address,* ]]; then continue; fi
  if [ "$lib" = ubsan ] && [[ ",$KNHK_SANITIZE," != *,undefined,* ]]; then continue; fi
  [ -e "$path" ] || { say "the $lib runtime is not installed ($path): apt-get install gcc"; exit 1; }
  runtime="${runtime:+$runtime:}$path"
done

cd "$DEST/src"
args=("$@")
if [ ${#args[@]} -eq 0 ]; then
  args=(tests --ignore=tests/test_distributed.py --ignore-glob='tests/test_spiff*.py')
fi
say "pytest under $KNHK_SANITIZE: ${args[*]}"
# detect_leaks=0: CPython keeps memory until exit. allocator_may_return_null=1:
# the absurd-size tests see the NULL a real malloc returns instead of an abort.
LD_PRELOAD="$runtime" \
ASAN_OPTIONS=detect_leaks=0:allocator_may_return_null=1:abort_on_error=1 \
UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
GLIBC_TUNABLES=glibc.rtld.optional_static_tls=16384 \
  "$DEST/venv/bin/python" -m pytest -p no:cacheprovider -q "${args[@]}"
