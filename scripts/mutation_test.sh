#!/usr/bin/env bash
# Mutation testing of the method's core with mutmut (configured in pyproject.toml, [tool.mutmut]): every
# mutant of the configured modules is run against the tests that cover it; a surviving mutant is a change to
# the code that no test notices. Not part of CI (it takes minutes to hours); run it after changing a loss.
#
#   bash scripts/mutation_test.sh            # run, then print the summary and the surviving mutants
#   .venv/bin/mutmut show MUTANT             # the diff of one mutant
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
.venv/bin/python -m pip install --disable-pip-version-check -q "mutmut>=3.3"
rm -rf mutants
# One OpenMP thread: mutmut forks each test run from a process that has imported torch, and a child forked
# after OpenMP started its threads can hang until mutmut calls it a time-out.
OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 .venv/bin/mutmut run --max-children "$(nproc)" || true
.venv/bin/mutmut results --all true > mutants/results.txt || true
python3 - <<'PY'
import collections, re
counts = collections.Counter(
    m.group(1) for line in open("mutants/results.txt") if (m := re.search(r": (.+)$", line.strip()))
)
killed, survived = counts.get("killed", 0), counts.get("survived", 0)
print("mutants:", dict(counts))
if killed + survived:
    print(f"killed {killed} of {killed + survived} that ran to a verdict: {killed / (killed + survived):.1%}")
PY
grep -E ": survived$" mutants/results.txt || echo "no surviving mutant"
