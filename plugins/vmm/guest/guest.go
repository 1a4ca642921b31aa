// Package guest is what the host side of kuasar-vmm and its guest image
// agree on: the image's files and manifest (written by contrib/guest, read
// by the controller), where things live inside the initramfs, the name of
// the agent's virtio-serial port, and the kernel command line parameters
// the agent reads. It has no dependencies so the guest agent can use it.
package guest

import (
	"bufio"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

// Files of a guest image directory, as contrib/guest writes them.
const (
	KernelFile   = "vmlinux"        // uncompressed ELF kernel with a PVH entry
	InitrdFile   = "initramfs.cpio" // newc cpio, possibly gzip-compressed
	ManifestFile = "guest.json"     // Manifest
)

// Paths inside the guest.
const (
	// InitPath is the agent, PID 1 of the guest.
	InitPath = "/init"
	// ModulesList lists the kernel modules to load, in order (see Module).
	ModulesList = "/lib/modules/kuasar.modules"
	// ImageInfoPath is the Manifest of the image, as seen by the guest.
	ImageInfoPath = "/etc/kuasar/image.json"
	// RuncPath is the OCI runtime that runs containers in the guest.
	RuncPath = "/usr/bin/runc"

	// ShareDir is where the host's share (tag ShareTag) is mounted: one
	// directory per container, BundleDir, holding config.json (the spec,
	// with guest paths) and rootfs/ (mounted on the host).
	ShareDir = "/run/kuasar/shared"
	// PodNSDir holds the pod's namespaces, pinned: ipc, uts, and pid when
	// the pod shares one.
	PodNSDir = "/run/kuasar/pod/ns"
	// PodShmDir is the pod's /dev/shm.
	PodShmDir = "/run/kuasar/pod/shm"
	// CgroupParent is the guest cgroup (v2) that holds the containers':
	// the host sets each spec's cgroupsPath to CgroupParent/<id> (the
	// agent does when a spec has none, or a systemd one). The agent's
	// PodStats are this cgroup's.
	CgroupParent = "/kuasar"
)

// ShareTag is the mount tag of the host's share.
const ShareTag = "kuasar"

// BundleDir is the bundle of a container in the guest. The task service's
// CreateTaskRequest names it, with Rootfs empty (mounted already) and
// Stdin/Stdout/Stderr non-empty for the streams the process has (their
// values mean nothing in the guest: the agent makes the streams and serves
// them with ReadStdio/WriteStdin).
func BundleDir(containerID string) string { return ShareDir + "/" + containerID }

// PortName is the name of the agent's virtio-serial port
// (virtserialport,name=...); the guest finds it under
// /sys/class/virtio-ports/*/name.
const PortName = "kuasar.agent"

// VsockPort is the port the agent listens on where the channel is vsock.
const VsockPort = 1024

// Manifest describes one built guest image.
type Manifest struct {
	// Key identifies the image: a hash of every input (kernel package,
	// agent and runc binaries with their libraries, builder version).
	Key string `json:"key"`
	// BuilderVersion is the image layout version of contrib/guest.
	BuilderVersion string `json:"builderVersion"`
	// KernelPackage and KernelPackageVersion name the Debian package the
	// kernel comes from; KernelRelease is its `uname -r`.
	KernelPackage        string `json:"kernelPackage"`
	KernelPackageVersion string `json:"kernelPackageVersion"`
	KernelRelease        string `json:"kernelRelease"`
	// AgentSHA256 and RuncSHA256 are digests of the binaries inside.
	AgentSHA256 string `json:"agentSha256"`
	RuncSHA256  string `json:"runcSha256"`
	// Modules are the kernel modules of the image, in load order.
	Modules []string `json:"modules"`
	// Compression of the initramfs: "none" or "gzip".
	Compression string `json:"compression"`
}

// Image is a guest image on the host.
type Image struct {
	Dir    string
	Kernel string // path of the kernel
	Initrd string // path of the initramfs
	Manifest
}

// Open reads the image in dir, checking that its files are there.
func Open(dir string) (*Image, error) {
	b, err := os.ReadFile(filepath.Join(dir, ManifestFile))
	if err != nil {
		return nil, fmt.Errorf("guest image in %s: %w", dir, err)
	}
	img := &Image{Dir: dir, Kernel: filepath.Join(dir, KernelFile), Initrd: filepath.Join(dir, InitrdFile)}
	if err := json.Unmarshal(b, &img.Manifest); err != nil {
		return nil, fmt.Errorf("guest image manifest %s: %w", filepath.Join(dir, ManifestFile), err)
	}
	if img.Key == "" {
		return nil, fmt.Errorf("guest image manifest %s: no key", filepath.Join(dir, ManifestFile))
	}
	for _, f := range []string{img.Kernel, img.Initrd} {
		if _, err := os.Stat(f); err != nil {
			return nil, fmt.Errorf("guest image: %w", err)
		}
	}
	return img, nil
}

// Module is one line of ModulesList: a module file (relative to
// /lib/modules/<release>) and whether it is needed before the agent can
// open its channel (Early) or may load while the agent already serves.
type Module struct {
	Path  string
	Early bool
}

// FormatModules renders a ModulesList file.
func FormatModules(ms []Module) []byte {
	var b strings.Builder
	b.WriteString("# kernel modules of the kuasar-vmm guest, in load order: early|late <file>\n")
	for _, m := range ms {
		phase := "late"
		if m.Early {
			phase = "early"
		}
		fmt.Fprintf(&b, "%s %s\n", phase, m.Path)
	}
	return []byte(b.String())
}

// ParseModules reads a ModulesList file.
func ParseModules(b []byte) ([]Module, error) {
	var ms []Module
	sc := bufio.NewScanner(strings.NewReader(string(b)))
	for n := 1; sc.Scan(); n++ {
		l := strings.TrimSpace(sc.Text())
		if l == "" || strings.HasPrefix(l, "#") {
			continue
		}
		phase, p, ok := strings.Cut(l, " ")
		p = strings.TrimSpace(p)
		if !ok || p == "" || (phase != "early" && phase != "late") || strings.Contains(p, "..") {
			return nil, fmt.Errorf("modules list line %d: malformed %q", n, l)
		}
		ms = append(ms, Module{Path: p, Early: phase == "early"})
	}
	return ms, sc.Err()
}

// Kernel command line parameters the agent reads (kuasar.<name>=<value>).
const (
	// ParamChannel selects the channel: "serial" (default) or "vsock".
	ParamChannel = "kuasar.channel"
	// ParamLogLevel is the agent's log level (default "info").
	ParamLogLevel = "kuasar.log"
	// ParamDebug keeps a failing agent from powering the VM off, for
	// inspection on the console.
	ParamDebug = "kuasar.debug"
)

// Params returns the kuasar.* parameters of a kernel command line.
func Params(cmdline string) map[string]string {
	m := map[string]string{}
	for _, f := range strings.Fields(cmdline) {
		if !strings.HasPrefix(f, "kuasar.") {
			continue
		}
		k, v, _ := strings.Cut(f, "=")
		m[k] = v
	}
	return m
}
