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
#              training.load_dir. The stage configs save about hourly (training.save_interval).
#   rendezvous the first host of `scontrol show hostnames "$SLURM_JOB_NODELIST"` (override: RDZV_HOST, an address
#              of that first node), port MASTER_PORT if exported, else 29500 + (job id % 1000) so jobs sharing a
#              node do not collide. Both are computed once here and handed to every node: never localhost, never a
#              per-node value. torchrun's static rendezvous: node SLURM_NODEID 0 hosts the store. (With c10d, the
#              node that hosts the store can exit first at a stop, and the others' torchrun then fails on it.)
#   launch     srun --nodes=N --ntasks-per-node=1 ... PYTHON -c "$TORCHRUN_SHIM" (= torchrun) --nnodes=N
#              --nproc_per_node=G --rdzv_backend=static --rdzv_endpoint=HOST:PORT
#              -m genlip_mcore.train --config FILE overrides...
#              N: SLURM_JOB_NUM_NODES (or SLURM_NNODES). G: GPUS_PER_NODE if exported, else SLURM_GPUS_ON_NODE,
#              SLURM_GPUS_PER_NODE, the `nvidia-smi -L` count, or 8. PYTHON: exported PYTHON, else .venv/bin/python
#              of the checkout when present, else python3.
#              The shim (below) is torchrun that passes stop signals on and takes its node rank from SLURM_NODEID.
#   stop       a stop (SIGUSR1 from --signal before the time limit, SIGTERM or SIGINT to this shell) is sent on as
#              SIGUSR1 to srun, which signals every task; each node's torchrun passes it to its trainers, which
#              agree at the next step boundary, save, and exit 75 (genlip_mcore.train.stop). The job then exits 75,
#              and a job submitted with --requeue (the default here) requeues itself and resumes from that save.
#              A stop that slurm itself sends to every process (scancel without --signal, preemption) saves only
#              if the save fits in the cluster's KillWait, after which slurm sends SIGKILL.
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
# Your partition's limit. The stage-1 configs save and exit 30 min before 24 h (training.exit_duration_mins).
#SBATCH --time=24:00:00
# SIGUSR1 to this batch shell 300 s before the limit: the run saves and exits 75, and the job requeues. The lead
# must cover one step and one save at your layout (the log shows both: elapsed time per iteration, and the time
# between "stop requested" and "saved checkpoint"). g16 at TP2 x DP32: a step is ~2.6 s, a checkpoint ~1.4e9
# params x ~14 B (bf16 weights, fp32 master and Adam) ~ 20 GB, ~200 s even at 100 MB/s, hence 300.
#SBATCH --signal=B:USR1@300
#SBATCH --output=logs/%x-%j.out
# A requeued job keeps its job id, hence its log file: append to it rather than start it over.
#SBATCH --open-mode=append
# Requeue after node failure, preemption or a graceful stop (exit 75); the requeued job resumes from
# <run dir>/checkpoints/latest.
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
# torchrun for one node, its node rank that of the slurm task's node (one srun command line cannot spell a per-node
# value), and changed in two ways so that a stop ends in a checkpoint (no single quotes in it: the snippet below
# prints it in them):
# - SIGUSR1 or SIGTERM to it is passed on to its workers, the trainers, which run in sessions of their own (so a
#   signal to the task's process group misses them). torchrun would die of SIGUSR1, and on SIGTERM it ends its
#   workers itself, SIGKILL 30 s later, before a g16 save is done. A trainer that also gets the signal from slurm
#   directly (proctrack/cgroup or linuxproc signal the whole tree) counts the two as one request.
# - it exits with its workers' code: 75 when they stopped with a checkpoint, where torchrun exits 1 on any failure.
#   A 75 is only reached after the collective save, so workers that torchrun or srun ended after it do not count.
#   Once it knows the code it ignores those signals: the first task to exit 75 makes srun (--kill-on-bad-exit)
#   send SIGTERM to the others, and a task that died of it would make srun exit 143, not 75.
TORCHRUN_SHIM='import os, signal, sys
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import main


def forward(signum, frame):
    me = str(os.getpid())
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[1] == me:
                    os.kill(int(pid), signum)
        except (OSError, IndexError):
            pass


os.environ.setdefault("PET_NODE_RANK", os.environ.get("SLURM_NODEID", "0"))  # torchrun --node-rank, per node
os.environ["PET_SIGNALS_TO_HANDLE"] = "SIGINT,SIGHUP,SIGQUIT"            # torchrun --signals-to-handle
os.environ["TORCHELASTIC_SIGNALS_TO_HANDLE"] = "SIGINT,SIGHUP,SIGQUIT"     # what the agent reads
signal.signal(signal.SIGUSR1, forward)
signal.signal(signal.SIGTERM, forward)
try:
    main(sys.argv[1:])
except ChildFailedError as e:
    for s in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(s, signal.SIG_IGN)
    codes = {f.exitcode for f in e.failures.values() if f.exitcode > 0}
    if codes != {75}:
        print(e.format_msg(), file=sys.stderr)
    sys.exit(codes.pop() if len(codes) == 1 else 1)
'
# srun does not inherit --cpus-per-task from sbatch (Slurm >= 22.05): without it every task gets one CPU.
srun_args=(srun "--nodes=$nnodes" "--ntasks=$nnodes" --ntasks-per-node=1 --kill-on-bad-exit=1)
[[ -z "${SLURM_CPUS_PER_TASK:-}" ]] || srun_args+=("--cpus-per-task=$SLURM_CPUS_PER_TASK")
cmd=("${srun_args[@]}"
     "$python" -c "$TORCHRUN_SHIM"
     "--nnodes=$nnodes" "--nproc_per_node=$gpus"
     --rdzv_backend=static "--rdzv_endpoint=$rdzv_host:$rdzv_port"
     -m genlip_mcore.train --config "$config"
     ${overrides[@]+"${overrides[@]}"} ${added[@]+"${added[@]}"})

# Printed as a bash snippet that reproduces the launch: `# ...` lines, the exports, the shim, then the command
# (printf %q, with the shim as "$TORCHRUN_SHIM").
{
    if ((dry)); then echo "# $NAME: dry run, nothing is started"; fi
    echo "# job $job_id ($job_name): $nnodes node(s) [${hosts[*]}], $gpus GPU(s) per node, rendezvous $rdzv_host:$rdzv_port"
    echo "# config $config, run dir $run_dir, cwd $ROOT"
    for note in "${notes[@]}"; do echo "# $note"; done
    echo "cd $(printf '%q' "$ROOT")"
    for var in "${env_shown[@]}"; do echo "export $var=$(printf '%q' "${!var}")"; done
    echo "TORCHRUN_SHIM='$TORCHRUN_SHIM'"
    for arg in "${cmd[@]}"; do
        if [[ "$arg" == "$TORCHRUN_SHIM" ]]; then printf '"$TORCHRUN_SHIM" '; else printf '%q ' "$arg"; fi
    done | sed 's/ $//'
    echo
}
((dry)) && exit 0

# srun runs in the background so that this shell can take the stop signals: `--signal=B:USR1@...` and SIGTERM reach
# only the batch shell, and sent on as SIGUSR1 to srun they reach every task (see "stop" at the top). SIGINT too:
# Ctrl-C in an salloc session, where srun in the background ignores it. A second one aborts the save.
srun_pid=""
interrupted=0
send_stop() {
    interrupted=1
    echo "[$NAME] $1: asking the trainers to save and stop (SIGUSR1 to every task)" >&2
    [[ -z "$srun_pid" ]] || kill -USR1 "$srun_pid" 2>/dev/null || true
}
trap 'send_stop SIGUSR1' USR1
trap 'send_stop SIGTERM' TERM
trap 'send_stop SIGINT' INT
"${cmd[@]}" &
srun_pid=$!
while :; do
    interrupted=0
    rc=0; wait "$srun_pid" || rc=$?
    ((interrupted && rc > 128)) || break                        # srun ended, not a trap
    kill -0 "$srun_pid" 2>/dev/null && continue
    last=0; wait "$srun_pid" || last=$?; ((last == 127)) || rc=$last  # srun ended during the trap: its status
    break
done
trap - USR1 TERM INT

if ((rc == 75)); then
    if [[ "$job_id" != dryrun ]] && scontrol show job "$job_id" 2>/dev/null | grep -q 'Requeue=1.*BatchFlag=1'; then
        echo "[$NAME] the run saved and stopped (exit 75): requeueing job $job_id, which resumes from $save_dir" >&2
        scontrol requeue "$job_id" || echo "[$NAME] requeue failed: resubmit with training.run_dir=$run_dir" >&2
    else
        echo "[$NAME] the run saved and stopped (exit 75): resubmit with training.run_dir=$run_dir to resume" >&2
    fi
fi
exit "$rc"
