#!/usr/bin/env bash
# Check the bundle in a real MONAI Label server: build MONAI Label's own environment, install this package into
# it the normal way, then run scripts/monailabel_check.py (start the server on 127.0.0.1, check over HTTP, stop).
#
#   bash scripts/monailabel_check.sh            # builds .venv-monailabel once (about 8 GB, 4 minutes), then checks
#
# MONAI Label 0.8.5 cannot share the project's environment: it needs numpy<2, jsonschema<4 and pydicom<3 (through
# pydicom-seg) and imports torchvision, whose PyPI build does not load beside the CPU torch 2.13.0 wheel. So the
# environment gets torch 2.14.1 with torchvision 0.29.1, monailabel with --no-deps and its requirements except
# sam2 (the SAM2 models, which need a checkpoint download this bundle does not use), then this package with its
# dependencies resolved against what is already there: a requirement of ours that broke one of MONAI Label's pins
# would fail `pip check` here.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

python=${PYTHON:-python3}
venv=${MONAILABEL_VENV:-.venv-monailabel}
pip=("$venv/bin/python" -m pip install --disable-pip-version-check -q)

built="$venv/.monailabel-0.8.5-built"  # written last: a half-built environment is built again
if [ ! -f "$built" ]; then
  echo "monailabel_check: building $venv"
  "$python" -m venv "$venv"
  "${pip[@]}" torch==2.14.1 torchvision==0.29.1
  "${pip[@]}" --no-deps monailabel==0.8.5
  # monailabel 0.8.5's requirements (its wheel metadata) without sam2; monai with the extras it asks for. Its
  # pydicom-seg imports pydicom._storage_sopclass_uids, gone in pydicom 3, without saying so in its metadata:
  # pydicom<3, and the releases of pynetdicom and dicomweb-client that still accept it.
  "${pip[@]}" "numpy<2" "monai[fire,gdown,ignite,itk,lmdb,mlflow,nibabel,openslide,pillow,psutil,skimage,tensorboard,torchvision,tqdm]==1.6.1" \
    "uvicorn>=0.29.0" "pydantic>=2.7.0" "pydantic-settings>=2.2.1" "python-dotenv>=1.0.1" "fastapi>=0.110.2" \
    "python-multipart>=0.0.9" "httpx>=0.27.0" "schedule>=1.2.1" "dicomweb-client[gcp]>=0.59.1,<0.60" "timeloop>=1.0.2" \
    "expiringdict>=1.2.2" "expiring_dict>=1.1.0" "cachetools>=5.3.3" "watchdog>=4.0.0" "pydicom>=2.4.4,<3" \
    "pydicom-seg>=0.4.1" "pynetdicom>=2.0.2,<3" "pynrrd>=1.0.0" "numpymaxflow>=0.0.7" "girder-client>=3.2.3" \
    "ninja>=1.11.1.1" "einops>=0.7.0" "pyyaml>=6.0.1" "filelock>=3.11.0" "passlib>=1.7.4" "pyjwt>=2.8.0" \
    "bcrypt>=4.1.2" "shapely>=2.0.4" "requests>=2.31.0" "requests-toolbelt>=1.0.0" "urllib3>=2.2.1" \
    scikit-learn scipy "google-auth>=2.29.0"
  touch "$built"
fi
# Normally, with dependencies: the package must install beside MONAI Label's pins without moving them.
"${pip[@]}" .
# pip check lists every broken requirement; the only one allowed is the sam2 that is left out on purpose
problems=$("$venv/bin/python" -m pip check 2>&1 | grep -v "requires sam2, which is not installed" || true)
if [ -n "$problems" ] && [ "$problems" != "No broken requirements found." ]; then
  echo "monailabel_check: installing jointssl_monai broke MONAI Label's requirements:" >&2
  echo "$problems" >&2
  exit 1
fi
exec "$venv/bin/python" scripts/monailabel_check.py "$@"
