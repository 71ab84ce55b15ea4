#!/usr/bin/env bash
# Fuzz ferry's parsers of untrusted bytes with cargo-fuzz (libFuzzer). Targets: fuzz/fuzz_targets/.
#
#   scripts/fuzz.sh                      every target, 10,000,000 runs each (the long run;
#                                        docs/reliability.md records its figures)
#   scripts/fuzz.sh --ci                 every target for 8 s (FUZZ_CI_SECONDS; scripts/test.sh)
#   scripts/fuzz.sh stun_handler 2e6     one target, N runs
#   FUZZ_SANITIZER=none scripts/fuzz.sh  without AddressSanitizer (about 2x faster; no leak check)
#   FUZZ_SANITIZER=leak scripts/fuzz.sh  LeakSanitizer alone: the leak check without ASan's shadow
#                                        memory (no out-of-bounds or use-after-free checks)
#   FUZZ_FORK=2 scripts/fuzz.sh e2e 1e7  libFuzzer's fork mode: 2 processes share the corpus and
#                                        the run count (one per core for the long runs)
#
# cargo-fuzz needs libFuzzer's nightly-only rustc flags: RUSTC_BOOTSTRAP=1 lets the stable
# toolchain accept them (tried here with rustc 1.95; the ASan runtime ships with it).
# Corpora live in fuzz/corpus/<target> (not committed), seeded from fuzz/seeds/<target>
# (committed: real loopback traffic recorded by scripts/fuzz-seeds.py) and
# fuzz/regressions/<target> (committed: every crash found, kept as a regression input).
# A crash leaves its input in fuzz/artifacts/<target>/ and fails the run.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../fuzz"
export RUSTC_BOOTSTRAP=1
# Constant-time curve arithmetic without comparison tracing (the reason is in the wrapper).
export RUSTC_WRAPPER="$PWD/../scripts/fuzz-rustc.sh"
CARGO_FUZZ_VERSION=0.13.2
SAN="${FUZZ_SANITIZER:-address}"

if ! cargo fuzz --version 2>/dev/null | grep -q " $CARGO_FUZZ_VERSION\$"; then
    echo "[fuzz] installing cargo-fuzz $CARGO_FUZZ_VERSION" >&2
    cargo install cargo-fuzz --version "$CARGO_FUZZ_VERSION" --locked >&2
fi

targets=$(sed -n 's/^name = "\(.*\)"$/\1/p' Cargo.toml | grep -v '^ferry-fuzz$')
ci=0
runs=10000000
if [[ ${1:-} == --ci ]]; then
    ci=1
    shift
    # The smoke run's build: opt-level 1 and line tables instead of the release profile's
    # opt-level 3 and debug = 1. It replays the seeds and regressions and fuzzes for a few
    # seconds, so build time matters more than executions/s (docs/reliability.md has the
    # figures). Either can still be set from outside. Switching between this and a long run
    # rebuilds fuzz/target.
    export CARGO_PROFILE_RELEASE_OPT_LEVEL=${CARGO_PROFILE_RELEASE_OPT_LEVEL:-1}
    export CARGO_PROFILE_RELEASE_DEBUG=${CARGO_PROFILE_RELEASE_DEBUG:-line-tables-only}
elif [[ $# -gt 0 ]]; then
    targets=$1
    runs=$(python3 -c "print(int(float('${2:-1e7}')))")
fi

cargo fuzz build --sanitizer "$SAN" >&2
# FUZZ_BUILD_ONLY=1: install and build, run nothing (scripts/test.sh builds the smoke run's
# targets this way while the test suite runs).
[[ ${FUZZ_BUILD_ONLY:-0} == 1 ]] && exit 0
status=0
for t in $targets; do
    mkdir -p "corpus/$t"
    seeds=()
    for d in "seeds/$t" "regressions/$t"; do [[ -d $d ]] && seeds+=("$d"); done
    if ((ci)); then
        # A short run that still finds regressions on the seeds and a little beyond them:
        # a fixed time rather than a run count, because per-input cost varies 200x between
        # targets (the E2E target does two Noise handshakes per input).
        args=(-max_total_time="${FUZZ_CI_SECONDS:-8}")
    else
        args=(-runs="$runs")
        [[ -n ${FUZZ_FORK:-} ]] && args+=(-fork="$FUZZ_FORK")
    fi
    log="artifacts/$t.log"
    mkdir -p artifacts
    echo "[fuzz] $t: ${args[*]}" >&2
    start=$(date +%s)
    if ! cargo fuzz run --sanitizer "$SAN" "$t" "corpus/$t" "${seeds[@]}" -- \
        -print_final_stats=1 -timeout=10 -rss_limit_mb=2048 "${args[@]}" >"$log" 2>&1; then
        echo "[fuzz] $t FAILED; input in fuzz/artifacts/$t/, log in fuzz/$log:" >&2
        grep -E "panicked|ERROR|SUMMARY" "$log" | head -5 >&2
        status=1
        continue
    fi
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | awk '{s+=$1} END {print s+0}')
    if [[ -n ${FUZZ_FORK:-} ]]; then
        # Fork mode: the parent's status lines ("#N: cov: ...") count every child's executions.
        execs=$(grep -oE '^#[0-9]+: cov' "$log" | tail -1 | tr -dc '0-9')
    fi
    cov=$(grep -oE 'cov: [0-9]+ ft: [0-9]+' "$log" | tail -1)
    secs=$(( $(date +%s) - start ))
    printf '[fuzz] %-22s ok  %12s execs  %6ss  %s  (sanitizer %s)\n' "$t" "$execs" "$secs" "$cov" "$SAN" >&2
done
exit $status
