#!/usr/bin/env bash
# On a fresh Cloud TPU VM: installs JAX for TPU and this project into .venv, then serves with prod.sh.
#
#   bash tpu_setup.sh                                   # the shipped model, every chip on the data axis
#   DOWNLOAD=1558M MODELS=1558M MESH=model:4 bash tpu_setup.sh    # 1558M split over 4 chips
#   HOST=0.0.0.0 API_KEYS=secret bash tpu_setup.sh      # reachable from other machines (with a key)
#
# A slice of several hosts (v4-32, v5e-16, ...) is one SPMD program: run the same command on every host
# at once with DISTRIBUTED=auto (JAX finds the hosts and their order); host 0 serves HTTP, the others
# follow it (gpt2jax/engine/multihost.py). Every host needs the model files, hence DOWNLOAD:
#   gcloud compute tpus tpu-vm ssh NAME --zone ZONE --worker=all --command \
#     "cd gpt2jax && DISTRIBUTED=auto DOWNLOAD=1558M MODELS=1558M MESH=model:4 bash tpu_setup.sh"
# Any other setting of prod.sh / README.md (PORT, SLOTS, DTYPE, ...) passes through the environment.
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/pip install -q --upgrade pip
# jax[tpu] brings jaxlib and libtpu from PyPI; the project's own dependencies come with it.
.venv/bin/pip install -q -e ".[tpu]"
.venv/bin/python -c "import jax, libtpu; print('tpu_setup.sh: JAX', jax.__version__, 'for TPU installed')"

if [ -n "${DOWNLOAD:-}" ] && [ ! -d "checkpoints/${DOWNLOAD}" ]; then
  .venv/bin/python download_model.py "$DOWNLOAD"
fi
exec bash prod.sh "$@"
