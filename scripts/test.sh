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
cargo test --workspace --locked "$@"
# Every fuzz target for a few seconds on its recorded seeds and regression inputs (the long
# run is scripts/fuzz.sh; docs/reliability.md). SKIP_FUZZ=1 skips this part.
if [[ ${SKIP_FUZZ:-0} != 1 && $# -eq 0 ]]; then
    FUZZ_CI_SECONDS="${FUZZ_CI_SECONDS:-8}" bash scripts/fuzz.sh --ci
fi
