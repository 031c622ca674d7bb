#!/usr/bin/env bash
# Run benchmark-suite parts inside one GPU call and bring everything back as one file.
#
#   bash bench/run_parts.sh PART[:SECONDS[:SCALE]] ...
#
# Each part runs under its own time limit (default 540 s) so that one overrun cannot cost the others, training parts
# read DATA (default data/suite, prepared by the prepare-data part from CARRY, default .carry), and everything the
# parts wrote goes into $OUT/results.tgz: each PART.json, the runs' metrics, a log, and the metrics.jsonl of runs a
# time limit cut short (partial/, from the scratch run folders). A device call returns at most 8 files, hence the tar.
# QUICK=1 adds --quick (a CPU smoke test); PYTHON names the interpreter (default python3); PART_ARGS adds arguments to
# every training part (e.g. "--contenders dense --budgets 0.5 1 1.5": one part split over the GPUs of a call).
# Example (one device call, carry [".carry"]):
#
#   bash bench/run_parts.sh prepare-data:120 sat-cpt:420 upcycle:300:0.5
set -u
: "${OUT:?set OUT to the folder that comes back}"
DATA=${DATA:-data/suite}
CARRY=${CARRY:-.carry}
WORK=${WORK:-runs/suite}
PYTHON=${PYTHON:-python3}
RESULTS=$(mktemp -d)
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
quick=()
[ "${QUICK:-0}" = 1 ] && quick=(--quick)

for spec in "$@"; do
    IFS=: read -r part limit scale <<<"$spec"
    args=(bench --suite "$part" --out "$RESULTS" "${quick[@]}")
    case "$part" in
        prepare-data) args+=(--data-dir "$DATA" --carry "$CARRY") ;;
        *-step) ;;
        *) args+=(--data-dir "$DATA" --work-dir "$WORK" ${scale:+--scale "$scale"} ${PART_ARGS:-}) ;;
    esac
    echo "== $part (limit ${limit:-540} s): sparsetrain ${args[*]}" | tee -a "$RESULTS/log.txt"
    timeout "${limit:-540}" "$PYTHON" -m sparsetrain.cli "${args[@]}" 2>&1 | grep -v '^{' | tee -a "$RESULTS/log.txt"
    echo "== $part: exit ${PIPESTATUS[0]}" | tee -a "$RESULTS/log.txt"
    if [ ! -f "$RESULTS/$part.json" ]; then  # cut short: keep what its runs logged
        mkdir -p "$RESULTS/partial"
        for f in "$WORK/$part"/*/metrics.jsonl; do
            [ -f "$f" ] && cp "$f" "$RESULTS/partial/$part-$(basename "$(dirname "$f")").jsonl"
        done
    fi
done
tar czf "$OUT/results.tgz" -C "$RESULTS" .
echo "packed: $OUT/results.tgz"
