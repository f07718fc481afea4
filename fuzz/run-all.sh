#!/usr/bin/env bash
# Builds every fuzz target and runs each for SECONDS (default 600), one after
# the other, at low priority; prints each target's executions, coverage and
# corpus size, and exits non-zero if any target crashed (or failed to build).
#
#   fuzz/run-all.sh [SECONDS] [TARGET...]     # default: every target
#
# Needs cargo-fuzz (`cargo install cargo-fuzz --locked`); works on the stable
# toolchain through RUSTC_BOOTSTRAP=1 (see fuzz/README.md). Corpora grow in
# fuzz/corpus/<target>/, crashes land in fuzz/artifacts/<target>/, logs in
# fuzz/logs/<target>.log (all ignored by git).
set -uo pipefail

cd "$(dirname "$0")"
seconds=${1:-600}
shift || true
if ! [[ $seconds =~ ^[0-9]+$ ]] || ((seconds == 0)); then
    echo "usage: $0 [SECONDS] [TARGET...]" >&2
    exit 2
fi
export RUSTC_BOOTSTRAP=1
command -v cargo-fuzz >/dev/null || {
    echo "cargo-fuzz is not installed: cargo install cargo-fuzz --locked" >&2
    exit 2
}

all=$(cargo fuzz list)
targets=("$@")
((${#targets[@]})) || mapfile -t targets <<<"$all"
for target in "${targets[@]}"; do
    grep -qx "$target" <<<"$all" || {
        echo "no such target: $target (have: $(echo $all))" >&2
        exit 2
    }
done

# The dictionary each target starts from.
dict_for() {
    case $1 in
        http_request | http_chunked) echo dict/http.dict ;;
        detect | proxy_header) echo dict/proxy.dict ;;
        tls_replay) echo dict/tls.dict ;;
        dtls_preparse) echo dict/dtls.dict ;;
        config) echo dict/config.dict ;;
        h2_frames | hpack_decode) echo dict/h2.dict ;;
        accept_encoding) echo dict/accept_encoding.dict ;;
        ocsp) echo dict/ocsp.dict ;;
    esac
}

echo "building ${#targets[@]} targets"
for target in "${targets[@]}"; do
    nice -n 10 cargo fuzz build "$target" || {
        echo "build failed: $target" >&2
        exit 1
    }
done

mkdir -p logs
failed=()
rows=()
for target in "${targets[@]}"; do
    mkdir -p "corpus/$target"
    args=(-max_total_time="$seconds" -print_final_stats=1 -timeout=30)
    dict=$(dict_for "$target")
    [[ -n $dict && -f $dict ]] && args+=(-dict="$dict")
    echo "== $target: ${seconds}s (${args[*]})"
    log=logs/$target.log
    nice -n 10 cargo fuzz run "$target" -- "${args[@]}" >"$log" 2>&1
    status=$?
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
    done_line=$(grep -E '^#[0-9]+[[:space:]]+DONE' "$log" | tail -1)
    cov=$(sed -nE 's/.* cov: ([0-9]+) ft: ([0-9]+).*/\1 \/ \2/p' <<<"$done_line")
    # libFuzzer's own count (inputs kept / their size) from the DONE line, else the files.
    corpus=$(sed -nE 's/.* corp: ([0-9]+\/[0-9]+[a-zA-Z]*).*/\1/p' <<<"$done_line")
    [[ -n $corpus ]] || corpus="$(find "corpus/$target" -type f | wc -l) files"
    if ((status != 0)); then
        failed+=("$target")
        echo "   CRASHED (exit $status); see $log and artifacts/$target/"
        grep -E '^(==[0-9]+==ERROR|thread .* panicked|SUMMARY)' "$log" | head -5 | sed 's/^/   /'
    fi
    echo "   execs ${execs:-?}, cov/ft ${cov:-?}, corpus $corpus"
    rows+=("| \`$target\` | $((seconds / 60)) | ${execs:-?} | ${cov:-?} | $corpus | $(date -u +%F) | \`fuzz/run-all.sh $seconds $target\` |")
done

echo
echo "| target | minutes | execs | cov / ft | corpus | date | command |"
echo "|---|---|---|---|---|---|---|"
printf '%s\n' "${rows[@]}"
if ((${#failed[@]})); then
    echo "crashed: ${failed[*]}" >&2
    exit 1
fi
