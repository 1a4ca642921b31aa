package sandbox

import (
	"errors"
	"fmt"
	"os"
	"path"
	"path/filepath"
	"strings"

	specs "github.com/opencontainers/runtime-spec/specs-go"
	runtime "k8s.io/cri-api/pkg/apis/runtime/v1"
)

// A pod's /etc/hostname, /etc/hosts and /etc/resolv.conf, and its shared
// /dev/shm, belong to the sandbox controller, not to CRI: CRI adds them to a
// container's spec only when it finds them in its own per-sandbox
// directories, and at start-up it removes those directories for every
// sandbox that has no pause container (containerd v2.4's CRI recovery only
// knows podsandbox's sandboxes). So the framework keeps them in the
// sandbox's own directory and adds them to every CRI container of the pod
// itself (AddPodMounts), as a remote sandbox controller is expected to.

// podFilesDir is where a sandbox keeps its pod files.
func (sb *Sandbox) podFilesDir() string { return filepath.Join(sb.Dir, "etc") }

// PodFile is the path of one of the pod's files (hostname, hosts,
// resolv.conf).
func (sb *Sandbox) PodFile(name string) string { return filepath.Join(sb.podFilesDir(), name) }

// podFiles are the files every container of a pod gets, by destination.
var podFiles = []struct{ dest, name string }{
	{"/etc/hostname", "hostname"},
	{"/etc/hosts", "hosts"},
	{"/etc/resolv.conf", "resolv.conf"},
}

// WritePodFiles writes the pod's hostname, hosts and resolv.conf files, as
// stock CRI does for a pause container's pod.
func WritePodFiles(sb *Sandbox) error {
	if err := os.MkdirAll(sb.podFilesDir(), 0o755); err != nil {
		return err
	}
	hostname := sb.Config.GetHostname()
	if hostname == "" {
		var err error
		if hostname, err = os.Hostname(); err != nil {
			return err
		}
	}
	if err := os.WriteFile(sb.PodFile("hostname"), []byte(hostname+"\n"), 0o644); err != nil {
		return err
	}
	hosts, err := os.ReadFile("/etc/hosts")
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	if err := os.WriteFile(sb.PodFile("hosts"), hosts, 0o644); err != nil {
		return err
	}
	var resolv []byte
	if dns := sb.Config.GetDnsConfig(); dns != nil {
		resolv = []byte(ResolvConf(dns.Servers, dns.Searches, dns.Options))
	} else if resolv, err = os.ReadFile("/etc/resolv.conf"); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	return os.WriteFile(sb.PodFile("resolv.conf"), resolv, 0o644)
}

// hasPodFiles reports whether the pod's files are all there.
func (sb *Sandbox) hasPodFiles() bool {
	for _, f := range podFiles {
		if _, err := os.Stat(sb.PodFile(f.name)); err != nil {
			return false
		}
	}
	return true
}

// ResolvConf renders a resolv.conf from CRI's DNS config.
func ResolvConf(servers, searches, options []string) string {
	var b strings.Builder
	if len(searches) > 0 {
		fmt.Fprintf(&b, "search %s\n", strings.Join(searches, " "))
	}
	for _, s := range servers {
		fmt.Fprintf(&b, "nameserver %s\n", s)
	}
	if len(options) > 0 {
		fmt.Fprintf(&b, "options %s\n", strings.Join(options, " "))
	}
	return b.String()
}

// RemovePodFiles removes the pod's files.
func RemovePodFiles(sb *Sandbox) error {
	return os.RemoveAll(sb.podFilesDir())
}

// criContainerType is the annotation CRI marks its containers with.
const criContainerType = "io.kubernetes.cri.container-type"

// AddPodMounts gives a CRI container of the pod the pod's hostname, hosts
// and resolv.conf files (read-only with a read-only rootfs, as CRI mounts
// them), and the pod's /dev/shm in place of a private one when the pod has
// its own (sb.ShmDir) and does not use the node's IPC namespace. A mount
// the container already has at one of those places (a kubelet-managed
// /etc/hosts, a volume) is left alone. Containers not made by CRI are left
// as they are.
func AddPodMounts(sb *Sandbox, spec *specs.Spec) {
	if spec == nil || spec.Annotations[criContainerType] != "container" {
		return
	}
	have := map[string]bool{}
	for _, m := range spec.Mounts {
		if m.Type == "tmpfs" && path.Clean(m.Destination) == "/dev/shm" {
			continue // the default private /dev/shm, replaced below
		}
		have[path.Clean(m.Destination)] = true
	}
	mode := "rw"
	if spec.Root != nil && spec.Root.Readonly {
		mode = "ro"
	}
	for _, f := range podFiles {
		if have[f.dest] {
			continue
		}
		spec.Mounts = append(spec.Mounts, specs.Mount{
			Destination: f.dest,
			Type:        "bind",
			Source:      sb.PodFile(f.name),
			Options:     []string{"rbind", "rprivate", mode},
		})
	}
	ipc := sb.Config.GetLinux().GetSecurityContext().GetNamespaceOptions().GetIpc()
	if sb.ShmDir == "" || ipc == runtime.NamespaceMode_NODE || have["/dev/shm"] {
		return
	}
	mounts := spec.Mounts[:0]
	for _, m := range spec.Mounts {
		if !(m.Type == "tmpfs" && path.Clean(m.Destination) == "/dev/shm") {
			mounts = append(mounts, m)
		}
	}
	spec.Mounts = append(mounts, specs.Mount{
		Destination: "/dev/shm",
		Type:        "bind",
		Source:      sb.ShmDir,
		Options:     []string{"rbind", "rprivate", "rw"},
	})
}
