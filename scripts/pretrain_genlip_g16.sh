#!/usr/bin/env bash
# GenLIP-g16 pretraining on a Slurm cluster: one srun task per node, each running torchrun over that node's GPUs.
#
#   mkdir -p logs            # Slurm does not create the --output directory; without it the job dies silently
#   sbatch scripts/pretrain_genlip_g16.sh [--stage 1|2] [--config FILE] [section.key=value ...]
#   sbatch --nodes=16 --time=48:00:00 scripts/pretrain_genlip_g16.sh training.save_interval=1000
#   sbatch scripts/pretrain_genlip_g16.sh --stage 2 training.init_from=runs/genlip-g16-1234/checkpoints
#   DRY_RUN=1 bash scripts/pretrain_genlip_g16.sh [...]     # or --dry-run: print the launch, start nothing
#
# Submit from the repository root (the job runs there; relative paths in overrides are relative to it). Inside an
# interactive allocation (`salloc --nodes=2 --gpus-per-node=8 --exclusive`) run it with `bash` instead of sbatch.
#
# What it does, in order:
#   config     examples/configs/g16_stage1.yaml, g16_stage2.yaml with `--stage 2`; `--config FILE` wins over both.
#   overrides  every `section.key=value` argument is passed to the trainer verbatim, in order (last one wins).
#   run dir    training.run_dir=runs/<job name>-<job id> is added unless you pass training.run_dir (this replaces a
#              run_dir set in the YAML; the script reads only command-line overrides).
#   resume     if <save dir>/latest exists (save dir: your training.save_dir, else <run dir>/checkpoints), the
#              script adds training.load_dir=<save dir> (and training.init_from=null: a resumed run takes its
#              weights from its own checkpoint). A requeued job keeps its job id, hence its run dir, and so resumes
#              by itself; to continue in a new job pass the old training.run_dir. Nothing is added when you pass
#              training.load_dir. Resume needs checkpoints: the g16 configs save only at the end, so pass
#              training.save_interval=N for long runs.
#   rendezvous the first host of `scontrol show hostnames "$SLURM_JOB_NODELIST"` (override: RDZV_HOST), port
#              MASTER_PORT if exported, else 29500 + (job id % 1000) so jobs sharing a node do not collide. Both are
#              computed once here and handed to every node: never localhost, never a per-node value.
#   launch     srun --nodes=N --ntasks-per-node=1 ... PYTHON -m torch.distributed.run (= torchrun) --nnodes=N
#              --nproc_per_node=G --rdzv_backend=c10d --rdzv_endpoint=HOST:PORT --rdzv_id=JOBID
#              -m genlip_mcore.train --config FILE overrides...
#              N: SLURM_JOB_NUM_NODES (or SLURM_NNODES). G: GPUS_PER_NODE if exported, else SLURM_GPUS_ON_NODE,
#              SLURM_GPUS_PER_NODE, the `nvidia-smi -L` count, or 8. PYTHON: exported PYTHON, else .venv/bin/python
#              of the checkout when present, else python3.
#
# Dry run (DRY_RUN=1 or --dry-run) prints the environment and the exact command as a bash snippet and exits 0.
# Inside an allocation (or with SLURM_JOB_ID, SLURM_JOB_NODELIST, SLURM_JOB_NUM_NODES, ... simulated, and an
# `scontrol` on PATH) it shows the real launch. Outside one it shows a one-node launch on localhost with job id
# "dryrun", and says so. Without DRY_RUN, outside an allocation, the script stops with an error.
#
# Every NCCL/CUDA/OpenMP variable below is a default: export your own value before sbatch to replace it (sbatch
# passes the submitting environment to the job).
#
# ---- resources: change these to fit your cluster (command-line sbatch options override them) ------------------
# 8 nodes x 8 GPUs = 64 GPUs = TP 2 x DP 32, the layout the g16 configs are sized for (global batch 512 rows).
#SBATCH --job-name=genlip-g16
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
# CPUs for torchrun + 8 ranks + their data-loader workers (8 per rank in the configs); use your node's core count.
#SBATCH --cpus-per-task=96
#SBATCH --mem=0
#SBATCH --exclusive
# Your partition's limit. A job that hits it stops; resubmit with the same training.run_dir to continue.
#SBATCH --time=24:00:00
#SBATCH --output=logs/%x-%j.out
# Requeue after node failure or preemption; the requeued job resumes from <run dir>/checkpoints/latest.
#SBATCH --requeue
# Usually needed as well:
##SBATCH --partition=gpu
##SBATCH --account=my-account
set -euo pipefail

NAME=pretrain_genlip_g16
die() { echo "[$NAME] error: $*" >&2; exit 2; }
usage() { sed -n '2,8p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

# ---- the checkout: sbatch runs a copy of this file from Slurm's spool directory, so fall back to the submit dir --
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [[ -n "${GENLIP_ROOT:-}" ]]; then
    ROOT="$GENLIP_ROOT"
elif [[ -d "$here/genlip_mcore" ]]; then
    ROOT="$here"
elif [[ -n "${SLURM_SUBMIT_DIR:-}" && -d "$SLURM_SUBMIT_DIR/genlip_mcore" ]]; then
    ROOT="$SLURM_SUBMIT_DIR"
else
    die "cannot find the genlip_mcore checkout: submit from the repository root or export GENLIP_ROOT=/path/to/it"
fi
cd "$ROOT"

# ---- arguments ---------------------------------------------------------------------------------------------------
case "${DRY_RUN:-0}" in
    1 | true | yes) dry=1 ;;
    0 | false | no | "") dry=0 ;;
    *) die "DRY_RUN=${DRY_RUN}: use 1 or 0" ;;
esac
stage=1
config=""
overrides=()
while (($#)); do
    case "$1" in
        --stage) (($# >= 2)) || die "--stage needs 1 or 2"; stage="$2"; shift 2 ;;
        --stage=*) stage="${1#*=}"; shift ;;
        --config) (($# >= 2)) || die "--config needs a file"; config="$2"; shift 2 ;;
        --config=*) config="${1#*=}"; shift ;;
        --dry-run) dry=1; shift ;;
        -h | --help) usage; exit 0 ;;
        --) shift; overrides+=("$@"); break ;;
        -*) die "unknown option $1 (sbatch options such as --nodes go before the script name:" \
                "sbatch --nodes=16 scripts/$NAME.sh ...)" ;;
        *=*) overrides+=("$1"); shift ;;
        *) die "unexpected argument '$1': overrides are section.key=value" ;;
    esac
done
[[ "$stage" == 1 || "$stage" == 2 ]] || die "--stage $stage: use 1 or 2"
config="${config:-examples/configs/g16_stage${stage}.yaml}"
[[ -f "$config" ]] || die "--config $config: no such file (relative paths are relative to $ROOT)"

# The last occurrence of `key=...` among the overrides, or empty (`set -u` safe on an empty array).
override_value() {
    local item value=""
    for item in ${overrides[@]+"${overrides[@]}"}; do
        [[ "$item" == "$1="* ]] && value="${item#*=}"
    done
    printf '%s' "$value"
}
has_override() {
    local item
    for item in ${overrides[@]+"${overrides[@]}"}; do [[ "$item" == "$1="* ]] && return 0; done
    return 1
}

# ---- the allocation ----------------------------------------------------------------------------------------------
notes=()
if [[ -z "${SLURM_JOB_ID:-}" ]]; then
    ((dry)) || die "not inside a Slurm allocation (SLURM_JOB_ID is unset). Submit with" \
        "'sbatch scripts/$NAME.sh ...', run it with bash inside salloc, or print the launch with DRY_RUN=1."
    notes+=("not inside a Slurm allocation: showing a one-node launch on localhost with placeholder job id 'dryrun'")
    job_id=dryrun
    job_name="${SLURM_JOB_NAME:-genlip-g16}"
    hosts=(localhost)
    nnodes=1
else
    job_id="$SLURM_JOB_ID"
    job_name="${SLURM_JOB_NAME:-genlip-g16}"
    nodelist="${SLURM_JOB_NODELIST:-${SLURM_NODELIST:-}}"
    [[ -n "$nodelist" ]] || die "SLURM_JOB_ID is set but SLURM_JOB_NODELIST is not"
    command -v scontrol >/dev/null || die "scontrol not found on PATH (needed to expand SLURM_JOB_NODELIST=$nodelist)"
    mapfile -t hosts < <(scontrol show hostnames "$nodelist")
    ((${#hosts[@]} >= 1)) || die "scontrol show hostnames '$nodelist' printed no host"
    nnodes="${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-${#hosts[@]}}}"
    if [[ "${SLURM_RESTART_COUNT:-0}" != 0 ]]; then notes+=("requeued job, restart ${SLURM_RESTART_COUNT}"); fi
fi
rdzv_host="${RDZV_HOST:-${hosts[0]}}"
if [[ -n "${MASTER_PORT:-}" ]]; then
    rdzv_port="$MASTER_PORT"
elif [[ "$job_id" =~ ^[0-9]+$ ]]; then
    rdzv_port=$((29500 + job_id % 1000))
else
    rdzv_port=29500
fi

gpus="${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-}}}"
gpus="${gpus##*:}"                                  # SLURM_GPUS_PER_NODE may read "h100:8"
if [[ -z "$gpus" ]] && command -v nvidia-smi >/dev/null; then
    gpus="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)"
    [[ "$gpus" != 0 ]] || gpus=""
fi
gpus="${gpus:-8}"
[[ "$gpus" =~ ^[1-9][0-9]*$ ]] || die "GPUs per node '$gpus' is not a positive integer (set GPUS_PER_NODE)"
[[ "$nnodes" =~ ^[1-9][0-9]*$ ]] || die "node count '$nnodes' is not a positive integer"

# ---- environment: defaults only; a value exported before sbatch wins ------------------------------------------------
cpus="${SLURM_CPUS_PER_TASK:-$(nproc)}"
omp=$((cpus / gpus)); ((omp >= 1)) || omp=1
# One hardware work queue per device, so the TP/SP communication kernels start in issue order and overlap with
# the compute queued after them (Megatron-LM requires this setting with sequence parallelism).
export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"
# InfiniBand retry timeout 4.096 us x 2^22 ~ 17 s: ride out short fabric hiccups instead of failing the job.
export NCCL_IB_TIMEOUT="${NCCL_IB_TIMEOUT:-22}"
# A failed or timed-out collective kills the process, so torchrun and srun end the job instead of hanging.
# (torch < 2.2 reads the older, now deprecated name NCCL_ASYNC_ERROR_HANDLING; export it yourself there.)
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}"
# NCCL warnings and errors only; use INFO (and NCCL_DEBUG_SUBSYS=INIT,NET) to debug the network set-up.
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
# CPU threads per rank: this task's CPUs shared by the node's ranks (torchrun would otherwise force 1).
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$omp}"
# Python stack traces of every thread on a crash or a fatal signal: the first thing to read after a hang kill.
export PYTHONFAULTHANDLER="${PYTHONFAULTHANDLER:-1}"
env_shown=(CUDA_DEVICE_MAX_CONNECTIONS NCCL_IB_TIMEOUT TORCH_NCCL_ASYNC_ERROR_HANDLING NCCL_DEBUG OMP_NUM_THREADS
           PYTHONFAULTHANDLER)
[[ -z "${NCCL_ASYNC_ERROR_HANDLING:-}" ]] || env_shown+=(NCCL_ASYNC_ERROR_HANDLING)

# ---- run dir and auto-resume -------------------------------------------------------------------------------------
added=()
if has_override training.run_dir; then
    run_dir="$(override_value training.run_dir)"
else
    run_dir="runs/${job_name}-${job_id}"
    added+=("training.run_dir=$run_dir")
fi
save_dir="$(override_value training.save_dir)"
save_dir="${save_dir:-$run_dir/checkpoints}"
if has_override training.load_dir; then
    notes+=("resume: training.load_dir given, used as is")
elif [[ -f "$save_dir/latest" ]]; then
    added+=("training.load_dir=$save_dir" "training.init_from=null")
    notes+=("resume: $save_dir/latest names $(head -n1 "$save_dir/latest"); resuming from it")
else
    notes+=("fresh start: no $save_dir/latest")
fi
if [[ "$config" == *g16_stage2.yaml ]] && ! has_override training.init_from && ! has_override training.load_dir \
        && [[ ! -f "$save_dir/latest" ]]; then
    notes+=("stage 2 without training.init_from starts from random weights; pass the stage-1 checkpoint or export")
fi
if ! has_override training.save_interval && ! grep -Eq '^[[:space:]]+save_interval:[[:space:]]*[1-9]' "$config"; then
    notes+=("no training.save_interval: checkpoints only at the end, so a requeued or restarted job starts over;" \
            "pass training.save_interval=N to make it resumable")
fi

# ---- the command ---------------------------------------------------------------------------------------------------
if [[ -n "${PYTHON:-}" ]]; then
    python="$PYTHON"
elif [[ -x "$ROOT/.venv/bin/python" ]]; then
    python="$ROOT/.venv/bin/python"
else
    python=python3
fi
# srun does not inherit --cpus-per-task from sbatch (Slurm >= 22.05): without it every task gets one CPU.
srun_args=(srun "--nodes=$nnodes" "--ntasks=$nnodes" --ntasks-per-node=1 --kill-on-bad-exit=1)
[[ -z "${SLURM_CPUS_PER_TASK:-}" ]] || srun_args+=("--cpus-per-task=$SLURM_CPUS_PER_TASK")
cmd=("${srun_args[@]}"
     "$python" -m torch.distributed.run
     "--nnodes=$nnodes" "--nproc_per_node=$gpus"
     --rdzv_backend=c10d "--rdzv_endpoint=$rdzv_host:$rdzv_port" "--rdzv_id=$job_id"
     -m genlip_mcore.train --config "$config"
     ${overrides[@]+"${overrides[@]}"} ${added[@]+"${added[@]}"})

# Printed as a bash snippet that reproduces the launch: `# ...` lines, the exports, then the command (printf %q).
{
    if ((dry)); then echo "# $NAME: dry run, nothing is started"; fi
    echo "# job $job_id ($job_name): $nnodes node(s) [${hosts[*]}], $gpus GPU(s) per node, rendezvous $rdzv_host:$rdzv_port"
    echo "# config $config, run dir $run_dir, cwd $ROOT"
    for note in "${notes[@]}"; do echo "# $note"; done
    echo "cd $(printf '%q' "$ROOT")"
    for var in "${env_shown[@]}"; do echo "export $var=$(printf '%q' "${!var}")"; done
    printf '%q ' "${cmd[@]}" | sed 's/ $//'
    echo
}
((dry)) && exit 0
exec "${cmd[@]}"
