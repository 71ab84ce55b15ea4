#!/usr/bin/env bash
# RUSTC_WRAPPER for scripts/fuzz.sh: builds curve25519-dalek (the X25519 under snow's Noise
# handshakes and crypto_box) without libFuzzer's comparison tracing. That code is constant-time:
# it branches on neither secrets nor input, so its traced comparisons give the fuzzer nothing to
# steer by, yet they took 55 % of the e2e target's time (perf, 2026-12-05: 666 -> 1,166
# executions/s without ASan). Edge coverage and every other flag stay as cargo-fuzz sets them.
rustc=$1
shift
case " $* " in
*" --crate-name curve25519_dalek "*)
    args=()
    for a in "$@"; do
        [[ $a == -Cllvm-args=-sanitizer-coverage-trace-compares ]] || args+=("$a")
    done
    exec "$rustc" "${args[@]}"
    ;;
esac
exec "$rustc" "$@"
