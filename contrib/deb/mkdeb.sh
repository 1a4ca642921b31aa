#!/bin/bash
# mkdeb.sh TREE OUTDIR VERSION CONTAINERD_VERSION
#
# Makes the .deb packages of containerd-kuasar with dpkg-deb from TREE, what
# `make install DESTDIR=TREE PREFIX=/usr` put down, split as the RPM spec
# splits it (contrib/rpm/containerd-kuasar.spec):
#
#   containerd-kuasar         everything not below
#   containerd-kuasar-vmm     usr/libexec/kuasar/, usr/share/kuasar/ (guest image and agent),
#                             usr/share/doc/containerd-kuasar-vmm/
#   containerd-kuasar-gvisor  usr/bin/runsc, gVisor's LICENSE and README, when the tree has them
#
# Compressed with gzip at level 6 (DEB_COMPRESS=xz or DEB_COMPRESS_LEVEL=9
# for smaller, much slower packages: level 9 takes three times as long for
# 0.6% less). Each package also gets usr/share/doc/<package>/copyright, as
# Debian asks. With DEB_CACHE set, the packages are kept there keyed by
# every input (the tree's files, this script and the maintainer scripts,
# the versions, the compression), and a tree made before is packaged in a
# second. `make deb` runs it; `make package-test` checks the result
# against TREE.
set -euo pipefail

tree=$1 out=$2 version=$3 containerd_version=$4
here=$(cd "$(dirname "$0")" && pwd)
arch=$(dpkg --print-architecture)
maintainer="containerd-kuasar maintainers <containerd-kuasar@users.noreply.github.com>"
homepage=https://github.com/kuasar-io/containerd-kuasar
compress=${DEB_COMPRESS:-gzip}
level=${DEB_COMPRESS_LEVEL:-6}
cache=${DEB_CACHE:-}

[ -d "$tree/usr/bin" ] || { echo "mkdeb: $tree is not an install tree" >&2; exit 1; }
rm -rf "$out" && mkdir -p "$out"

if [ -n "$cache" ]; then
	key=$({
		(cd "$tree" && find . -printf '%P %y %m %l\n' | sort && find . -type f -print0 | sort -z | xargs -0 sha256sum)
		cat "$0" "$here"/containerd-kuasar.*
		echo "$version $containerd_version $compress $level $(dpkg-deb --version | head -1)"
	} | sha256sum | cut -c1-16)
	if [ -f "$cache/$key/.done" ]; then
		for f in "$cache/$key"/*.deb; do
			ln -f "$f" "$out/" 2>/dev/null || cp -f "$f" "$out/"
			echo "mkdeb: $out/$(basename "$f") (from the cache, $cache/$key)"
		done
		touch "$cache/$key"
		exit 0
	fi
fi
stage=$(mktemp -d "$out/.stage.XXXXXX")
trap 'rm -rf "$stage"' EXIT

# package_of PATH: the package a file of the tree belongs to.
package_of() {
	case "$1" in
	usr/libexec/kuasar/* | usr/share/kuasar/* | usr/share/doc/containerd-kuasar-vmm/*) echo containerd-kuasar-vmm ;;
	usr/bin/runsc | usr/share/licenses/containerd-kuasar-gvisor/* | usr/share/doc/containerd-kuasar-gvisor/*) echo containerd-kuasar-gvisor ;;
	*) echo containerd-kuasar ;;
	esac
}

# deb_path PATH: where Debian keeps a file of the tree: zsh completions in
# vendor-completions (Debian's zsh does not look in site-functions).
deb_path() {
	case "$1" in
	usr/share/zsh/site-functions/*) echo "usr/share/zsh/vendor-completions/${1#usr/share/zsh/site-functions/}" ;;
	*) echo "$1" ;;
	esac
}

# Copy every file and symlink of the tree into its package's staging root.
(cd "$tree" && find . \( -type f -o -type l \) -printf '%P\n' | sort) | while read -r f; do
	p=$(package_of "$f")
	d=$(deb_path "$f")
	mkdir -p "$stage/$p/$(dirname "$d")"
	cp -a "$tree/$f" "$stage/$p/$d"
done

# glibc_depends ROOT: "libc6 (>= X)" for the newest GLIBC_ symbol version the
# package's dynamically linked programs need, or nothing.
glibc_depends() {
	local need
	need=$(find "$1" -type f -perm -u+x -exec sh -c 'readelf -h "$1" >/dev/null 2>&1 && objdump -T "$1" 2>/dev/null' _ {} \; |
		grep -o 'GLIBC_[0-9][0-9.]*' | sed 's/GLIBC_//' | sort -uV | tail -1)
	[ -n "$need" ] && echo "libc6 (>= $need)"
	return 0
}

copyright() {
	cat <<EOF
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: containerd-kuasar
Source: $homepage

Files: *
Copyright: The containerd-kuasar Authors; The containerd Authors; the authors
 of the Go modules compiled into the binaries (see NOTICE)
License: Apache-2.0 AND BSD-2-Clause AND BSD-3-Clause AND MIT AND MPL-2.0
Comment: containerd-kuasar is containerd $containerd_version with the Kuasar
 sandbox controllers compiled in. The notices of the code the binaries carry
 are in /usr/share/licenses/containerd-kuasar/NOTICE; 'go version -m' lists
 every module of a binary. The licence texts: Apache-2.0, BSD and MPL-2.0 in
 /usr/share/common-licenses/, MIT in each module's source.
EOF
	if [ "$1" = containerd-kuasar-vmm ]; then
		cat <<EOF

Files: usr/share/kuasar/guest/*
Copyright: the Linux kernel, runc, GNU C library and libseccomp authors
License: GPL-2.0-only AND Apache-2.0 AND LGPL-2.1-or-later AND LGPL-2.1-only
Comment: The guest image is made from Debian's packages, unmodified
 (guest.json names the kernel package and version); their sources are
 Debian's source packages of those versions. /init is kuasar-vmm-agent.
 The licence texts are in /usr/share/common-licenses/.
EOF
	fi
}

for dir in "$stage"/*/; do
	p=$(basename "$dir")
	root="$stage/$p"
	mkdir -p "$root/DEBIAN" "$root/usr/share/doc/$p"
	copyright "$p" > "$root/usr/share/doc/$p/copyright"
	chmod 0644 "$root/usr/share/doc/$p/copyright"

	depends=$(glibc_depends "$root")
	extra=
	case "$p" in
	containerd-kuasar)
		summary="container runtime: containerd with Kuasar sandboxes built in"
		depends="${depends:+$depends, }runc (>= 1.1)"
		# A drop-in replacement for Debian's containerd and Docker's
		# containerd.io: the same files, so never beside either.
		extra="Recommends: containernetworking-plugins
Provides: containerd (= $containerd_version), containerd.io (= $containerd_version)
Conflicts: containerd, containerd.io
Replaces: containerd, containerd.io"
		description=" containerd-kuasar is containerd $containerd_version, unmodified, with every stock
 plugin and command, plus the Kuasar sandbox controllers compiled in. A pod
 picks its isolation through its RuntimeClass (the CRI runtime handler):
 runc (stock: pause container and a shim per pod), kuasar-runc (namespaces
 and cgroups with no pause container and no shim) and kuasar-wasm
 (WebAssembly modules from OCI images). It replaces containerd:
 /usr/bin/containerd, containerd.service and /etc/containerd/config.toml
 are where they were, and ctr and containerd-shim-runc-v2 come from the
 same containerd release."
		for s in postinst prerm postrm; do
			install -m 0755 "$here/containerd-kuasar.$s" "$root/DEBIAN/$s"
		done
		# postinst carries the unit, to put it back if the package it
		# replaced took it away (see the postinst).
		unit=usr/lib/systemd/system/containerd.service
		[ -f "$root/$unit" ] || { echo "mkdeb: the tree has no /$unit" >&2; exit 1; }
		grep -q '^#@UNIT@$' "$root/DEBIAN/postinst" || { echo "mkdeb: postinst has no #@UNIT@ line" >&2; exit 1; }
		if grep -qx 'EOF_UNIT' "$root/$unit"; then echo "mkdeb: /$unit has an EOF_UNIT line" >&2; exit 1; fi
		{
			sed '/^#@UNIT@$/,$d' "$root/DEBIAN/postinst"
			echo "restore_unit() {"
			echo "	cat > \"\$1\" <<'EOF_UNIT'"
			cat "$root/$unit"
			echo "EOF_UNIT"
			echo "}"
			sed '1,/^#@UNIT@$/d' "$root/DEBIAN/postinst"
		} > "$root/DEBIAN/postinst.new"
		mv "$root/DEBIAN/postinst.new" "$root/DEBIAN/postinst"
		chmod 0755 "$root/DEBIAN/postinst"
		(cd "$root" && find etc -type f -printf '/%p\n' | sort) > "$root/DEBIAN/conffiles"
		;;
	containerd-kuasar-vmm)
		summary="pods in QEMU microVMs for containerd-kuasar (kuasar-vmm)"
		depends="${depends:+$depends, }containerd-kuasar (= $version), qemu-system-x86"
		description=" The guest image (kernel and initramfs) and the guest agent of the
 kuasar-vmm handler of containerd-kuasar, which runs each pod in a QEMU
 microVM (KVM where the host has it, software emulation otherwise)."
		;;
	containerd-kuasar-gvisor)
		summary="pods in gVisor application kernels for containerd-kuasar (kuasar-gvisor)"
		depends="${depends:+$depends, }containerd-kuasar (= $version)"
		extra="Conflicts: runsc
Replaces: runsc"
		description=" gVisor's runsc, built from source for the kuasar-gvisor handler of
 containerd-kuasar, which runs each pod in a gVisor application kernel."
		;;
	esac

	size=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
	{
		echo "Package: $p"
		echo "Version: $version"
		echo "Architecture: $arch"
		echo "Maintainer: $maintainer"
		echo "Installed-Size: $size"
		echo "Depends: $depends"
		[ -n "$extra" ] && echo "$extra"
		echo "Section: admin"
		echo "Priority: optional"
		echo "Homepage: $homepage"
		echo "Description: $summary"
		echo "$description"
	} > "$root/DEBIAN/control"
	(cd "$root" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | sort -z | xargs -0 md5sum) > "$root/DEBIAN/md5sums"

	dpkg-deb --root-owner-group -Z"$compress" -z"$level" --build "$root" "$out/${p}_${version}_${arch}.deb" >/dev/null
	echo "mkdeb: $out/${p}_${version}_${arch}.deb"
done

if [ -n "$cache" ]; then
	mkdir -p "$cache"
	new=$(mktemp -d "$cache/.new.XXXXXX")
	cp "$out"/*.deb "$new/" && touch "$new/.done"
	rm -rf "${cache:?}/$key" && mv "$new" "$cache/$key"
	# The newest few trees only.
	ls -1td "$cache"/*/ 2>/dev/null | tail -n +7 | xargs -r rm -rf
fi
