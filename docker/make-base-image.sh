#!/usr/bin/env bash
# Build a local Debian 12 base image with python3, for machines that cannot pull from an image
# registry (no `FROM python:3.11-slim-bookworm` possible). It is imported with `docker import`
# under an honest name of its own; the Dockerfile is pointed at it with
#     docker build --build-arg BASE_IMAGE="$(docker/make-base-image.sh --print-tag)" ...
# so the same Dockerfile still builds FROM python:3.11-slim-bookworm where a registry answers.
#
#   docker/make-base-image.sh                 # idempotent: skip if the tag already exists
#   docker/make-base-image.sh --force         # rebuild even if it exists
#   docker/make-base-image.sh --print-tag     # print the tag and exit
#   docker/make-base-image.sh --alias NAME:T  # also tag the result NAME:T (e.g. the Dockerfile's
#                                             # default, python:3.11-slim-bookworm)
#
# The image carries this machine's CA bundle and pip configuration (without file:// indexes and
# local find-links, which do not exist inside), because pip inside a build reaches the package
# registry only through this machine's TLS proxy. The apt mirror is the one apt uses here, read
# from /etc/apt/sources.list(.d) at run time.
# Needs root, debootstrap (installed if missing) and a running engine (docker/start-dockerd.sh).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
suite=bookworm
packages=python3,python3-venv,python3-pip,ca-certificates
# The recipe hash is part of the tag: editing this script (packages, config) yields a new base.
recipe=$(sha256sum "${BASH_SOURCE[0]}" | cut -c1-12)
tag=${EDGESHIP_BASE_TAG:-edgeship-base:${suite}-py3-${recipe}}

force=0
aliases=()
while [ $# -gt 0 ]; do
  case "$1" in
    --force) force=1 ;;
    --print-tag) echo "$tag"; exit 0 ;;
    --alias) aliases+=("$2"); shift ;;
    *) echo "usage: $0 [--force] [--print-tag] [--alias NAME:TAG]" >&2; exit 2 ;;
  esac
  shift
done

add_aliases() {
  for a in ${aliases[@]+"${aliases[@]}"}; do docker tag "$tag" "$a"; echo "make-base-image: tagged $a" >&2; done
}

if [ "$force" = 0 ] && docker image inspect "$tag" >/dev/null 2>&1; then
  echo "make-base-image: $tag exists, nothing to do" >&2
  add_aliases
  echo "$tag"
  exit 0
fi

if [ "$(id -u)" != 0 ]; then
  echo "make-base-image: debootstrap needs root" >&2
  exit 1
fi
command -v debootstrap >/dev/null 2>&1 || {
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
}

# The Debian mirror apt already uses on this machine (deb822 .sources or one-line .list files).
mirror=$(python3 - "$suite" <<'PY'
import glob, sys
suite = sys.argv[1]
files = sorted(glob.glob("/etc/apt/sources.list.d/*.sources"))
for path in files:
    for stanza in open(path).read().split("\n\n"):
        fields = {}
        for line in stanza.splitlines():
            if ":" in line and not line.lstrip().startswith("#"):
                k, v = line.split(":", 1)
                fields[k.strip().lower()] = v.split()
        if "deb" in fields.get("types", []) and suite in fields.get("suites", []):
            print(fields["uris"][0]); sys.exit(0)
for path in ["/etc/apt/sources.list"] + sorted(glob.glob("/etc/apt/sources.list.d/*.list")):
    try:
        lines = open(path).read().splitlines()
    except OSError:
        continue
    for line in lines:
        parts = line.split("#", 1)[0].split()
        if parts and parts[0] == "deb":
            parts = [p for p in parts[1:] if not p.startswith("[")]
            if len(parts) >= 2 and parts[1] == suite:
                print(parts[0]); sys.exit(0)
sys.exit("no apt source for suite %r found" % suite)
PY
)

work=$(mktemp -d /var/tmp/edgeship-base.XXXXXX)
trap 'rm -rf "$work"' EXIT
root=$work/root
start=$(date +%s)
echo "make-base-image: debootstrap $suite (+$packages) ..." >&2
debootstrap --variant=minbase --include="$packages" "$suite" "$root" "$mirror" >"$work/debootstrap.log" 2>&1 || {
  tail -n 30 "$work/debootstrap.log" >&2; exit 1; }

# The TLS proxy's CA (it is in this bundle) and pip's config, so pip inside can reach the registry.
install -m 0644 /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
python3 - "$root/etc/pip.conf" <<'PY'
import configparser, os, sys
src = configparser.ConfigParser(interpolation=None)
src.read(["/etc/pip.conf", os.path.expanduser("~/.config/pip/pip.conf"), os.path.expanduser("~/.pip/pip.conf")])
out = configparser.ConfigParser(interpolation=None)
for section in src.sections():
    for key, value in src.items(section):
        kept = [v for v in value.split()
                # file:// indexes and local find-links folders do not exist inside the image
                if not v.startswith("file:") and not (key == "find-links" and v.startswith("/"))]
        if kept:
            out.setdefault(section, {})[key] = " ".join(kept)
out.setdefault("global", {}).setdefault("cert", "/etc/ssl/certs/ca-certificates.crt")
with open(sys.argv[1], "w") as fh:
    fh.write("# written by docker/make-base-image.sh from the build machine's pip config\n")
    out.write(fh)
PY

# Keep it small: no package caches, apt lists, docs or man pages.
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/usr/share/doc/* \
       "$root"/usr/share/man/* "$root"/usr/share/info/* "$root"/var/log/*.log "$root"/var/cache/debconf/*-old
: >"$root/etc/resolv.conf"

tar --numeric-owner -C "$root" -c . | docker import \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  --change 'CMD ["/bin/bash"]' \
  --change "LABEL org.opencontainers.image.title=edgeship-base org.opencontainers.image.description=\"Debian $suite minbase + $packages, made by docker/make-base-image.sh\" io.edgeship.base.recipe=$recipe" \
  --message "docker/make-base-image.sh $suite $packages" \
  - "$tag" >/dev/null
echo "make-base-image: imported $tag in $(( $(date +%s) - start ))s ($(docker image inspect -f '{{.Size}}' "$tag" | awk '{printf "%.0f MB", $1/1e6}'))" >&2
add_aliases
echo "$tag"
