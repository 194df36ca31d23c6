#!/usr/bin/env bash
# Offline Fashion-MNIST from Debian's "dataset-fashion-mnist" package (bookworm/main), which ships the
# original gzipped IDX files in /usr/share/datasets/fashion-mnist/. They are decompressed into
# <root>/FashionMNIST/raw/, where torchvision's FashionMNIST loader reads them.
#
# Usage: bash scripts/fetch_fashion_mnist.sh [root]      (root defaults to "data")
# As root the package is installed with apt-get; otherwise (or with FASHION_MNIST_NO_INSTALL=1) the .deb
# is only downloaded and unpacked into a temporary folder, which needs no privileges.
set -euo pipefail

root="${1:-data}"
raw="$root/FashionMNIST/raw"
pkg="dataset-fashion-mnist"
src="/usr/share/datasets/fashion-mnist"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

files=(train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte t10k-labels-idx1-ubyte)

have_all() { for f in "${files[@]}"; do [[ -f "$1/$f.gz" ]] || return 1; done; }

if ! have_all "$src"; then
    command -v apt-get >/dev/null || { echo "fetch_fashion_mnist.sh: apt-get not found (Debian/Ubuntu only)" >&2; exit 1; }
    if [[ "$(id -u)" == 0 && -z "${FASHION_MNIST_NO_INSTALL:-}" ]]; then
        DEBIAN_FRONTEND=noninteractive apt-get install -y "$pkg" >&2
    else
        (cd "$work" && apt-get download "$pkg" >&2)
        dpkg-deb -x "$work"/"$pkg"_*.deb "$work/root"
        src="$work/root/usr/share/datasets/fashion-mnist"
    fi
fi
have_all "$src" || { echo "fetch_fashion_mnist.sh: $pkg did not provide the IDX files in $src" >&2; exit 1; }

mkdir -p "$raw"
for f in "${files[@]}"; do
    gzip -dc "$src/$f.gz" > "$raw/$f.tmp"
    mv "$raw/$f.tmp" "$raw/$f"
done
echo "Fashion-MNIST IDX files are in $raw" >&2
