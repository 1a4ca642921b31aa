package vmm

import (
	"encoding/json"
	"fmt"
	"path"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	"github.com/containerd/errdefs"
	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/kuasar-io/containerd-kuasar/plugins/vmm/guest"
)

// A container reaches the guest through the pod's share: its directory
// <share>/<container id> holds rootfs/ (the snapshot containerd mounts),
// mounts/<n> (each bind mount's source, read-only where the mount is), both
// mounted in the hypervisor's mount namespace (share.go), and config.json,
// the container's spec with guest paths (guestSpec). The guest mounts the
// share at guest.ShareDir, so the directory is guest.BundleDir(id) there.

// guestSpec returns the container's spec as the guest runs it, and the
// host binds to make under dir (the container's share directory) for it:
// bind sources become paths under the share, the pod's namespaces the
// agent's (the network namespace is the guest's own), the container's
// cgroup a guest one; hooks (host programs) and device nodes (the node's)
// go.
func guestSpec(spec *specs.Spec, id string, sharedPID bool) (*specs.Spec, []hostBind, error) {
	b, err := json.Marshal(spec)
	if err != nil {
		return nil, nil, err
	}
	var g specs.Spec
	if err := json.Unmarshal(b, &g); err != nil {
		return nil, nil, err
	}
	if g.Linux == nil {
		return nil, nil, fmt.Errorf("OCI spec has no linux section: %w", errdefs.ErrInvalidArgument)
	}
	bundle := guest.BundleDir(id)
	ro := g.Root != nil && g.Root.Readonly
	g.Root = &specs.Root{Path: bundle + "/rootfs", Readonly: ro}
	g.Hooks = nil
	g.Process.ApparmorProfile = ""
	g.Process.SelinuxLabel = ""
	g.Linux.MountLabel = ""
	g.Linux.Devices = nil

	var binds []hostBind
	mounts := g.Mounts[:0]
	for _, m := range g.Mounts {
		switch {
		case isBind(m):
			n := strconv.Itoa(len(binds))
			binds = append(binds, hostBind{Source: m.Source, Target: filepath.Join("mounts", n),
				ReadOnly: slices.Contains(m.Options, "ro") || slices.Contains(m.Options, "rro"), Recursive: slices.Contains(m.Options, "rro")})
			m.Source = bundle + "/mounts/" + n
			m.Options = bindOptions(m.Options)
		case m.Type == "tmpfs" && path.Clean(m.Destination) == "/dev/shm":
			// The pod's shared /dev/shm, as the agent made it.
			m = specs.Mount{Destination: "/dev/shm", Type: "bind", Source: guest.PodShmDir, Options: []string{"rbind", "rprivate", "rw"}}
		}
		mounts = append(mounts, m)
	}
	g.Mounts = mounts

	nss := g.Linux.Namespaces[:0]
	for _, ns := range g.Linux.Namespaces {
		podNS := strings.HasPrefix(ns.Path, "/proc/0/")
		switch ns.Type {
		case specs.NetworkNamespace:
			continue // the guest's network is the pod's
		case specs.UserNamespace:
			return nil, nil, fmt.Errorf("user namespaces are not supported by %s: %w", ID, errdefs.ErrNotImplemented)
		case specs.IPCNamespace, specs.UTSNamespace:
			if podNS {
				ns.Path = guest.PodNSDir + "/" + string(nsKind(ns.Type))
			} else if ns.Path != "" {
				return nil, nil, fmt.Errorf("container asks for the %s namespace %s, which is not the pod's: %w", ns.Type, ns.Path, errdefs.ErrInvalidArgument)
			}
		case specs.PIDNamespace:
			switch {
			case podNS && sharedPID:
				ns.Path = guest.PodNSDir + "/pid"
			case podNS:
				return nil, nil, fmt.Errorf("container asks for the pod's PID namespace, which the pod does not share: %w", errdefs.ErrInvalidArgument)
			case ns.Path != "":
				return nil, nil, fmt.Errorf("container asks for the PID namespace %s (another container's?), which %s does not support: %w", ns.Path, ID, errdefs.ErrNotImplemented)
			}
		}
		nss = append(nss, ns)
	}
	// The guest's cgroups are v2 whatever the node's are: a container gets
	// a cgroup namespace there, as CRI gives it on a v2 node (on a v1 node
	// CRI asks for none, and the container would see the guest's tree).
	if !slices.ContainsFunc(nss, func(ns specs.LinuxNamespace) bool { return ns.Type == specs.CgroupNamespace }) {
		nss = append(nss, specs.LinuxNamespace{Type: specs.CgroupNamespace})
	}
	g.Linux.Namespaces = nss
	g.Linux.CgroupsPath = "/kuasar/" + id
	return &g, binds, nil
}

func nsKind(t specs.LinuxNamespaceType) string {
	if t == specs.UTSNamespace {
		return "uts"
	}
	return "ipc"
}

func isBind(m specs.Mount) bool {
	return m.Type == "bind" || slices.Contains(m.Options, "bind") || slices.Contains(m.Options, "rbind")
}

// bindOptions are a bind mount's options in the guest: the source there is
// already the right thing, read-only where asked (on the host), bound
// again. In the guest the source and its submounts are one 9p mount, so a
// read-only bind there would be read-only all through: "ro" (the top mount
// only) is left to the host, "rro" is "ro" (the guest's runc may not know
// rro).
func bindOptions(opts []string) []string {
	out := []string{"rbind"}
	for _, o := range opts {
		switch o {
		case "bind", "rbind", "ro":
		case "rro":
			out = append(out, "ro")
		default:
			out = append(out, o)
		}
	}
	return out
}
