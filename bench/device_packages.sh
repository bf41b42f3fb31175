#!/usr/bin/env bash
# Packs what bench/gpu_all.sh needs on a lent GPU machine (Python 3.12, its own torch; no internet
# there) into .whl/site312.tar.xz, under the device tool's 64 MiB limit on what travels: the wheels
# of bench/device-requirements.txt installed for cp312, less what no bench touches (Ray's Java jar
# and dashboard web client, RLlib, Ray LLM, MLflow's web UI, diffusers pipelines other than
# Würstchen's). gpu_all.sh unpacks it when it finds it; name `.whl` in the device call's carry.
#
#     bench/device_packages.sh        # ~2 minutes; .whl/ is git-ignored
set -euo pipefail
cd "$(dirname "$0")/.."
downloads=$(mktemp -d)
site=$(mktemp -d)
trap 'rm -rf "$downloads" "$site"' EXIT
platforms=()
for platform in manylinux_2_34_x86_64 manylinux_2_31_x86_64 manylinux_2_28_x86_64 manylinux_2_27_x86_64 \
    manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 any; do
    platforms+=(--platform "$platform")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d "$downloads" -r bench/device-requirements.txt
python3 -m pip install -q --no-deps --no-compile --no-index --only-binary=:all: --python-version 3.12 \
    --implementation cp "${platforms[@]}" --target "$site" "$downloads"/*.whl
rm -rf "$site"/ray/jars "$site"/ray/dashboard/client/build "$site"/ray/rllib "$site"/ray/llm "$site"/mlflow/server/js
find "$site"/diffusers/pipelines -mindepth 1 -maxdepth 1 -type d ! -name deprecated -exec rm -rf {} +
find "$site"/diffusers/pipelines/deprecated -mindepth 1 -maxdepth 1 -type d ! -name wuerstchen -exec rm -rf {} +
mkdir -p .whl
tar -cJf .whl/site312.tar.xz -C "$site" .
ls -l .whl/site312.tar.xz
