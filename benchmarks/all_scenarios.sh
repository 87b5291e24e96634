#!/bin/bash
# Every shipped scenario with its comparisons, one after the other (about 80 minutes on a 2-core machine, without
# geo-wide; REPEATS=3 triples it and adds each ratio's 95 % interval):
#     bash benchmarks/all_scenarios.sh [OUT]        # OUT/<scenario>.json, OUT/<scenario>.out; plots in docs/plots
#     WIDE=1 bash benchmarks/all_scenarios.sh OUT   # also geo-wide (24 nodes, forked from a zygote: 4+ free cores)
# Each run stops every process it started; a scenario that fails does not stop the others.
set -u
cd "$(dirname "$0")/.."
out=${1:-runs/scenarios}
repeats=${REPEATS:-1}
mkdir -p "$out"
status=0
run() {
    local name=$1
    shift
    echo "== $name $*"
    timeout $((1500 * repeats)) .venv/bin/python -m gwtf.benchmarks.churn --scenario "benchmarks/scenarios/$name.toml" \
        "$@" --repeats "$repeats" --json "$out/$name.json" --plots docs/plots --logs "$out/churn" > "$out/$name.out" 2>&1 \
        || status=1
    sed -n '/target loss/,$p' "$out/$name.out"
}
run local --compare system=gwtf,deepspeed
run geo10 --compare router=gwtf,swarm,round-robin --compare system=gwtf,deepspeed
run stage-loss --compare recovery=checkfree,copy,redundant --compare system=gwtf,deepspeed
run geo10-heavy --compare router=gwtf,swarm --compare system=gwtf,deepspeed
run join-wave --compare router=gwtf,swarm --compare system=gwtf,deepspeed
run geo-wide-12 --compare router=gwtf,swarm
if [ "${WIDE:-0}" = 1 ]; then
    run geo-wide --compare router=gwtf-p2p,gwtf,swarm --preload  # nodes forked: 24 torch imports at once do not start
fi
exit $status
