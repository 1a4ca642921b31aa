#!/bin/bash
# build.sh TOPDIR CACHE SPEC RPMBUILD_ARGS...
#
# rpmbuild -bb SPEC in TOPDIR (whose SOURCES hold Source0 and Source1), or,
# when CACHE/<key> holds the packages a build of the same inputs made, those.
# The key covers everything the packages are made from: the sources (made
# reproducible by `make rpm-sources`), the spec, the rpmbuild arguments
# (release, commit, build conditions, payload), and the Go and rpmbuild
# versions (the Go module and build caches only make a build faster, never
# different). `make rpm` runs it; the newest few keys are kept.
set -euo pipefail

top=$1 cache=$2 spec=$3
shift 3
keep=${RPM_CACHE_KEEP:-6}

name=$(awk '$1 == "Name:" {print $2; exit}' "$spec")
version=$(awk '$1 == "Version:" {print $2; exit}' "$spec")
release=1
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
	if [ "${args[i]}" = --define ] && [[ ${args[i + 1]} == "pkg_release "* ]]; then
		release=${args[i + 1]#pkg_release }
	fi
done

key=$({
	(cd "$top/SOURCES" && sha256sum -- *"-$version".*)
	sha256sum <"$spec"
	printf '%s\n' "${args[@]}"
	go version
	rpmbuild --version
} | sha256sum | cut -c1-16)

out="$top/RPMS/x86_64"
mkdir -p "$out"
hit="$cache/$key"
rm -f "$out/$name"-*"$version-$release".x86_64.rpm
if [ -f "$hit/.done" ]; then
	for f in "$hit"/*.rpm; do
		ln -f "$f" "$out/" 2>/dev/null || cp -f "$f" "$out/"
	done
	touch "$hit"
	echo "rpm: $name-$version-$release from the cache ($hit)"
	exit 0
fi

rpmbuild -bb --nodeps --define "_topdir $top" "$@" "$spec"

mkdir -p "$cache"
tmp=$(mktemp -d "$cache/.new.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
cp "$out/$name"-*"$version-$release".x86_64.rpm "$tmp/"
touch "$tmp/.done"
rm -rf "$hit"
mv "$tmp" "$hit"
trap - EXIT
# Keep the newest entries only (two releases of a few trees).
ls -1td "$cache"/*/ 2>/dev/null | tail -n +$((keep + 1)) | xargs -r rm -rf
echo "rpm: cached as $hit"
