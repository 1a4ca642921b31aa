package main

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/kuasar-io/containerd-kuasar/contrib/guest/internal/cpio"
	"github.com/kuasar-io/containerd-kuasar/contrib/guest/internal/kmod"
	"github.com/kuasar-io/containerd-kuasar/plugins/vmm/guest"
)

// Modules the guest loads. Early ones (with their dependencies) come before
// the agent opens its channel; late ones load while it serves. Modules the
// kernel has built in are skipped.
var (
	earlyModules = []string{"virtio_pci", "virtio_console"}
	lateModules  = []string{
		"virtio_net",         // the pod's NIC
		"9pnet_virtio", "9p", // shared directory over 9p (default)
		"virtiofs",                   // shared directory over virtio-fs (optional)
		"overlay",                    // container rootfs layering in the guest
		"virtio_blk",                 // block devices (rootfs on a block snapshot)
		"vmw_vsock_virtio_transport", // the channel where vhost-vsock exists
		"virtio_balloon",             // returning free guest memory to the node
		// What a privileged container may make as on a node, where the
		// kernel loads them on demand: bridges and veth pairs.
		"bridge", "veth",
	}
)

// build makes (or finds in the cache) the image for o. It reports whether
// the image was already cached.
func build(ctx context.Context, o options) (*guest.Image, bool, error) {
	if err := os.MkdirAll(o.cache, 0o755); err != nil {
		return nil, false, err
	}
	unlock, err := lockDir(o.cache)
	if err != nil {
		return nil, false, err
	}
	defer unlock()

	pkg, err := kernelPackage(ctx, o)
	if err != nil {
		return nil, false, err
	}
	agentSum, err := staticBinary(o.agent)
	if err != nil {
		return nil, false, err
	}
	runcSum, err := sha256File(o.runc)
	if err != nil {
		return nil, false, fmt.Errorf("runc: %w", err)
	}
	libs, err := elfDeps(o.runc, findLib)
	if err != nil {
		return nil, false, err
	}
	if o.compression != "none" && o.compression != "gzip" {
		return nil, false, fmt.Errorf("compression %q: want none or gzip", o.compression)
	}

	kkey := keyOf([][2]string{
		{"builder", builderVersion}, {"kernel-deb", pkg.SHA256},
		{"early", strings.Join(earlyModules, ",")}, {"late", strings.Join(lateModules, ",")},
	})
	kdir := filepath.Join(o.cache, "kernel-"+kkey)
	if _, err := os.Stat(filepath.Join(kdir, guest.KernelFile)); err != nil {
		deb := o.kernelDeb
		if deb == "" {
			if deb, err = fetchDeb(ctx, o.cache, pkg); err != nil {
				return nil, false, err
			}
		}
		logf("unpacking %s %s", pkg.Name, pkg.Version)
		if err := extractKernel(ctx, deb, kdir); err != nil {
			return nil, false, err
		}
	}
	release, err := os.ReadFile(filepath.Join(kdir, "release"))
	if err != nil {
		return nil, false, err
	}
	modList, err := os.ReadFile(filepath.Join(kdir, "modules.list"))
	if err != nil {
		return nil, false, err
	}
	mods, err := guest.ParseModules(modList)
	if err != nil {
		return nil, false, err
	}

	inputs := [][2]string{
		{"builder", builderVersion}, {"kernel", kkey}, {"agent", agentSum}, {"runc", runcSum},
		{"compression", o.compression},
	}
	for _, l := range libs {
		sum, err := sha256File(l.Host)
		if err != nil {
			return nil, false, err
		}
		inputs = append(inputs, [2]string{"lib " + l.Guest, sum})
	}
	m := guest.Manifest{
		Key: keyOf(inputs), BuilderVersion: builderVersion,
		KernelPackage: pkg.Name, KernelPackageVersion: pkg.Version, KernelRelease: string(release),
		AgentSHA256: agentSum, RuncSHA256: runcSum, Compression: o.compression,
	}
	for _, mod := range mods {
		m.Modules = append(m.Modules, kmod.Name(mod.Path))
	}
	idir := filepath.Join(o.cache, m.Key)
	if img, err := guest.Open(idir); err == nil {
		return img, true, nil
	}

	tmp, err := tempDir(o.cache, ".image-")
	if err != nil {
		return nil, false, err
	}
	defer os.RemoveAll(tmp)
	initrd, err := initramfs(m, kdir, mods, o.agent, o.runc, libs)
	if err != nil {
		return nil, false, err
	}
	if err := os.WriteFile(filepath.Join(tmp, guest.InitrdFile), initrd, 0o644); err != nil {
		return nil, false, err
	}
	if err := os.Link(filepath.Join(kdir, guest.KernelFile), filepath.Join(tmp, guest.KernelFile)); err != nil {
		return nil, false, fmt.Errorf("linking the kernel: %w", err)
	}
	mj, _ := json.MarshalIndent(m, "", "  ")
	if err := os.WriteFile(filepath.Join(tmp, guest.ManifestFile), append(mj, '\n'), 0o644); err != nil {
		return nil, false, err
	}
	_ = os.RemoveAll(idir) // an incomplete earlier build
	if err := os.Rename(tmp, idir); err != nil {
		return nil, false, err
	}
	img, err := guest.Open(idir)
	return img, false, err
}

// kernelPackage names the kernel package: a given .deb, or apt's
// candidate (downloaded only if its files are not cached yet).
func kernelPackage(ctx context.Context, o options) (debPackage, error) {
	if o.kernelDeb != "" {
		sum, err := sha256File(o.kernelDeb)
		if err != nil {
			return debPackage{}, err
		}
		name := strings.SplitN(filepath.Base(o.kernelDeb), "_", 3)
		p := debPackage{Name: name[0], SHA256: sum}
		if len(name) > 1 {
			p.Version = name[1]
		}
		return p, nil
	}
	return resolveKernelPackageCached(ctx, o.cache, o.kernelPkg)
}

// staticBinary checks that the agent is a static executable (it runs with
// no loader and no libraries) and returns its digest.
func staticBinary(p string) (string, error) {
	interp, needed, err := readDynamic(p)
	if err != nil {
		return "", fmt.Errorf("agent: %w", err)
	}
	if interp != "" || len(needed) > 0 {
		return "", fmt.Errorf("agent %s is dynamically linked (%s %v): build it with CGO_ENABLED=0", p, interp, needed)
	}
	return sha256File(p)
}

// extractKernel unpacks the kernel and the modules the guest needs from
// the kernel package into dir: vmlinux, release, modules.list and the
// module files under modules/.
func extractKernel(ctx context.Context, deb, dir string) error {
	set := kmod.NewSet()
	var bz []byte
	release := ""
	err := walkDeb(ctx, deb, func(h *tar.Header, r io.Reader) error {
		switch {
		case strings.HasPrefix(h.Name, "boot/vmlinuz-") && h.Typeflag == tar.TypeReg:
			b, err := io.ReadAll(r)
			bz = b
			return err
		case strings.HasPrefix(h.Name, "lib/modules/") && path.Base(h.Name) == "modules.builtin":
			b, err := io.ReadAll(r)
			set.AddBuiltin(b)
			return err
		case strings.HasPrefix(h.Name, "lib/modules/") && isModule(h.Name) && h.Typeflag == tar.TypeReg:
			release = strings.SplitN(h.Name, "/", 4)[2]
			b, err := readModule(ctx, h.Name, r)
			if err != nil {
				return err
			}
			return set.Add(h.Name, b)
		}
		return nil
	})
	if err != nil {
		return err
	}
	if bz == nil || release == "" {
		return fmt.Errorf("%s holds no kernel (boot/vmlinuz-*) or no modules", deb)
	}
	early, err := set.Resolve(earlyModules)
	if err != nil {
		return err
	}
	all, err := set.Resolve(append(append([]string{}, earlyModules...), lateModules...))
	if err != nil {
		return err
	}
	isEarly := map[string]bool{}
	for _, n := range early {
		isEarly[n] = true
	}
	want := map[string]guest.Module{}
	var mods []guest.Module
	for _, n := range all {
		f := set.Files[n]
		// Paths are relative to /lib/modules and always name a plain .ko.
		mod := guest.Module{Path: strings.TrimPrefix(moduleTarget(f), "lib/modules/"), Early: isEarly[n]}
		mods = append(mods, mod)
		want[f] = mod
	}
	// Early modules first, each group in dependency order.
	ordered := make([]guest.Module, 0, len(mods))
	for _, early := range []bool{true, false} {
		for _, m := range mods {
			if m.Early == early {
				ordered = append(ordered, m)
			}
		}
	}

	tmp, err := tempDir(filepath.Dir(dir), ".kernel-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(tmp)
	vmlinux, err := extractVmlinux(ctx, bz)
	if err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(tmp, guest.KernelFile), vmlinux, 0o644); err != nil {
		return err
	}
	found := 0
	err = walkDeb(ctx, deb, func(h *tar.Header, r io.Reader) error {
		mod, ok := want[h.Name]
		if !ok {
			return nil
		}
		b, err := readModule(ctx, h.Name, r)
		if err != nil {
			return err
		}
		found++
		dst := filepath.Join(tmp, "modules", mod.Path)
		if err := os.MkdirAll(filepath.Dir(dst), 0o755); err != nil {
			return err
		}
		return os.WriteFile(dst, b, 0o644)
	})
	if err != nil {
		return err
	}
	if found != len(want) {
		return fmt.Errorf("%s: found %d of %d modules on the second pass", deb, found, len(want))
	}
	if err := os.WriteFile(filepath.Join(tmp, "modules.list"), guest.FormatModules(ordered), 0o644); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(tmp, "release"), []byte(release), 0o644); err != nil {
		return err
	}
	_ = os.RemoveAll(dir)
	return os.Rename(tmp, dir)
}

func isModule(name string) bool {
	return strings.HasSuffix(name, ".ko") || strings.HasSuffix(name, ".ko.xz")
}

// moduleTarget is the name a module has in the image: always uncompressed.
func moduleTarget(name string) string { return strings.TrimSuffix(name, ".xz") }

// readModule reads a module file, uncompressing an xz-compressed one.
func readModule(ctx context.Context, name string, r io.Reader) ([]byte, error) {
	b, err := io.ReadAll(r)
	if err != nil || !strings.HasSuffix(name, ".xz") {
		return b, err
	}
	return unxz(ctx, b)
}

// initramfs assembles the guest's root file system.
func initramfs(m guest.Manifest, kdir string, mods []guest.Module, agent, runc string, libs []sharedFile) ([]byte, error) {
	a := cpio.New()
	var errs []error
	add := func(err error) { errs = append(errs, err) }
	file := func(dst string, perm uint32, src string) {
		b, err := os.ReadFile(src)
		if err != nil {
			add(err)
			return
		}
		add(a.AddFile(dst, perm, b))
	}
	file(guest.InitPath, 0o755, agent)
	file(guest.RuncPath, 0o755, runc)
	for _, l := range libs {
		file(l.Guest, 0o755, l.Host)
	}
	for _, d := range []string{"proc", "sys", "dev", "run", "etc", "mnt", "root", "var", "usr/sbin"} {
		add(a.AddDir(d, 0o755))
	}
	add(a.AddDir("tmp", 0o1777))
	// The kernel opens /dev/console for PID 1 before devtmpfs is mounted.
	add(a.AddCharDev("dev/console", 0o600, 5, 1))
	add(a.AddCharDev("dev/null", 0o666, 1, 3))
	add(a.AddFile("etc/passwd", 0o644, []byte("root:x:0:0:root:/root:/bin/false\n")))
	add(a.AddFile("etc/group", 0o644, []byte("root:x:0:\n")))
	mj, _ := json.MarshalIndent(m, "", "  ")
	add(a.AddFile(guest.ImageInfoPath, 0o644, append(mj, '\n')))
	for _, mod := range mods {
		file(path.Join("lib/modules", mod.Path), 0o644, filepath.Join(kdir, "modules", mod.Path))
	}
	add(a.AddFile(guest.ModulesList, 0o644, guest.FormatModules(mods)))
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	raw := a.Bytes()
	if m.Compression == "none" {
		return raw, nil
	}
	var b bytes.Buffer
	zw, err := gzip.NewWriterLevel(&b, gzip.BestCompression)
	if err != nil {
		return nil, err
	}
	if _, err := zw.Write(raw); err != nil {
		return nil, err
	}
	if err := zw.Close(); err != nil {
		return nil, err
	}
	return b.Bytes(), nil
}

// lockDir takes an exclusive lock on a cache directory, so that two builds
// on one machine do not write the same image at once.
func lockDir(dir string) (func(), error) {
	f, err := os.OpenFile(filepath.Join(dir, ".lock"), os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return nil, err
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX); err != nil {
		f.Close()
		return nil, fmt.Errorf("locking %s: %w", dir, err)
	}
	return func() { f.Close() }, nil
}

// tempDir makes a directory to build into, readable by all like the
// cache (os.MkdirTemp makes it private).
func tempDir(dir, pattern string) (string, error) {
	tmp, err := os.MkdirTemp(dir, pattern)
	if err == nil {
		err = os.Chmod(tmp, 0o755)
	}
	return tmp, err
}
