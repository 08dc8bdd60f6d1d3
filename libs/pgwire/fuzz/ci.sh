#!/usr/bin/env bash
# Fuzzes the pgwire codec for a fixed time and fails on any crash: installs cargo-fuzz if it
# is missing (kept in ~/.cargo/bin between runs), builds the targets with AddressSanitizer on
# the stable toolchain (RUSTC_BOOTSTRAP=1 unlocks the -Z flags cargo-fuzz passes), then runs
# every target in parallel for FUZZ_SECONDS (default 60) from the committed seeds.
# .ci/run calls this; a developer can too: `bash libs/pgwire/fuzz/ci.sh`.
set -euo pipefail
cd "$(dirname "$0")"

seconds="${FUZZ_SECONDS:-60}"
cargo_fuzz_version=0.13.2
targets=(frames startup)
# Its own target dir: the fuzz build uses other flags and must not evict the main build's.
export CARGO_TARGET_DIR="${FUZZ_TARGET_DIR:-/var/tmp/agentgate-fuzz-target}"
export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version 2>/dev/null | grep -qx "cargo-fuzz $cargo_fuzz_version"; then
    echo "installing cargo-fuzz $cargo_fuzz_version"
    cargo install cargo-fuzz --version "$cargo_fuzz_version" --locked --quiet
fi

start=$SECONDS
cargo fuzz build
echo "fuzz build: $((SECONDS - start)) s"

# Hangs fail fast (-timeout); so does any single allocation over 64 MiB (-malloc_limit_mb):
# the codec's limits here are 64 KiB per frame and 10,000 bytes per startup packet.
logs="$(mktemp -d)"
pids=()
for t in "${targets[@]}"; do
    mkdir -p "corpus/$t"
    cargo fuzz run "$t" "corpus/$t" "seeds/$t" -- \
        -max_total_time="$seconds" -timeout=10 -malloc_limit_mb=64 -print_final_stats=1 \
        >"$logs/$t.log" 2>&1 &
    pids+=($!)
done

failed=0
for i in "${!targets[@]}"; do
    t="${targets[$i]}"
    if wait "${pids[$i]}"; then
        done_line=$(grep -E '^#[0-9]+[[:space:]]+DONE' "$logs/$t.log" | tail -n 1 || true)
        echo "fuzz $t: no crash in ${seconds} s: ${done_line:-(no final stats line)}"
    else
        failed=1
        echo "fuzz $t: FAILED; the end of its log:"
        tail -n 80 "$logs/$t.log"
        for a in artifacts/"$t"/*; do
            [ -f "$a" ] || continue
            echo "reproducer $PWD/$a ($(wc -c <"$a") bytes), hex:"
            od -An -tx1 -v "$a" | head -n 64
            echo "replay: cd libs/pgwire/fuzz && RUSTC_BOOTSTRAP=1 cargo fuzz run $t $a"
        done
    fi
done
rm -rf "$logs"
exit "$failed"
