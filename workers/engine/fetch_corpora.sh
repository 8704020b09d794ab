#!/bin/sh
# Fetch the text corpora the builtin datasets read, without a root install and without the Hugging Face hub.
#
#   sh workers/engine/fetch_corpora.sh [DEST]        (default DEST: var/data, relative to the repository)
#
# fortunes: `apt-get download fortunes` (any user; only the package lists must exist, `apt-get update` once as
# root on a fresh machine) and `dpkg -x` into DEST/fortunes, where the `fortunes` builtin dataset looks for it
# (DEST/fortunes/usr/share/games/fortunes). Set DISTILLWEB_FORTUNES_DIR to use a copy elsewhere.
set -eu

repo=$(cd "$(dirname "$0")/../.." && pwd)
dest=${1:-"$repo/var/data"}
target="$dest/fortunes"
if [ -d "$target/usr/share/games/fortunes" ] && [ -n "$(ls "$target/usr/share/games/fortunes")" ]; then
    echo "fortunes: already in $target"
    exit 0
fi
command -v apt-get >/dev/null 2>&1 || { echo "fortunes: apt-get is needed (Debian/Ubuntu)" >&2; exit 1; }
command -v dpkg >/dev/null 2>&1 || { echo "fortunes: dpkg is needed (Debian/Ubuntu)" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# apt-get download writes into the current folder; as root it warns that _apt cannot read it (harmless).
if ! (cd "$work" && apt-get download fortunes >/dev/null 2>"$work/apt.log"); then
    cat "$work/apt.log" >&2
    echo "fortunes: 'apt-get download fortunes' failed; run 'apt-get update' (as root) first" >&2
    exit 1
fi
mkdir -p "$target"
dpkg -x "$work"/fortunes_*.deb "$target"
echo "fortunes: $(ls "$target/usr/share/games/fortunes" | grep -vc '\.')" "categories in $target"
