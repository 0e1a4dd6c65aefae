#!/usr/bin/env bash
# tuner launcher.
#   ./launch.sh RECIPE [section.key=value ...]     train (one process per GPU)
#   ./launch.sh --num-processes N [--config-file F] RECIPE [overrides]
#   ./launch.sh test [--slow] [pytest args]         lint + the fast tests (--slow: all but gpu)
#   ./launch.sh tuner ARGS...                       any tuner command (sample, grid, export, ...)
# On first use it creates .venv next to this file when `tuner` is not importable.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="$ROOT/.venv"
cd "$ROOT"

say() { printf '[launch] %s\n' "$*" >&2; }

has_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }

install_torch() {
  local py="$1"
  if "$py" -c "import torch" 2>/dev/null; then return; fi
  if has_gpu; then
    say "NVIDIA GPU found: installing the CUDA build of torch"
    "$py" -m pip install "torch>=2.4"
  else
    # No GPU: the CPU build is ~10x smaller. The pinned release is what offline mirrors carry.
    say "no GPU: installing a CPU build of torch"
    "$py" -m pip install --timeout 15 --retries 0 torch \
        --index-url https://download.pytorch.org/whl/cpu 2>/dev/null \
      || "$py" -m pip install "torch==2.13.0"
  fi
}

# The install reflects pyproject.toml (dependencies, entry points) as of its last install.
install_stamp() { sha256sum "$ROOT/pyproject.toml" | cut -d' ' -f1; }
STAMP="$VENV/.tuner-pyproject"

# What each extra of pyproject.toml brings, as import names (an env lacking one reinstalls).
extra_modules() {
  local optimizers="prodigyopt, came_pytorch, schedulefree"
  case "$1" in
    test) echo "pytest, ruff, wandb, $optimizers" ;;
    optimizers) echo "$optimizers" ;;
  esac
}

ensure_env() {
  local extra="$1"
  local py="python3"
  if [ -x "$VENV/bin/python" ]; then py="$VENV/bin/python"; fi
  # Checked from / so that the source folder itself does not count as "installed".
  if (cd / && "$py" -c "import sys, torch, diffusers, peft, accelerate, tuner
sys.exit(0 if tuner.__file__.startswith('$ROOT') else 1)") 2>/dev/null \
      && { [ "$py" != "$VENV/bin/python" ] || [ "$(cat "$STAMP" 2>/dev/null)" = "$(install_stamp)" ]; } \
      && { [ -z "$extra" ] || (cd / && "$py" -c "import $(extra_modules "$extra")") 2>/dev/null; }; then
    PY="$py"; return
  fi
  if [ ! -x "$VENV/bin/python" ]; then
    say "creating $VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
  fi
  PY="$VENV/bin/python"
  install_torch "$PY"
  say "installing tuner${extra:+ with [$extra]}"
  "$PY" -m pip install -q -e "$ROOT${extra:+[$extra]}"
  install_stamp > "$STAMP"
}

gpu_count() {
  "$PY" -c "import torch; print(max(torch.cuda.device_count(), 1))"
}

if [ "${1:-}" = "test" ]; then
  shift
  ensure_env test
  say "ruff check"
  "$PY" -m ruff check "$ROOT"
  # The default run skips tests marked slow or gpu (pyproject addopts). --slow: everything but
  # gpu; with -m EXPR as well, the not-gpu tests matching EXPR (-m slow: the slow tier alone).
  slow="" marker="" args=()
  while [ $# -gt 0 ]; do
    case "$1" in
      --slow) slow=1; shift ;;
      -m) marker="${2:?-m needs a marker expression}"; shift 2 ;;
      *) args+=("$1"); shift ;;
    esac
  done
  if [ -n "$slow" ]; then
    marker="not gpu${marker:+ and ($marker)}"
  fi
  say "pytest${marker:+ -m \"$marker\"}"
  exec "$PY" -m pytest ${marker:+-m "$marker"} ${args[@]+"${args[@]}"}
fi

if [ "${1:-}" = "tuner" ]; then
  shift
  ensure_env optimizers
  exec "$PY" -m tuner "$@"
fi

NUM_PROCESSES=""
CONFIG_FILE=""
while [ $# -gt 0 ]; do
  case "$1" in
    --num-processes) NUM_PROCESSES="$2"; shift 2 ;;
    --num-processes=*) NUM_PROCESSES="${1#*=}"; shift ;;
    --config-file) CONFIG_FILE="$2"; shift 2 ;;
    --config-file=*) CONFIG_FILE="${1#*=}"; shift ;;
    -h|--help) sed -n '2,8p' "$0"; exit 0 ;;
    *) break ;;
  esac
done
if [ $# -lt 1 ]; then
  sed -n '2,8p' "$0" >&2
  exit 2
fi

ensure_env optimizers  # train.optimizer may name any of them
# The flags as given, for the resume command tuner prints (Recipe.command).
unset TUNER_NUM_PROCESSES TUNER_CONFIG_FILE
if [ -n "$NUM_PROCESSES" ]; then export TUNER_NUM_PROCESSES="$NUM_PROCESSES"; fi
if [ -n "$CONFIG_FILE" ]; then export TUNER_CONFIG_FILE="$CONFIG_FILE"; fi
NUM_PROCESSES="${NUM_PROCESSES:-$(gpu_count)}"
if ! has_gpu; then
  # Without this, N processes on a CPU-only machine would not join one (gloo) process group.
  export ACCELERATE_USE_CPU=1
  THREADS=$(( $(nproc) / NUM_PROCESSES ))
  export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( THREADS > 0 ? THREADS : 1 ))}"
fi
# exec: the process that `kill`, `timeout`, a supervisor or `docker stop` signals is the trainer
# itself (one process; Accelerator needs no launcher), or tuner's launcher, which forwards
# SIGINT/SIGTERM to its workers and names the rank when one dies.
if [ -n "$CONFIG_FILE" ]; then
  # An accelerate config (DeepSpeed, FSDP, several machines): accelerate's own launcher.
  # --quiet: tuner has already printed its one-line error; without it accelerate (>=1.16)
  # repeats the worker's stderr inside its own traceback. --debug keeps accelerate's traceback.
  QUIET="--quiet"
  for arg in "$@"; do [ "$arg" = "--debug" ] && QUIET=""; done
  exec "$PY" -m accelerate.commands.launch $QUIET --config_file "$CONFIG_FILE" \
    --num_processes "$NUM_PROCESSES" -m tuner train "$@"
fi
if [ "$NUM_PROCESSES" -gt 1 ]; then
  exec "$PY" -m tuner.cli.launch "$NUM_PROCESSES" "$@"
fi
# mixed precision comes from the recipe (train.mixed_precision).
exec "$PY" -m tuner train "$@"
