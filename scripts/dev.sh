#!/usr/bin/env bash
# One entry point for set-up, the main job and the tests, on a fresh Debian
# machine or an old one. Every step checks before it acts, so it can run twice.
#
#   bash scripts/dev.sh run     # set up, then run the main job
#   bash scripts/dev.sh test    # set up, run the static checks (scripts/check.sh), the test suite,
#                               # then the suite under ASan+UBSan (scripts/sanitize.sh)
#   bash scripts/dev.sh bench   # set up, then run the benchmarks (benches/)
#   bash scripts/dev.sh setup   # set up only
#
# Environment: PYTHON (interpreter for the venv, default python3),
# VENV (default .venv), KNHK_SANITIZE / KNHK_DEBUG / KNHK_CFLAGS / KNHK_PORTABLE
# (build switches, see native/build_native.py; a change rebuilds).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
PYTHON=${PYTHON:-python3}
VENV=${VENV:-$ROOT/.venv}
# jemalloc needs static TLS room that a running Python lacks: give every
# process started from here that room (see docs/troubleshooting.md).
TUNABLE=glibc.rtld.optional_static_tls=16384
case ":${GLIBC_TUNABLES:-}:" in
  *optional_static_tls*) ;;
  *) export GLIBC_TUNABLES="${GLIBC_TUNABLES:+$GLIBC_TUNABLES:}$TUNABLE" ;;
esac

say() { printf '==> %s\n' "$*" >&2; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
    say "need root for: $*"; return 1; fi
}

setup_debian() {
  local missing=()
  for pkg in libjemalloc2 libmimalloc2.0 gcc; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
  if ! "$PYTHON" -c 'import ensurepip, venv' >/dev/null 2>&1; then missing+=(python3-venv); fi
  if ! "$PYTHON" -c 'import sysconfig, os, sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' 2>/dev/null; then
    missing+=(python3-dev)
  fi
  if ((${#missing[@]})); then
    say "installing Debian packages: ${missing[*]}"
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
}

setup_venv() {
  if [ ! -x "$VENV/bin/python" ]; then
    say "creating virtual environment $VENV"
    "$PYTHON" -m venv "$VENV"
  fi
  # Reinstall only when the build inputs changed since the last install.
  local stamp="$VENV/.knhk-setup-stamp" digest
  digest=$(cat pyproject.toml setup.py knhk_memory/_version.py native/*.h native/*.c native/cpython/*.h native/cpython/*.c native/build_native.py \
           <(printf '%s|' "${KNHK_SANITIZE:-}" "${KNHK_DEBUG:-}" "${KNHK_CFLAGS:-}" "${KNHK_PORTABLE:-}") | sha256sum | cut -d' ' -f1)
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$digest" ] && "$VENV/bin/python" -c 'import knhk_memory._native, knhk_memory._fast' 2>/dev/null; then
    return
  fi
  say "installing knhk-memory and its test extras into $VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  # Build requirements first, then build against them (no isolated build env,
  # so the extension compiles against the numpy it will run with).
  "$VENV/bin/python" -m pip install -q "setuptools>=77" wheel "cffi>=1.17" "numpy>=2.0"
  # setuptools prints an "Editable installation" information box for every
  # editable install of a package-dir mapping (plugins/ -> knhk_memory.plugins);
  # it is information, not a problem, and is the only box left.
  PYTHONWARNINGS="ignore:Editable installation" \
    "$VENV/bin/python" -m pip install -q --no-build-isolation -e ".[test]"
  echo "$digest" > "$stamp"
}

setup() { setup_debian; setup_venv; }

cmd=${1:-}
shift || true
case "$cmd" in
  setup) setup ;;
  run)
    setup
    exec "$VENV/bin/knhk-memory" demo "$@" ;;
  test)
    setup
    # Fail fast: lint, types, the layer contract and the C format before the tests.
    VENV="$VENV" bash "$ROOT/scripts/check.sh"
    # -p no:cacheprovider: a read-only or fresh checkout needs no .pytest_cache
    # --knhk-budgets: the hot-path budgets are part of the run (see docs/budgets.md).
    "$VENV/bin/python" -m pytest -p no:cacheprovider --knhk-budgets "$@"
    # Then the suite again against a C core built with ASan and UBSan, in a copy
    # of the tree (scripts/sanitize.sh). Only for the whole run: with pytest
    # arguments (one file, -k ...) it is left out; KNHK_SANITIZE_TESTS=0 leaves
    # it out too.
    if [ $# -eq 0 ] && [ "${KNHK_SANITIZE_TESTS:-1}" != 0 ]; then
      exec bash "$ROOT/scripts/sanitize.sh"
    fi ;;
  bench)
    setup
    if ! "$VENV/bin/python" -c 'import matplotlib, pytest_benchmark, lmdb, cdblib, stringzilla, atomics' 2>/dev/null; then
      say "installing the bench extra (pytest-benchmark, matplotlib and the peers: lmdb, pure-cdb, stringzilla, atomics)"
      PYTHONWARNINGS="ignore:Editable installation" \
        "$VENV/bin/python" -m pip install -q --no-build-isolation -e ".[test,bench]"
    fi
    # Every benches/bench_*.py, short rounds (the machine is shared), one
    # results file, then docs/performance.md and its charts from it.
    mkdir -p benches/results
    "$VENV/bin/python" -m pytest benches -p no:cacheprovider --benchmark-only \
      -o python_files='bench_*.py' -o python_functions='test_* bench_*' \
      --benchmark-max-time="${KNHK_BENCH_MAX_TIME:-0.3}" --benchmark-json=benches/results/latest.json "$@"
    exec "$VENV/bin/python" scripts/perf_report.py benches/results/latest.json ;;
  *)
    echo "usage: bash scripts/dev.sh {run|test|bench|setup} [args...]" >&2
    exit 2 ;;
esac
