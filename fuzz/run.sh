#!/usr/bin/env bash
# Runs every fuzz target (or those named) for SECONDS each (default 600),
# one after another, each from its seeds (seeds/<target>) and the corpus a
# previous run left (corpus/<target>). A finding stops the run: libFuzzer
# writes the input to artifacts/<target>/ and prints the panic.
#
#   cargo install cargo-fuzz --locked   # once
#   bash fuzz/run.sh                    # all five, 10 minutes each
#   SECONDS_EACH=60 bash fuzz/run.sh saga_machine
set -euo pipefail
cd "$(dirname "$0")"
seconds=${SECONDS_EACH:-600}
targets=("$@")
[[ ${#targets[@]} -gt 0 ]] || targets=(place_order reserve charge ship saga_machine)
# cargo-fuzz needs nightly flags (-Z sanitizer); a stable toolchain takes them
# with RUSTC_BOOTSTRAP.
export RUSTC_BOOTSTRAP=1
cargo fuzz build -O
for target in "${targets[@]}"; do
    mkdir -p "corpus/$target" "artifacts/$target"
    cp -n "seeds/$target"/* "corpus/$target/"
    echo "== $target: ${seconds}s"
    cargo fuzz run -O "$target" "corpus/$target" -- \
        -max_total_time="$seconds" -print_final_stats=1 2>&1 |
        grep -E '^(#[0-9]+[[:space:]]+DONE|Done|stat::|==[0-9]+==|thread|SUMMARY)' || true
    echo "== $target: $(ls "corpus/$target" | wc -l) inputs in the corpus, $(ls "artifacts/$target" | wc -l) findings"
done
