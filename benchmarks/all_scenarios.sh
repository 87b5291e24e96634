#!/bin/bash
# Every shipped scenario with its comparisons, one after the other (about 70 minutes on a 2-core machine):
#     bash benchmarks/all_scenarios.sh [OUT]        # OUT/<scenario>.json, OUT/<scenario>.out; plots in docs/plots
# Each run stops every process it started; a scenario that fails does not stop the others.
set -u
cd "$(dirname "$0")/.."
out=${1:-runs/scenarios}
mkdir -p "$out"
status=0
run() {
    local name=$1
    shift
    echo "== $name $*"
    timeout 1500 .venv/bin/python -m gwtf.benchmarks.churn --scenario "benchmarks/scenarios/$name.toml" "$@" \
        --json "$out/$name.json" --plots docs/plots --logs "$out/churn" > "$out/$name.out" 2>&1 || status=1
    sed -n '/target loss/,$p' "$out/$name.out"
}
run local --compare system=gwtf,deepspeed
run geo10 --compare router=gwtf,swarm,round-robin --compare system=gwtf,deepspeed
run stage-loss --compare recovery=checkfree,copy,redundant --compare system=gwtf,deepspeed
run geo10-heavy --compare router=gwtf,swarm --compare system=gwtf,deepspeed
run join-wave --compare router=gwtf,swarm --compare system=gwtf,deepspeed
exit $status
