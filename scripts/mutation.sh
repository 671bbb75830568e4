#!/usr/bin/env bash
# Mutation testing of the core modules with mutmut 3 (configuration: [tool.mutmut] in
# pyproject.toml — ops references, posterior, predictive, estimators, distributed). Not part of
# CI's time budget: hours on a 2-core machine. Runs on the pure-PyTorch reference ops (they are
# among the mutated modules). Writes mutants/ (git-ignored) and prints the score:
#
#     bash scripts/mutation.sh                 # all core modules
#     JOBS=4 bash scripts/mutation.sh          # more parallel mutants
#
# `mutmut results` lists the survivors, `mutmut show NAME` shows one as a diff.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q "mutmut>=3.8,<4"
# laplace-torch, so the cross-checks of tests/test_laplace_compat.py kill mutants too (installed
# as scripts/test.sh does: no dependencies of its own, torch untouched)
python -m pip install -q --no-deps "laplace-torch==0.3" asdfghjkl backpack-for-pytorch \
    curvlinops-for-pytorch einops opt_einsum torchmetrics lightning_utilities unfoldNd einconv \
    jaxtyping wadler_lindig linear_operator
export FASTLLA_DISABLE_NATIVE=1
# mutmut forks a child per mutant: an OpenMP pool inherited across fork hangs (every mutant
# then "times out"), so torch runs single-threaded here.
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
mutmut run --max-children "${JOBS:-2}" || true
mutmut export-cicd-stats
python - <<'PY'
import json
s = json.load(open("mutants/mutmut-cicd-stats.json"))
killed, survived = s["killed"], s["survived"]
scored = killed + survived
print(f"mutation score: {killed}/{scored} killed = {killed / max(scored, 1):.1%} "
      f"(plus {s.get('timeout', 0)} timeouts, {s.get('no_tests', 0)} without a covering test)")
PY
