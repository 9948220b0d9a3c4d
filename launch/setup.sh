#!/usr/bin/env bash
# Idempotent set-up: a virtual environment in .venv with the project (editable) and its test dependencies.
# torch 2.14.1 / torchvision 0.29.1 is the newest pair that installs together (open_clip needs torchvision).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
.venv/bin/python -m pip install -q -e ".[test]"
# DeepSpeed on a CPU JIT-compiles its shared-memory collective op at the first launch (~30 s, minutes when the
# cores are busy); built here once (cached in ~/.cache/torch_extensions), so that no run or test waits for it.
.venv/bin/python - <<'PY'
import torch
if not torch.cuda.is_available():
    try:
        from deepspeed.accelerator import get_accelerator
        builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
        if builder is not None and builder.is_compatible():
            builder.load(verbose=False)
    except Exception as e:  # not fatal: DeepSpeed then builds it at its first launch, as it would have anyway
        print(f"note: DeepSpeed's CPU op was not prebuilt ({type(e).__name__}: {e}); it is built at the first launch")
PY
.venv/bin/python -c "import torch, torchvision, diffusion; print('set-up OK: torch', torch.__version__)"
