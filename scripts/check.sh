#!/usr/bin/env bash
# The static checks, run by `bash scripts/dev.sh test` before the tests (so CI
# runs them), or on their own from any directory:
#
#   bash scripts/check.sh
#   KNHK_SKIP_CLANG_FORMAT=1 bash scripts/check.sh   # all but the C formatter
#
#   ruff           lint rules in pyproject.toml [tool.ruff] (ruff format is not used)
#   mypy           knhk_memory and plugins, zero errors ([tool.mypy])
#   lint-imports   the layer contract ([tool.importlinter]; the picture: python3 scripts/layers.py)
#   clang-format   native/ against native/.clang-format; to fix: clang-format -i <the same files>
#
# Every check runs; the script exits 1 if any failed and names them. The tools
# come from the virtual environment (VENV, default .venv), where the test extra
# installs them. Nothing is written to the checkout: the caches are off or in
# the virtual environment.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
VENV=${VENV:-$ROOT/.venv}
BIN=$VENV/bin

say() { printf '==> %s\n' "$*" >&2; }

failed=()
check() {
  local name=$1
  shift
  [ "$(type -t "$1")" = function ] || say "$name: $*"
  if ! "$@"; then failed+=("$name"); fi
}

for tool in ruff mypy lint-imports clang-format; do
  if [ ! -x "$BIN/$tool" ]; then
    say "$tool is not installed in $VENV: run bash scripts/dev.sh setup (the test extra installs it)"
    exit 1
  fi
done

C_FILES=(native/*.c native/*.h native/cpython/*.c native/cpython/*.h)

# clang-format prints every differing line with context (hundreds on an
# unformatted tree): show the first ones, then which files and the fix.
clang_format_check() {
  local out files
  say "clang-format: $BIN/clang-format --dry-run --Werror ${C_FILES[*]}"
  if out=$("$BIN/clang-format" --dry-run --Werror "${C_FILES[@]}" 2>&1); then return 0; fi
  printf '%s\n' "$out" | head -n 40
  files=$(printf '%s\n' "$out" | grep -oE '^[^: ]+\.[ch]:[0-9]+' | cut -d: -f1 | sort -u | tr '\n' ' ')
  say "clang-format: $(printf '%s\n' "$out" | grep -c 'error:') differences in: $files"
  say "to apply the style: $BIN/clang-format -i ${C_FILES[*]}"
  return 1
}

check ruff "$BIN/ruff" check --no-cache --quiet knhk_memory plugins tests benches scripts
check mypy "$BIN/mypy" --cache-dir "$VENV/.mypy_cache" knhk_memory plugins
check lint-imports "$BIN/lint-imports" --no-cache
if [ -n "${KNHK_SKIP_CLANG_FORMAT:-}" ]; then
  say "clang-format: skipped (KNHK_SKIP_CLANG_FORMAT is set)"
else
  check clang-format clang_format_check
fi

if ((${#failed[@]})); then
  say "failed: ${failed[*]}"
  exit 1
fi
say "static checks passed"
