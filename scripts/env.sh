# Environment for every rlhf_ray command run from this checkout: caches inside the project, no hub.
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export RLHF_RAY_CACHE="${RLHF_RAY_CACHE:-$ROOT/.cache}"
export HF_HOME="$RLHF_RAY_CACHE/hf"
export HF_HUB_OFFLINE=1
export TRANSFORMERS_OFFLINE=1
export HF_DATASETS_OFFLINE=1
export TORCH_EXTENSIONS_DIR="$RLHF_RAY_CACHE/torch_extensions"
export VLLM_CACHE_ROOT="$RLHF_RAY_CACHE/vllm"
export TRITON_CACHE_DIR="$RLHF_RAY_CACHE/triton"
export MPLCONFIGDIR="$RLHF_RAY_CACHE/matplotlib"
export RAY_USAGE_STATS_ENABLED=0
export TOKENIZERS_PARALLELISM=false
