#!/usr/bin/env bash
# Build bench/device/_bundle/: what the GPU machine lacks for `rayseg train --use-gpu` under Ray.
#
# The device machine (Python 3.12, torch 2.11 + CUDA, torchvision, pandas, pyarrow, grpcio, aiohttp,
# msgpack, protobuf, opencv already there; no network) takes at most 64 MiB of working tree per call.
# Ray 2.60's cp312 wheel is 79 MB, but 33 MB of it is ray/jars (Ray's Java API only): the unpacked
# wheel without it, xz-compressed, is about 28 MB. The other wheels are the packages Ray, Ray Train,
# Ray's dashboard and rayseg need that the device image does not have (one version each).
# Usage: bash bench/device/bundle.sh   (here, with pip reaching PyPI); then run.sh there.
set -euo pipefail
cd "$(dirname "$0")"
OUT=_bundle
RAY_VERSION=2.60.0
# name==version pins keep one version of each; versions as resolved for this project's venv.
EXTRA=(
  jsonschema jsonschema-specifications referencing rpds-py
  pydantic pydantic-core annotated-types typing-inspection
  tensorboardX pycocotools msgspec
  aiohttp-cors colorful smart-open opencensus opencensus-context google-api-core
  googleapis-common-protos proto-plus google-auth pyasn1-modules pyasn1 cachetools rsa
  opentelemetry-sdk opentelemetry-api opentelemetry-exporter-prometheus opentelemetry-proto
  opentelemetry-semantic-conventions virtualenv distlib platformdirs py-spy
)
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64
  --platform manylinux_2_24_x86_64 --platform manylinux_2_31_x86_64 --platform any)
PIP=(python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12
  --implementation cp "${PLATFORMS[@]}")

rm -rf "$OUT" && mkdir -p "$OUT/wheels" /tmp/rayseg-bundle
pin() {  # the version this project's venv resolved, so both sides agree
  ../../.venv/bin/python -c "import importlib.metadata as m,sys; print(m.version(sys.argv[1]))" "$1" \
    2>/dev/null || true
}
for name in "${EXTRA[@]}"; do
  v=$(pin "$name")
  "${PIP[@]}" -d "$OUT/wheels" "$name${v:+==$v}" || "${PIP[@]}" -d "$OUT/wheels" "$name"
done
"${PIP[@]}" -d /tmp/rayseg-bundle "ray==$RAY_VERSION"
rm -rf /tmp/rayseg-bundle/ray-site && mkdir -p /tmp/rayseg-bundle/ray-site
python3 -m zipfile -e /tmp/rayseg-bundle/ray-$RAY_VERSION-*.whl /tmp/rayseg-bundle/ray-site
rm -rf /tmp/rayseg-bundle/ray-site/ray/jars
tar -C /tmp/rayseg-bundle/ray-site -cf - . | xz -9 -T2 > "$OUT/ray-site.tar.xz"
du -sh "$OUT/wheels" "$OUT/ray-site.tar.xz"
du -sb "$OUT" | awk '{printf "bundle: %.1f MiB (limit 64 MiB with the working tree)\n", $1/1048576}'
