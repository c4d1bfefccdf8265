#!/usr/bin/env bash
# [repro] SmolLM2-135M-Instruct -> 6 MLA + 24 Mamba2 (5% KV) on one lent GPU, in device calls of < 10
# minutes on one warm machine (../.library/device/README.md). Every part picks up where the last
# stopped: train.py resumes its stages, SIGTERM (from `timeout`) checkpoints the step in flight,
# finished evaluations and ablations are skipped. Results (no weights) go to $OUT/runs.tgz.
#
#   bash ../shared/gpu/stage.sh
#   mkdir -p .gpu/data/eval .gpu/data/train; cp ../shared/data/train/hh_rlhf/* .gpu/data/train/
#   cp -r ../shared/data/eval/{arc_challenge,arc_easy,hellaswag,lambada_openai,openbookqa,piqa,winogrande} .gpu/data/eval/
#   call 1, carry [.gpu/a, .gpu/data, .peers]: bash bench/repro.sh stage   (+ SSD bench, Zebra shapes)
#   call 2, carry [.gpu/b]:                      bash bench/repro.sh data    (teacher data, teacher eval, train)
#   calls 3..: bash bench/repro.sh continue      (train, student eval, ablations)
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
ABLATION_STEPS=${ABLATION_STEPS:-150}
mkdir -p "$RUNS/eval" "$RUNS/data" "${OUT:-/tmp/out}"

sft_list() {  # fixed once the teacher data exist: the pipeline's shuffle and ILD/KD split depend on it
  local files=("$RUNS"/data/teacher-*.jsonl.gz "$DATA/train/helpful-base_test.jsonl.gz"
               "$DATA/train/harmless-base_test.jsonl.gz" data/self_instruct_seed/seed_tasks.instruction.jsonl.gz)
  local IFS=,; echo "[${files[*]}]"
}
train() {  # train.py until `left` - $1 seconds, then SIGTERM (the trainer checkpoints and exits)
  local until=$(( $(left) - $1 )); shift
  ((until > 30)) || return 1
  timeout -k 20 -s TERM "$until" python3 train.py configs/smollm2_gpu.yaml --set runs_dir="$RUNS" \
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

case "${1:-}" in
stage)
  mkdir -p "$HOME/stage" && cp .gpu/a/part00 "$HOME/stage/" && rm -rf "$DATA" && cp -r .gpu/data "$DATA"
  nvidia-smi -L; python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  python3 -m pip install -q --no-index --no-deps --target "$PWD/.peers/site" .peers/whl/*.whl
  timeout -k 10 240 python3 bench/ssd.py --chunks 64 --shapes smollm2,llama1b --no-peer-checks \
    | tee "$OUT/ssd.txt"
  ;;
data)
  bash .gpu/b/unpack.sh && mkdir -p "$ZEBRA_CACHE/gguf" \
    && cp "$HOME/stage/SmolLM2-135M-Instruct.Q4_1.gguf" "$ZEBRA_CACHE/gguf/" \
    && python3 -m zebra.hub fetch smollm2-135m-instruct || exit 1
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
  smart=$(python3 -c "import json; print(json.load(open('$MAIN/smart/smart.json'))['mla_layers'])" | tr -d ' ')
  for variant in "smart:$smart" "uniform:[0,5,10,15,20,25]" "no_ild:$smart" "first:[0,1,2,3,4,5]" \
                 "last:[24,25,26,27,28,29]"; do  # same KV budget, same KD tokens; ILD students shared
    name=abl-${variant%%:*} layers=${variant#*:} dir=$RUNS/abl-${variant%%:*}
    [ -f "$RUNS/eval/$name-kd.json" ] && continue
    (($(left) > 150)) || break
    mkdir -p "$dir"
    if [ "$name" = abl-no_ild ]; then  # KD straight from the init students
      mkdir -p "$dir/ild/mla" "$dir/ild/mamba2"
      ln -sfn "$MAIN/init/mla" "$dir/ild/mla/model"; ln -sfn "$MAIN/init/mamba2" "$dir/ild/mamba2/model"
    else
      ln -sfn "$MAIN/ild" "$dir/ild"
    fi
    train 60 --set name="$name" --set "student.mla_layers=$layers" --set student.n_mla=null \
      --set 'stages=[smart,kd]' --set kd.train.max_steps=$ABLATION_STEPS || break
    [ -f "$dir/kd/DONE" ] && evaluate "$name-kd" "$dir/kd/model" --kv-contexts ''
  done
  ;;
*) echo "usage: bash bench/repro.sh stage|data|continue" >&2; exit 2 ;;
esac
