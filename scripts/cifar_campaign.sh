#!/usr/bin/env bash
# The CIFAR-10 / ResNet-20 campaigns on this 2-core CPU (RESULTS.md), each cell at schedule_scale=0.1:
#   full  (part 10, the default): every cell starts from a float ResNet-20 trained at its full recipe
#         (pretrain.schedule_scale=1: 200 epochs); state in results/cifar10_resnet20_fullfloat/
#   s01   (part 8, complete): the float starts at 1/10 too; state in results/cifar10_resnet20_s01/
#
#   scripts/cifar_campaign.sh [CAMPAIGN] start      restore, then run both lanes in the background (resumable)
#   scripts/cifar_campaign.sh [CAMPAIGN] lane B     one lane only (A or B), in the background
#   scripts/cifar_campaign.sh [CAMPAIGN] stop       stop both lanes at the current step (checkpoint saved), then snapshot
#   scripts/cifar_campaign.sh [CAMPAIGN] snapshot   copy finished runs and the state of running ones into results/
#   scripts/cifar_campaign.sh [CAMPAIGN] restore    put the committed state back under outputs/ (a fresh machine)
#   scripts/cifar_campaign.sh [CAMPAIGN] status     one line per run
#
# Two lanes, one thread each: two 1-thread runs do 1.16x the work of one 2-thread run here
# (docs/BENCHMARKS.md). Every cell is `qtrain experiment=... schedule_scale=0.1 resume=true`, so a
# cell that was cut off continues where its last checkpoint left it (mid-epoch included), and a
# finished one is skipped. A float ResNet-20 (init=float) is trained once, by whichever lane gets
# there first; the other waits.
set -euo pipefail
cd "$(dirname "$0")/.."
CAMPAIGN=full
case "${1:-}" in full|s01) CAMPAIGN=$1; shift ;; esac
SCALE=0.1
QTRAIN=${CAMPAIGN_QTRAIN:-.venv/bin/qtrain}  # (CAMPAIGN_*: for trying the script on a stand-in)
# threads per lane: 1 while both lanes run; CAMPAIGN_THREADS=2 for a lane that will run alone
THREADS=${CAMPAIGN_THREADS:-1}
export QTRAIN_DATA="${QTRAIN_DATA:-$(cd ../shared/data 2>/dev/null && pwd)}"
# A cell is an experiment name with optional +overrides (+seed=1: the second seed; in s01 it trains its own
# seed-1 float model first, in full +pretrain.seed=0 keeps the seed-0 float start, so only the quantized phase
# changes; +schedule_scale=0.25: that cell at another quantized schedule), or instability:<cell> for the
# [STE] §4.2 run that starts from that finished seed-0 cell (identity STE, lr 1e-5, the paper's 20 epochs:
# never scaled), or instability_control:<cell> for its control (the same with the clipped_relu STE; not in
# the paper). EXTRA: overrides every (non-instability) cell of the campaign gets.
case $CAMPAIGN in
  s01)
    OUT=${CAMPAIGN_OUT:-outputs/cifar}
    KEEP=${CAMPAIGN_KEEP:-results/cifar10_resnet20_s01}
    EXTRA=""
    # the issue's second seed of rows 2-4 comes before the extra cells (a2 relu seed 1, BCGD at lr 0.01).
    # BCGD at lr 0.01 is last in lane A, which empties first: started there with CAMPAIGN_THREADS=2 it runs
    # about 1.7x faster once lane B is done.
    LANE_A="ste/cifar10_resnet20_a4_clipped_relu ste/cifar10_resnet20_a2_clipped_relu ste/cifar10_resnet20_a4_relu br/cifar10_resnet20_w1 instability:a4_relu ste/cifar10_resnet20_a4_clipped_relu+seed=1 ste/cifar10_resnet20_a2_relu+seed=1 bcgd/cifar10_resnet20_w1a4+optim.lr=0.01"
    LANE_B="ste/cifar10_resnet20_a4_identity ste/cifar10_resnet20_a2_relu ste/cifar10_resnet20_a2_identity instability:a4_clipped_relu bcgd/cifar10_resnet20_w1a4 instability_control:a4_clipped_relu ste/cifar10_resnet20_a4_identity+seed=1 ste/cifar10_resnet20_a2_clipped_relu+seed=1" ;;
  full)
    OUT=${CAMPAIGN_OUT:-outputs/cifar_full}
    KEEP=${CAMPAIGN_KEEP:-results/cifar10_resnet20_fullfloat}
    EXTRA="pretrain.schedule_scale=1"
    # Lane A trains the non-affine float model (the [STE] cells' start) with its first cell, lane B the affine one
    # (BinaryRelax, BCGD) with its first; the two targets (a4/a2 clipped_relu) come first in lane A. BCGD runs
    # at lr 0.01, where part 8 found it stable (at the authors' 0.1 its alpha ran away: RESULTS.md). a2 relu at lr
    # 0.002 is an analysis run, not a Table 1 cell: its first steps have clipped_relu's length (RESULTS.md, "Analysis,
    # second measurement"), which tests whether relu's inflated coarse gradient fails the cell by its size.
    LANE_A="ste/cifar10_resnet20_a4_clipped_relu ste/cifar10_resnet20_a2_clipped_relu ste/cifar10_resnet20_a4_relu ste/cifar10_resnet20_a2_relu instability:a4_clipped_relu ste/cifar10_resnet20_a4_clipped_relu+seed=1+pretrain.seed=0 ste/cifar10_resnet20_a4_clipped_relu+schedule_scale=0.25 instability_control:a4_clipped_relu"
    LANE_B="br/cifar10_resnet20_w1 bcgd/cifar10_resnet20_w1a4+optim.lr=0.01 br/cifar10_resnet20_w2 ste/cifar10_resnet20_a4_identity ste/cifar10_resnet20_a2_identity ste/cifar10_resnet20_a2_relu+optim.lr=0.002 instability:a4_relu ste/cifar10_resnet20_a2_clipped_relu+seed=1+pretrain.seed=0 ste/cifar10_resnet20_a2_clipped_relu+schedule_scale=0.25" ;;
esac

# a run folder's overrides.yaml: under .hydra/ where qtrain writes it, at the top where copy_run puts it
# (results/ and a run restored from there); fails when the folder has neither
overrides_of() {
  if [ -f "$1/.hydra/overrides.yaml" ]; then echo "$1/.hydra/overrides.yaml"
  elif [ -f "$1/overrides.yaml" ]; then echo "$1/overrides.yaml"
  else return 1; fi
}

# copy one run folder's small files (and its checkpoints) from $1 to $2
copy_run() {
  local src=$1 dst=$2
  mkdir -p "$dst/checkpoints"
  for f in result.json metrics.jsonl fingerprint.txt; do [ -f "$src/$f" ] && cp -p "$src/$f" "$dst/$f"; done
  local o; if o=$(overrides_of "$src"); then cp -p "$o" "$dst/overrides.yaml"; fi
  cp -p "$src/checkpoints/last.pt" "$dst/checkpoints/last.pt"
  # best.pt too: a running cell needs it to resume, a finished one's is its best-epoch model
  if [ -f "$src/checkpoints/best.pt" ]; then cp -p "$src/checkpoints/best.pt" "$dst/checkpoints/best.pt"; fi
}

snapshot() {
  for ck in $(find "$OUT" -path '*/checkpoints/last.pt' 2>/dev/null); do
    local run; run=$(dirname "$(dirname "$ck")")
    copy_run "$run" "$KEEP/${run#$OUT/}"
  done
}

restore() {
  for ck in $(find "$KEEP" -path '*/checkpoints/last.pt' 2>/dev/null); do
    local run; run=$(dirname "$(dirname "$ck")")
    local dst="$OUT/${run#$KEEP/}"
    if [ ! -f "$dst/checkpoints/last.pt" ]; then echo "restoring $dst"; copy_run "$run" "$dst"; fi
  done
}

# the overrides of one cell (see LANE_A); fails when an instability cell's source has not finished
cell_args() {
  case "$1" in
    instability*:*)  # instability:<cell> or instability_control:<cell> -> ste/cifar10_resnet20_a4_<kind>
      local kind=${1%%:*} from=${1#*:} src="" d o
      # the finished seed-0 run of that cell, found by its experiment (the §4.2 runs share its folder)
      for d in "$OUT"/runs/*/s0_*; do
        if [ -f "$d/result.json" ] && o=$(overrides_of "$d") \
          && grep -qx -- "- experiment=ste/cifar10_resnet20_$from" "$o" \
          && grep -qx -- "- schedule_scale=$SCALE" "$o"; then src=$d; break; fi  # (not the 0.25 run of that cell)
      done
      [ -n "$src" ] || { echo "$kind: $from has not finished yet" >&2; return 1; }
      echo "experiment=ste/cifar10_resnet20_a4_$kind init=$src/checkpoints/last.pt" ;;
    *) local exp=${1%%+*} rest="" o scale=$SCALE
      [ "$exp" = "$1" ] || rest=$(echo "${1#*+}" | tr + ' ')
      local extra=""
      for o in $EXTRA $rest; do
        case $o in
          schedule_scale=*) scale=${o#*=} ;;  # the cell's own quantized schedule, given once
          pretrain.schedule_scale=*) extra="$extra $o" ;;  # (a key of the config)
          pretrain.*) extra="$extra ++$o" ;;  # ++: pretrain is a free-form node (a key it may not have yet)
          *) extra="$extra $o" ;;
        esac
      done
      echo "experiment=$exp schedule_scale=$scale$extra" ;;
  esac
}

lane() {  # $1: cells, $2: lane name
  for exp in $1; do
    echo "$(date -u +%FT%TZ) start $exp" >> "$OUT/lane_$2.log"
    local args; args=$(cell_args "$exp" 2>> "$OUT/lane_$2.log") || { echo "$(date -u +%FT%TZ) SKIPPED $exp" >> "$OUT/lane_$2.log"; continue; }
    local code attempt
    for attempt in 1 2; do  # a crash is retried once: resume=true continues from the last checkpoint
      # shellcheck disable=SC2086  # $args is a list of overrides without spaces
      OMP_NUM_THREADS=$THREADS "$QTRAIN" $args resume=true out_dir="$OUT" progress=false >> "$OUT/lane_$2.log" 2>&1 \
        && code=0 || code=$?
      case $code in 0|2|3|130|143) break ;; esac  # done, bad config, diverged, stopped by a signal: no retry
      [ "$attempt" = 1 ] && echo "$(date -u +%FT%TZ) $exp exited $code; retrying once" >> "$OUT/lane_$2.log"
    done
    if [ "$code" = 0 ]; then
      echo "$(date -u +%FT%TZ) done $exp" >> "$OUT/lane_$2.log"
    else
      echo "$(date -u +%FT%TZ) FAILED $exp (exit $code)" >> "$OUT/lane_$2.log"
    fi
    snapshot
  done
}

status() {  # one line per run: epochs done, last test accuracy, and done / training now / stopped (resumable)
  # every run folder from its start on: qtrain writes fingerprint.txt before the first epoch, metrics.jsonl after it
  for f in $(find "$OUT" -name fingerprint.txt | sort); do
    local d m state what; d=$(dirname "$f"); m="$d/metrics.jsonl"
    if [ -f "$d/result.json" ]; then state=done
    elif [ -f "$d/.lock" ] && ! flock -n "$d/.lock" true; then state="training now"  # its qtrain holds the run lock
    else state="stopped (resumes with start)"; fi
    local epochs=0 acc=-
    if [ -f "$m" ]; then  # (none before the first epoch ends)
      epochs=$(wc -l < "$m"); acc=$(tail -n 1 "$m" | sed -n 's/.*"test\/acc": \([0-9.]*\).*/\1/p')
    fi
    printf '%-72s %3s epochs  test acc %-6s %s\n' "${d#$OUT/}" "$epochs" "$acc" "$state"
    # run folders are named by method, bits and STE, so say which cell it is (the §4.2 runs share a folder with
    # a4 identity): the overrides it was started with, less those every cell has (seed=1, init=, optim.lr=0.01 stay)
    local o; o=$(overrides_of "$d") || continue
    what=$(sed -n 's/^- //p' "$o" | { grep -Ev "^(schedule_scale=$SCALE$|resume=|out_dir=|progress=|pretrain.schedule_scale=1$)" || true; } \
      | sed 's#^init=.*/float/.*#init=float#; s#^init=.*/runs/#init=#' | tr '\n' ' ')
    [ -z "$what" ] || echo "    ${what% }"
  done
}

# start lane $1 (A or B) in the background, unless it is already running; its pid goes to lane_<X>.pid
start_lane() {
  local name=$1 cells; cells=$([ "$1" = A ] && echo "$LANE_A" || echo "$LANE_B")
  local pidfile="$OUT/lane_$name.pid"
  if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
    echo "lane $name is already running (pid $(cat "$pidfile")); 'stop' first to restart it"; return 0
  fi
  nohup bash -c "$(declare -f overrides_of copy_run snapshot cell_args lane); OUT=$OUT KEEP=$KEEP SCALE=$SCALE EXTRA='$EXTRA' QTRAIN=$QTRAIN THREADS=$THREADS; lane '$cells' $name" \
    >/dev/null 2>&1 &
  echo $! > "$pidfile"
  echo "started lane $name (pid $!); log: $OUT/lane_$name.log"
}

# stop both lanes so that they resume exactly: the lane first (it must start no further cell), then its
# qtrain gets SIGINT, finishes the current step, saves a checkpoint there and exits; then snapshot
stop() {
  local name pid kids
  for name in A B; do
    [ -f "$OUT/lane_$name.pid" ] || continue
    pid=$(cat "$OUT/lane_$name.pid")
    if kill -0 "$pid" 2>/dev/null; then
      kids=$(pgrep -P "$pid" || true)
      kill -9 "$pid"
      if [ -n "$kids" ]; then
        kill -INT $kids 2>/dev/null || true
        for k in $kids; do while kill -0 "$k" 2>/dev/null; do sleep 1; done; done
      fi
      echo "stopped lane $name"
    fi
    rm -f "$OUT/lane_$name.pid"
  done
  snapshot
}

mkdir -p "$OUT"
case "${1:-}" in
  start)
    # a qtrain that cannot start (no venv, or console scripts whose #! names a python that is gone) would
    # otherwise fail every cell of both queues in a second, each logged FAILED: refuse before any lane starts
    "$QTRAIN" --help > /dev/null 2>&1 || {
      echo "cifar_campaign: $QTRAIN does not run (exit $?); run 'make install' (or reinstall: .venv/bin/pip install -e .) and start again" >&2
      exit 2; }
    restore
    start_lane A
    sleep 60  # lane A takes the float-model lock first; lane B then waits for it instead of racing
    start_lane B ;;
  lane) start_lane "${2:-B}" ;;  # one lane only: scripts/cifar_campaign.sh lane B
  stop) stop ;;
  snapshot) snapshot ;;
  restore) restore ;;
  status) status ;;
  *) sed -n 2,13p "$0"; exit 2 ;;
esac
