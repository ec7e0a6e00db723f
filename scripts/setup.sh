#!/usr/bin/env bash
# Set up jointssl_monai in a virtual environment (./.venv) on a fresh machine.
#
#   bash scripts/setup.sh          # the package, its dependencies and the real sample images
#   bash scripts/setup.sh --test   # the same plus the test tools
#   bash scripts/setup.sh --dev    # the same plus ruff, mypy, matplotlib and headless Chromium (report test)
#
# torch is installed first and pinned (TORCH_SPEC, default torch==2.13.0, a CPU build), so that pip never pulls a
# multi-GB CUDA build on a CPU machine. GPU users: create .venv and install the CUDA build of torch they want into
# it before running this script; an installed torch is kept.
# The real sample images come from Debian packages (mricron-data, insighttoolkit5-examples), and with --dev the
# test of `jointssl report` opens its page in Debian's headless Chromium (chromium, chromium-driver); they are
# installed when apt-get can run as root, otherwise the script says what to install (JOINTSSL_SKIP_APT=1 skips).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

extras=""
for arg in "$@"; do
  case "$arg" in
    --test) extras="test" ;;
    --dev) extras="dev" ;;
    *) echo "setup.sh: unknown option $arg (use --test or --dev)" >&2; exit 2 ;;
  esac
done

python=${PYTHON:-python3}
venv=.venv
torch_spec=${TORCH_SPEC:-torch==2.13.0}
debian_data="mricron-data insighttoolkit5-examples"
debian_packages=$debian_data
if [ "$extras" = dev ]; then debian_packages="$debian_packages chromium chromium-driver"; fi

[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip install --disable-pip-version-check -q)

if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
  echo "setup: installing $torch_spec"
  "${pip[@]}" "$torch_spec"
fi
echo "setup: installing jointssl_monai${extras:+[$extras]}"
"${pip[@]}" -e ".${extras:+[$extras]}"

if [ "${JOINTSSL_SKIP_APT:-0}" != 1 ]; then
  if dpkg -s $debian_packages >/dev/null 2>&1; then
    :
  elif command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    echo "setup: installing the Debian packages: $debian_packages"
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q $debian_packages >/dev/null
  else
    echo "setup: the real sample images (and, with --dev, the report test's browser) need:" \
      "sudo apt-get install -y $debian_packages" >&2
  fi
fi
"$venv/bin/jointssl" version >/dev/null
echo "setup: done ($("$venv/bin/python" -c 'import torch, monai; print("torch", torch.__version__, "monai", monai.__version__)'))"
