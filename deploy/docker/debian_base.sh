#!/usr/bin/env bash
# A base image for deploy/docker/Dockerfile.{cpu,gpu} made from Debian's own packages, for a
# machine that reaches no image registry (so cannot pull python:3.11-slim-bookworm):
#
#   deploy/docker/debian_base.sh [TAG]        # default TAG: localhost/featurebank-base:bookworm
#   SMOKE_BASE_IMAGE=localhost/featurebank-base:bookworm python deploy/docker/smoke.py
#
# Debian bookworm, minbase, plus python3 (3.11), python3-venv and ca-certificates, fetched by
# mmdebstrap with this machine's own apt sources (so its mirror or proxy, named nowhere here).
# The CA certificates this machine added (/usr/local/share/ca-certificates) are trusted inside
# too: where HTTPS goes through an intercepting proxy, pip in the build container needs them, as
# the host does. Needs root (or mmdebstrap's unshare mode), mmdebstrap, and podman or docker
# ($SMOKE_ENGINE, a command line, as for smoke.py).
set -euo pipefail

tag=${1:-localhost/featurebank-base:bookworm}
read -r -a engine <<<"${SMOKE_ENGINE:-podman}"

sources=()
for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
  [[ -s $f ]] && sources+=("$f")
done
((${#sources[@]})) || { echo "no apt sources on this machine" >&2; exit 2; }

hooks=()
if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
  hooks+=(--customize-hook='copy-in /usr/local/share/ca-certificates /usr/local/share'
          --customize-hook='chroot "$1" update-ca-certificates')
fi

mmdebstrap --quiet --variant=minbase --include=python3,python3-venv,ca-certificates "${hooks[@]}" \
  bookworm - "${sources[@]}" \
  | "${engine[@]}" import --change 'CMD ["python3"]' - "$tag"
echo "$tag"
