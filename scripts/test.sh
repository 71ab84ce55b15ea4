#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs what the tests need, then runs them.
#   scripts/test.sh            everything
#   scripts/test.sh -p ferry-stun   extra args go to `cargo test` (and skip the fuzz smoke run)
#   SKIP_FUZZ=1 scripts/test.sh     everything but the fuzz smoke run
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/test-deps.sh
export PATH="$PWD/.tools/bin:$PATH"
bash scripts/lint-deploy.sh   # Dockerfile + Helm chart: hadolint, helm lint/template, kubernetes-validate, checkov
# Every fuzz target for a few seconds on its recorded seeds and regression inputs (the long
# run is scripts/fuzz.sh; docs/reliability.md). SKIP_FUZZ=1 skips this part.
fuzz=0
[[ ${SKIP_FUZZ:-0} != 1 && $# -eq 0 ]] && fuzz=1
cargo test --workspace --locked --no-run "$@"
fuzz_pid=
if ((fuzz)); then
    # The fuzz targets build (sanitizer, their own target dir: several minutes) while the tests
    # run: the suite mostly waits on sockets, processes and timers and leaves CPU idle. At nice
    # 19 the build takes only what the tests leave.
    mkdir -p fuzz/artifacts
    fuzz_log=fuzz/artifacts/build-ci.log
    FUZZ_BUILD_ONLY=1 setsid nice -n 19 bash scripts/fuzz.sh --ci </dev/null >"$fuzz_log" 2>&1 &
    fuzz_pid=$!
    # If the tests fail, the build (its own process group) stops with them.
    trap '[[ -n $fuzz_pid ]] && kill -- "-$fuzz_pid" 2>/dev/null; true' EXIT
fi
cargo test --workspace --locked "$@"
if ((fuzz)); then
    if ! wait "$fuzz_pid"; then
        fuzz_pid=
        tail -n 40 "$fuzz_log" >&2
        echo "test.sh: building the fuzz targets failed (whole log: $fuzz_log)" >&2
        exit 1
    fi
    fuzz_pid=
    FUZZ_CI_SECONDS="${FUZZ_CI_SECONDS:-8}" bash scripts/fuzz.sh --ci
fi
