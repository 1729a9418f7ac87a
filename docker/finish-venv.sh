#!/bin/sh
# The serving venv's last step (Dockerfile, stages builder and builder-gpu), after torch: the pinned serving
# dependencies; torch's C++ headers and test binaries go (about 190 MB, never loaded to serve); the imports
# are checked. --cuda: refuse a torch that is not a CUDA build (the gpu image would never use the GPU).
set -eu
python=/opt/venv/bin/python
$python -m pip install -r /tmp/requirements-serve.txt
torch=$($python -c "import torch, os; print(os.path.dirname(torch.__file__))")
rm -rf "$torch/include" "$torch/test" "$torch"/bin/test_* "$torch"/bin/*Test "$torch"/bin/protoc*
$python -c "import torch, ts, PIL, numpy, yaml, psutil; print('torch', torch.__version__, 'CUDA', torch.version.cuda)"
if [ "${1:-}" = "--cuda" ]; then
    $python -c "import sys, torch; sys.exit(None if torch.version.cuda else
        f'torch {torch.__version__} is not a CUDA build: pass a CUDA index as GPU_TORCH_INDEX_URL')"
fi
