#!/usr/bin/env bash
# Mutation testing (mutmut) of the modules whose numbers users read. A slow job (an hour or more on
# two cores), not CI.
#
#   benchmarks/mutation.sh                    # every module in MODULES below, from the working tree
#   benchmarks/mutation.sh stats costs        # some of them
#   REV=main benchmarks/mutation.sh costs     # the tree of a git revision (a "before" score)
#   MUTANTS='tinylm.trainer.x_step_batches*' benchmarks/mutation.sh trainer   # only these mutants (mutmut's
#                                             # names, globs allowed; the others count as not checked)
#
# Each module runs in its own scratch copy of the tree (OUT/<module>, default /tmp/tinylm-mutation),
# mutating that one file. mutmut runs the module's tests once to learn which test reaches which
# function, then per mutant only those tests, one process at a time, niced (NICE, default 10), so it can share a small
# machine. Results: OUT/<module>/results.txt (each mutant's verdict; `mutmut show NAME` inside
# OUT/<module> prints its diff) and a score line per module appended to OUT/scores.txt.
#
# MODULES: name -> "file to mutate | test files (absent ones are skipped) | pytest -k expression".
# The -k expression keeps each module's test run to the tests that check its numbers (the whole
# training tests would make a run take many hours); edit it to widen or narrow a module's tests.
set -euo pipefail

declare -A MODULES=(
  [costs]="src/tinylm/costs.py|tests/test_mechanics.py tests/test_optim.py tests/test_closed_forms.py|cost_model or memory_estimate or info_estimates or flops_per_token or memory_of"
  [stats]="src/tinylm/report/stats.py|tests/test_report_stats.py tests/test_closed_forms.py|hand_computed or verdict_follows or pairing_by_seed or noise_floor_is or contributor_is_named or students or t_table or edges or low_end or spread_of or effect_interval"
  [evaluate]="src/tinylm/evaluate.py|tests/test_use.py tests/test_doc_eval.py tests/test_closed_forms.py tests/test_precision.py|bits_per_byte or eval or beyond or per_document"
  [optim]="src/tinylm/optim.py|tests/test_optim.py tests/test_train.py tests/test_closed_forms.py tests/test_reference.py|cosine or wsd or warmup or constant or time_budget or span_holds or muon_takes or schedule_scales or longer_budget or learning_rate_schedules or round_trips or torch_without_it or gpt2_training or muon_training"
  [loss]="src/tinylm/loss.py|tests/test_loss.py tests/test_reference.py|not cuda"
  [trainer]="src/tinylm/trainer.py|tests/test_trainer_records.py tests/test_train.py tests/test_reference.py tests/test_stability.py tests/test_step_reads.py tests/test_device_guard.py tests/test_tracking.py|not slow and not loss_falls and not same_seed and not after_kill and not llama and (not muon or guarded_muon_runs_read_every_step) and not healthy_run and not high_lr_run and not non_finite and not (resume_equals_uninterrupted and (constant or wsd or doc or dropout)) and (not test_tracking or resumed_with_another_tracker)"
  [device_guard]="src/tinylm/device_guard.py|tests/test_device_guard.py tests/test_step_reads.py tests/test_stability.py|test_device_guard or skips_the_same_bad_steps or device_decision_stands or rolls_back_at_the_next_read or guarded_muon or spike_detector or streak_of_skipped"
  [studyplan]="src/tinylm/study/plan.py|tests/test_study.py|not slow"
)
ORDER=(costs stats evaluate optim loss trainer device_guard studyplan)

ROOT=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
OUT=${OUT:-/tmp/tinylm-mutation}
MUTMUT=${MUTMUT:-$(dirname "$(command -v python)")/mutmut}
[[ -x $MUTMUT ]] || MUTMUT=mutmut
command -v "$MUTMUT" >/dev/null || { echo "mutation.sh: mutmut is not installed: pip install -e '.[mutation]'" >&2; exit 2; }
mkdir -p "$OUT"
names=("$@")
[[ ${#names[@]} -gt 0 ]] || names=("${ORDER[@]}")

for name in "${names[@]}"; do
  spec=${MODULES[$name]:-}
  [[ -n $spec ]] || { echo "mutation.sh: unknown module $name (known: ${ORDER[*]})" >&2; exit 2; }
  IFS='|' read -r target files filter <<<"$spec"
  [[ $name != studyplan || -e $ROOT/$target ]] || target=src/tinylm/studyplan.py  # before the study package
  work=$OUT/$name
  rm -rf "$work" && mkdir -p "$work"
  if [[ -n ${REV:-} ]]; then
    git -C "$ROOT" archive "$REV" | tar -x -C "$work"
  else  # the tracked files as they are now, uncommitted changes included
    git -C "$ROOT" ls-files -z | (cd "$ROOT" && xargs -0 cp --parents -t "$work")
  fi
  selection=()
  for t in $files; do [[ -e $work/$t ]] && selection+=("\"$t\""); done
  selection+=("\"-k\"" "\"$filter\"")
  {
    echo
    echo "[tool.mutmut]"
    echo "source_paths = [\"src\"]"
    echo "only_mutate = [\"$target\"]"
    echo "pytest_add_cli_args_test_selection = [$(IFS=,; echo "${selection[*]}")]"
    echo 'pytest_add_cli_args = ["-x", "-q", "-p", "no:cacheprovider", "-n", "0"]'  # mutmut runs tests in its own process
  } >>"$work/pyproject.toml"
  echo "== $name: $target; tests: ${selection[*]}"
  start=$(date +%s)
  read -ra only <<<"${MUTANTS:-}"
  # TINYLM_TEST_CACHE: the test corpora are prepared once, not again in each mutant's test session
  (set -f && cd "$work" && env -u PYTHONPATH OMP_NUM_THREADS=1 TINYLM_TEST_CACHE="$work/test-cache" \
    nice -n "${NICE:-10}" "$MUTMUT" run --max-children 1 "${only[@]}" >run.log 2>&1) || true
  (cd "$work" && "$MUTMUT" results --all true >results.txt 2>&1) || true
  count() { grep -cE ": ($1)\$" "$work/results.txt" || true; }
  killed=$(count killed) timeout=$(count timeout) survived=$(count survived) untested=$(count "no tests")
  unchecked=$(count "not checked")
  total=$((killed + timeout + survived + untested))  # of the mutants checked
  score=$(awk -v k="$((killed + timeout))" -v t="$total" 'BEGIN { printf t ? "%.1f" : "-", 100 * k / t }')
  line="$name rev=${REV:-worktree} killed=$killed timeout=$timeout survived=$survived no_tests=$untested not_checked=$unchecked"
  line+=" total=$total score=$score% minutes=$(( ($(date +%s) - start) / 60 ))"
  echo "$line" | tee -a "$OUT/scores.txt"
done
