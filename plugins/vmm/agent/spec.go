package agent

import (
	"encoding/json"
	"fmt"
	"os"
	"path"
	"strings"

	"github.com/containerd/errdefs"
	specs "github.com/opencontainers/runtime-spec/specs-go"

	"github.com/kuasar-io/containerd-kuasar/plugins/internal/nsutil"
	"github.com/kuasar-io/containerd-kuasar/plugins/vmm/guest"
)

// specEnv is what the guest offers a container's spec.
type specEnv struct {
	// podNS are the pod's pinned namespaces (guest.PodNSDir/<kind>).
	podNS map[nsutil.Kind]string
	// cgroupParent holds the containers' cgroups when a spec names none
	// (or names a systemd one: the guest has no systemd).
	cgroupParent string
	// apparmor and selinux: the guest kernel enforces them (it does not:
	// a profile or label from the host's spec is dropped).
	apparmor, selinux bool
}

// guestSpec returns the spec runc runs for a container of bundle (its
// guest path, guest.BundleDir) from the host's translated spec: a copy,
// with what can only mean the host made the guest's. The host is expected
// to have translated paths already (see guest.BundleDir); this is the
// guest's own safety net:
//   - root.path absolute (a relative one is the bundle's);
//   - the network namespace dropped: the guest's is the pod's;
//   - CRI's /proc/0/ns/* placeholders pointed at the pod's namespaces,
//     and a pod namespace asked for that the pod does not have refused;
//   - hooks dropped (they name host binaries);
//   - no cgroups path, or a systemd one: cgroupParent/<id>;
//   - AppArmor and SELinux settings dropped where the guest has neither;
//   - process.terminal set as the task API asked.
func guestSpec(in *specs.Spec, id, bundle string, terminal bool, env specEnv) (*specs.Spec, error) {
	if in == nil || in.Process == nil || in.Root == nil || in.Linux == nil {
		return nil, fmt.Errorf("the OCI spec of %q needs process, root and linux: %w", id, errdefs.ErrInvalidArgument)
	}
	b, err := json.Marshal(in)
	if err != nil {
		return nil, err
	}
	var s specs.Spec
	if err := json.Unmarshal(b, &s); err != nil {
		return nil, err
	}
	if !path.IsAbs(s.Root.Path) {
		s.Root.Path = path.Join(bundle, s.Root.Path)
	}
	s.Process.Terminal = terminal
	s.Hooks = nil

	out := s.Linux.Namespaces[:0]
	for _, ns := range s.Linux.Namespaces {
		if ns.Type == specs.NetworkNamespace {
			continue
		}
		if strings.HasPrefix(ns.Path, "/proc/0/ns/") || strings.HasPrefix(ns.Path, guest.PodNSDir+"/") {
			kind := nsutil.Kind(path.Base(ns.Path))
			pinned, ok := env.podNS[kind]
			if !ok || kind != nsKind(ns.Type) {
				return nil, fmt.Errorf("container %q asks for the pod's %s namespace (%s), which the pod does not have (SetupSandbox share_pid for pid): %w", id, ns.Type, ns.Path, errdefs.ErrFailedPrecondition)
			}
			ns.Path = pinned
		}
		out = append(out, ns)
	}
	s.Linux.Namespaces = out

	if cp := s.Linux.CgroupsPath; cp == "" || strings.Count(cp, ":") == 2 {
		s.Linux.CgroupsPath = path.Join(env.cgroupParent, id)
	}
	if !env.apparmor {
		s.Process.ApparmorProfile = ""
	}
	if !env.selinux {
		s.Process.SelinuxLabel = ""
		s.Linux.MountLabel = ""
	}
	return &s, nil
}

// execSpec returns an exec's process spec as runc runs it.
func execSpec(in *specs.Process, terminal bool, env specEnv) *specs.Process {
	p := *in
	p.Terminal = terminal
	if !env.apparmor {
		p.ApparmorProfile = ""
	}
	if !env.selinux {
		p.SelinuxLabel = ""
	}
	return &p
}

// nsKind is the /proc/PID/ns name of a spec namespace type.
func nsKind(t specs.LinuxNamespaceType) nsutil.Kind {
	switch t {
	case specs.PIDNamespace:
		return nsutil.PID
	case specs.IPCNamespace:
		return nsutil.IPC
	case specs.UTSNamespace:
		return nsutil.UTS
	case specs.NetworkNamespace:
		return nsutil.Net
	}
	return nsutil.Kind(t)
}

// securityModules reports whether the guest kernel enforces AppArmor and
// SELinux.
func securityModules() (apparmor, selinux bool) {
	if b, err := os.ReadFile("/sys/module/apparmor/parameters/enabled"); err == nil && strings.HasPrefix(string(b), "Y") {
		_, err := os.Stat("/sys/kernel/security/apparmor")
		apparmor = err == nil
	}
	if _, err := os.Stat("/sys/fs/selinux/enforce"); err == nil {
		selinux = true
	}
	return apparmor, selinux
}
