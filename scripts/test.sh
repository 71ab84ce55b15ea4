#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs what the tests need, then runs them.
#   scripts/test.sh            everything
#   scripts/test.sh -p ferry-stun   extra args go to `cargo test`
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/test-deps.sh
export PATH="$PWD/.tools/bin:$PATH"
bash scripts/lint-deploy.sh   # Dockerfile + Helm chart: hadolint, helm lint/template, kubernetes-validate, checkov
cargo test --workspace --locked "$@"
