#!/usr/bin/env bash
# [repro] SmolLM2-135M-Instruct -> 6 MLA + 24 Mamba2 (5% KV) on one lent GPU, in device calls of < 10
# minutes on one warm machine (../.library/device/README.md). Every part picks up where the last
# stopped: train.py resumes its stages, SIGTERM (from `timeout`) checkpoints the step in flight,
# finished evaluations and ablations are skipped. Results (no weights) go to $OUT/runs.tgz.
#
#   bash ../shared/gpu/stage.sh
#   mkdir -p .gpu/data/eval .gpu/data/train; cp ../shared/data/train/hh_rlhf/* .gpu/data/train/
#   cp -r ../shared/data/eval/{arc_challenge,arc_easy,hellaswag,lambada_openai,openbookqa,piqa,winogrande} .gpu/data/eval/
#   call 1, carry [.gpu/a, .gpu/data, .peers]: bash bench/repro.sh stage   (then benches, if any)
#   call 2, carry [.gpu/b]:                      bash bench/repro.sh data    (teacher data, teacher eval, train)
#   calls 3..: bash bench/repro.sh continue      (train, student eval, ablations)
# The ablation table alone, on a smaller budget (no teacher-written data, ILD $ABLATION_ILD_STEPS and
# KD $ABLATION_STEPS steps for every variant; the SMART variant also runs a short DPO):
#   call 2, carry [.gpu/b]: bash bench/repro.sh ablation;   calls 3..: bash bench/repro.sh ablation
# [multigpu] on nvidia-h200-x2, the KD stage on 1 GPU and on 2 (torchrun, FSDP2), same global batch:
#   call 1 as above, call 2, carry [.gpu/b]: bash bench/repro.sh fsdp
# Calls must follow each other within ~30 s (the machine is given back when idle), and a machine is
# held 30 minutes at most and loses $HOME/runs when given back (only $OUT comes home): the whole
# config needs about 45 minutes of one machine. bench/RESULTS.md has what one 30-minute lease gave.
set -uo pipefail
shopt -s nullglob
cd "$(dirname "$0")/.."
START=$(date +%s)
BUDGET=${BUDGET:-570}  # seconds this call may use (a device call is cut at 600)
left() { echo $((BUDGET - ($(date +%s) - START))); }
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=15 ZEBRA_CACHE=$HOME/zc PYTHONPATH=$HOME/stage/site:$PWD/.peers/site:$PWD
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
RUNS=$HOME/runs MAIN=$HOME/runs/smollm2-gpu DATA=$HOME/data
TEACHER=$ZEBRA_CACHE/smollm2-135m-instruct
TASKS=hellaswag,piqa,arc_easy,arc_challenge,winogrande,openbookqa
ABLATION_STEPS=${ABLATION_STEPS:-150} ABLATION_ILD_STEPS=${ABLATION_ILD_STEPS:-100}
mkdir -p "$RUNS/eval" "$RUNS/data" "${OUT:-/tmp/out}"

sft_list() {  # fixed once the teacher data exist: the pipeline's shuffle and ILD/KD split depend on it
  local files=("$RUNS"/data/teacher-*.jsonl.gz "$DATA/train/helpful-base_test.jsonl.gz"
               "$DATA/train/harmless-base_test.jsonl.gz" data/self_instruct_seed/seed_tasks.instruction.jsonl.gz)
  local IFS=,; echo "[${files[*]}]"
}
train() {  # train.py until `left` - $1 seconds, then SIGTERM (the trainer checkpoints and exits)
  local until=$(( $(left) - $1 )); shift
  ((until > 30)) || return 1
  timeout -k 20 -s TERM "$until" ${LAUNCH:-python3} train.py configs/smollm2_gpu.yaml --set runs_dir="$RUNS" \
    --set "data.sft=$(sft_list)" --set "data.preference=[$DATA/train/helpful-base_test.jsonl.gz]" \
    --set 'stages=[init,ild,smart,kd,dpo]' "$@"
}
evaluate() {  # evaluate.py NAME MODEL [extra args]: skipped when NAME's result exists
  local name=$1 model=$2; shift 2
  [ -f "$RUNS/eval/$name.json" ] && return 0
  python3 evaluate.py --model "$model" --tasks $TASKS --limit 500 --batch-size 64 --data-dir "$DATA/eval" \
    --ppl "$DATA/eval/lambada_openai/lambada_test.jsonl" --kv-contexts 4096,16384 --out "$RUNS/eval" "$@"
}
pack() {
  (cd "$RUNS" && find . \( -name checkpoints -o -name 'tokenizer*' \) -prune -o -type f \
     \( -name '*.json' -o -name '*.jsonl' -o -name '*.md' -o -name '*.png' -o -name DONE -o -name '*.txt' \) \
     -size -4M -print | tar czf "$OUT/runs.tgz" -T -)
  nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv > "$OUT/gpu.txt"
}
trap pack EXIT

unpack_teacher() {  # the GGUF halves of .gpu/a + .gpu/b -> an HF directory in $TEACHER
  [ -d "$TEACHER" ] && return 0
  bash .gpu/b/unpack.sh && mkdir -p "$ZEBRA_CACHE/gguf" \
    && cp "$HOME/stage/SmolLM2-135M-Instruct.Q4_1.gguf" "$ZEBRA_CACHE/gguf/" \
    && python3 -m zebra.hub fetch smollm2-135m-instruct
}
ablate() {  # variants of run $1 (its init, ILD and SMART reused) at the same KV budget and KD steps:
            # placement by SMART / uniform / first / last, and ILD off; extra train args after $1
  local main=$1 smart
  smart=$(python3 -c "import json; print(json.load(open('$main/smart/smart.json'))['mla_layers'])" | tr -d ' ')
  for variant in "smart:$smart" "uniform:[0,5,10,15,20,25]" "no_ild:$smart" "first:[0,1,2,3,4,5]" "last:[24,25,26,27,28,29]"; do
    name=abl-${variant%%:*} layers=${variant#*:} dir=$RUNS/abl-${variant%%:*}
    [ -f "$RUNS/eval/$name-kd.json" ] && continue
    (($(left) > 150)) || return 1
    mkdir -p "$dir"
    if [ "$name" = abl-no_ild ]; then  # KD straight from the init students
      mkdir -p "$dir/ild/mla" "$dir/ild/mamba2"
      ln -sfn "$main/init/mla" "$dir/ild/mla/model"; ln -sfn "$main/init/mamba2" "$dir/ild/mamba2/model"
    else
      ln -sfn "$main/ild" "$dir/ild"
    fi
    train 60 --set name="$name" --set "student.mla_layers=$layers" --set student.n_mla=null \
      --set 'stages=[smart,kd]' --set kd.train.max_steps=$ABLATION_STEPS "${@:2}" || return 1
    [ -f "$dir/kd/DONE" ] && evaluate "$name-kd" "$dir/kd/model" --kv-contexts ''
  done
}

case "${1:-}" in
stage)
  mkdir -p "$HOME/stage" && cp .gpu/a/part00 "$HOME/stage/" && rm -rf "$DATA" && cp -r .gpu/data "$DATA"
  nvidia-smi -L; python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  python3 -m pip install -q --no-index --no-deps --target "$PWD/.peers/site" .peers/whl/*.whl
  ;;
data)
  unpack_teacher || exit 1
  prompts=("$DATA/train/helpful-base_test.jsonl.gz" "$DATA/train/harmless-base_test.jsonl.gz"
           data/self_instruct_seed/seed_tasks.instruction.jsonl.gz)
  for seed in 1 2 3; do  # one pass over the prompts per seed, while a pass still fits
    (($(left) > 420)) || break
    python3 teacher_data.py --model "$TEACHER" --prompts "${prompts[@]}" --samples 1 --batch-size 1024 \
      --max-new-tokens 512 --temperature 0.7 --top-p 0.9 --seed $seed \
      --out "$RUNS/data/teacher-$seed.jsonl.gz" 2>&1 | tee -a "$RUNS/data/log.txt"
  done
  evaluate smollm2-135m-instruct "$TEACHER" --throughput-contexts 4096,16384
  train 15
  ;;
continue)
  [ -f "$MAIN/dpo/DONE" ] || train 200 || exit 0
  [ -f "$MAIN/dpo/DONE" ] || exit 0
  evaluate smollm2-gpu-kd "$MAIN/kd/model"
  evaluate smollm2-gpu-dpo "$MAIN/dpo/model" --throughput-contexts 4096,16384
  ablate "$MAIN" --set kd.train.max_steps=$ABLATION_STEPS
  ;;
ablation)
  unpack_teacher || exit 1
  evaluate smollm2-135m-instruct "$TEACHER" --throughput-contexts 4096,16384
  smart=$RUNS/abl-smart short=(--set ild.train.max_steps=$ABLATION_ILD_STEPS --set kd.train.max_steps=$ABLATION_STEPS)
  [ -f "$smart/dpo/DONE" ] || train 200 --set name=abl-smart "${short[@]}" --set dpo.train.max_steps=50 || exit 0
  [ -f "$smart/dpo/DONE" ] || exit 0
  evaluate abl-smart-kd "$smart/kd/model" --kv-contexts ''
  evaluate abl-smart-dpo "$smart/dpo/model" --throughput-contexts 4096,16384
  ablate "$smart" "${short[@]}"
  ;;
fsdp)  # from the init students (ILD skipped: this compares the runs, not the recipe), SMART's layers
  unpack_teacher || exit 1
  [ -f "$RUNS/fsdp-init/init/DONE" ] || train 30 --set name=fsdp-init --set 'stages=[init]' || exit 1
  for n in 1 2; do  # batch 16 / n rows per rank: the same global batch of 16 x 2048 tokens
    dir=$RUNS/fsdp-$n
    mkdir -p "$dir/ild/mla" "$dir/ild/mamba2"
    ln -sfn "$RUNS/fsdp-init/init/mla" "$dir/ild/mla/model"; ln -sfn "$RUNS/fsdp-init/init/mamba2" "$dir/ild/mamba2/model"
    [ -f "$dir/kd/DONE" ] || LAUNCH="torchrun --standalone --nproc-per-node $n" train 30 --set name=fsdp-$n \
      --set 'student.mla_layers=[0,5,10,16,22,28]' --set student.n_mla=null --set 'stages=[smart,kd]' \
      --set kd.train.max_steps=${FSDP_STEPS:-80} --set kd.train.batch_size=$((16 / n)) || exit 1
  done
  python3 - "$RUNS" <<'PY' | tee "$OUT/fsdp_smollm2.md"
import json, statistics, sys
rows = {n: [json.loads(l) for l in open(f"{sys.argv[1]}/fsdp-{n}/kd/metrics.jsonl")] for n in (1, 2)}
one, two = ({r["step"]: r for r in rows[n]} for n in (1, 2))
steps = sorted(set(one) & set(two))
diff = [abs(one[s]["loss"] - two[s]["loss"]) for s in steps]
rel = [d / abs(one[s]["loss"]) for d, s in zip(diff, steps)]
tps = {n: statistics.median(r["tokens_per_s"] for r in rows[n][3:]) for n in (1, 2)}
peak = {n: max(r.get("peak_gib", 0) for r in rows[n]) for n in (1, 2)}
print(f"| steps | loss 1 GPU first -> last | loss 2 GPUs first -> last | max abs diff | max rel diff |"
      f" tok/s 1 GPU | tok/s 2 GPUs | efficiency | peak GiB 1 / 2 |")
print("|---|---|---|---|---|---|---|---|---|")
print(f"| {len(steps)} | {one[steps[0]]['loss']:.4f} -> {one[steps[-1]]['loss']:.4f} | "
      f"{two[steps[0]]['loss']:.4f} -> {two[steps[-1]]['loss']:.4f} | {max(diff):.2e} | {max(rel):.2e} | "
      f"{tps[1]:,.0f} | {tps[2]:,.0f} | {tps[2] / (2 * tps[1]):.2f} | {peak[1]:.1f} / {peak[2]:.1f} |")
print("\nloss by step (1 GPU, 2 GPUs):", [(s, round(one[s]["loss"], 4), round(two[s]["loss"], 4)) for s in steps[::10]])
PY
  ;;
*) echo "usage: bash bench/repro.sh stage|data|continue|ablation|fsdp" >&2; exit 2 ;;
esac
