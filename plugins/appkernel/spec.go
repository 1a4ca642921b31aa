package appkernel

import (
	"fmt"
	"path"
	"strings"

	"github.com/containerd/errdefs"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"
	runtime "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/kuasar-io/containerd-kuasar/plugins/internal/cgroupstats"
	"github.com/kuasar-io/containerd-kuasar/plugins/sandbox"
)

// Annotations runsc reads to put a container in a sandbox (the ones CRI
// sets on its containers).
const (
	annContainerType = "io.kubernetes.cri.container-type"
	annSandboxID     = "io.kubernetes.cri.sandbox-id"
	typeSandbox      = "sandbox"
	typeContainer    = "container"
)

// idlePath is where the root container's program is in its rootfs.
const idlePath = "/pause"

// rootSpec is the OCI spec of a pod's root container: the idle program,
// in the pod's network namespace (or the node's, for a pod on the host
// network), with the pod's hostname and sysctls; the sandbox's processes go
// in cgroup, limited as res says.
func rootSpec(sb *sandbox.Sandbox, hostname, cgroup string, res *specs.LinuxResources) *specs.Spec {
	ns := []specs.LinuxNamespace{
		{Type: specs.PIDNamespace},
		{Type: specs.IPCNamespace},
		{Type: specs.UTSNamespace},
		{Type: specs.MountNamespace},
	}
	if !sb.HostNetwork() {
		ns = append(ns, specs.LinuxNamespace{Type: specs.NetworkNamespace, Path: sb.NetNSPath})
	}
	return &specs.Spec{
		Version: specs.Version,
		Process: &specs.Process{
			Args:            []string{idlePath},
			Cwd:             "/",
			Env:             []string{"PATH=/"},
			NoNewPrivileges: true,
			Capabilities:    &specs.LinuxCapabilities{},
		},
		Root:     &specs.Root{Path: "rootfs", Readonly: true},
		Hostname: hostname,
		Annotations: map[string]string{
			annContainerType: typeSandbox,
			annSandboxID:     sb.ID,
		},
		Linux: &specs.Linux{
			Namespaces:  ns,
			CgroupsPath: cgroup,
			Resources:   res,
			Sysctl:      sb.Config.GetLinux().GetSysctls(),
		},
	}
}

// adaptSpec makes a container's spec one of a subcontainer of the pod's
// sandbox. CRI's containers have the annotations runsc reads already;
// others get them. CRI names the pod's namespaces by a sandbox pid it does
// not have (/proc/0/ns/...): the network namespace is the pod's, the IPC
// and UTS namespaces are the sandbox's own (every container of a gVisor
// sandbox shares them), and a PID namespace shared with the pod is the
// sandbox's root one (where the idle program is init).
func adaptSpec(sb *sandbox.Sandbox, spec *specs.Spec) error {
	if spec.Linux == nil {
		return fmt.Errorf("OCI spec has no linux section: %w", errdefs.ErrInvalidArgument)
	}
	if spec.Process == nil {
		return fmt.Errorf("OCI spec has no process: %w", errdefs.ErrInvalidArgument)
	}
	if spec.Annotations == nil {
		spec.Annotations = map[string]string{}
	}
	if t := spec.Annotations[annContainerType]; t == typeSandbox {
		return fmt.Errorf("container is marked as a sandbox (%s=%s): kuasar-gvisor makes the sandbox itself: %w", annContainerType, t, errdefs.ErrInvalidArgument)
	}
	if id, ok := spec.Annotations[annSandboxID]; ok && id != sb.ID {
		return fmt.Errorf("container belongs to sandbox %q, not %q (%s): %w", id, sb.ID, annSandboxID, errdefs.ErrInvalidArgument)
	}
	spec.Annotations[annContainerType] = typeContainer
	spec.Annotations[annSandboxID] = sb.ID

	out := spec.Linux.Namespaces[:0]
	for _, ns := range spec.Linux.Namespaces {
		pod := strings.HasPrefix(ns.Path, "/proc/")
		switch ns.Type {
		case specs.NetworkNamespace:
			switch {
			case sb.HostNetwork():
				continue
			case pod || ns.Path == "":
				ns.Path = sb.NetNSPath
			}
		case specs.IPCNamespace, specs.UTSNamespace:
			if pod {
				ns.Path = ""
			}
		case specs.PIDNamespace:
			if pod {
				// The pod's shared PID namespace (or a target container's,
				// which gVisor cannot name): the sandbox's root one.
				continue
			}
		case specs.UserNamespace:
			if ns.Path != "" {
				return fmt.Errorf("joining user namespace %s is not supported by kuasar-gvisor: %w", ns.Path, errdefs.ErrNotImplemented)
			}
		}
		out = append(out, ns)
	}
	spec.Linux.Namespaces = out
	return nil
}

// sandboxCgroup is the host cgroup of a pod's sandbox (every process of it:
// sentry and gofers): in the pod's cgroup, where a pause container would
// be, or, for a pod without one, under the namespace's.
func sandboxCgroup(sb *sandbox.Sandbox) string {
	parent := sb.Config.GetLinux().GetCgroupParent()
	if parent == "" {
		parent = "/" + sb.Namespace
	}
	parent = cgroupstats.ExpandSlice(parent)
	return path.Join("/", parent, sb.ID)
}

// capNames are the Linux capabilities by name.
var capNames = map[string]uint{
	"CAP_CHOWN": unix.CAP_CHOWN, "CAP_DAC_OVERRIDE": unix.CAP_DAC_OVERRIDE, "CAP_DAC_READ_SEARCH": unix.CAP_DAC_READ_SEARCH,
	"CAP_FOWNER": unix.CAP_FOWNER, "CAP_FSETID": unix.CAP_FSETID, "CAP_KILL": unix.CAP_KILL, "CAP_SETGID": unix.CAP_SETGID,
	"CAP_SETUID": unix.CAP_SETUID, "CAP_SETPCAP": unix.CAP_SETPCAP, "CAP_LINUX_IMMUTABLE": unix.CAP_LINUX_IMMUTABLE,
	"CAP_NET_BIND_SERVICE": unix.CAP_NET_BIND_SERVICE, "CAP_NET_BROADCAST": unix.CAP_NET_BROADCAST, "CAP_NET_ADMIN": unix.CAP_NET_ADMIN,
	"CAP_NET_RAW": unix.CAP_NET_RAW, "CAP_IPC_LOCK": unix.CAP_IPC_LOCK, "CAP_IPC_OWNER": unix.CAP_IPC_OWNER,
	"CAP_SYS_MODULE": unix.CAP_SYS_MODULE, "CAP_SYS_RAWIO": unix.CAP_SYS_RAWIO, "CAP_SYS_CHROOT": unix.CAP_SYS_CHROOT,
	"CAP_SYS_PTRACE": unix.CAP_SYS_PTRACE, "CAP_SYS_PACCT": unix.CAP_SYS_PACCT, "CAP_SYS_ADMIN": unix.CAP_SYS_ADMIN,
	"CAP_SYS_BOOT": unix.CAP_SYS_BOOT, "CAP_SYS_NICE": unix.CAP_SYS_NICE, "CAP_SYS_RESOURCE": unix.CAP_SYS_RESOURCE,
	"CAP_SYS_TIME": unix.CAP_SYS_TIME, "CAP_SYS_TTY_CONFIG": unix.CAP_SYS_TTY_CONFIG, "CAP_MKNOD": unix.CAP_MKNOD,
	"CAP_LEASE": unix.CAP_LEASE, "CAP_AUDIT_WRITE": unix.CAP_AUDIT_WRITE, "CAP_AUDIT_CONTROL": unix.CAP_AUDIT_CONTROL,
	"CAP_SETFCAP": unix.CAP_SETFCAP, "CAP_MAC_OVERRIDE": unix.CAP_MAC_OVERRIDE, "CAP_MAC_ADMIN": unix.CAP_MAC_ADMIN,
	"CAP_SYSLOG": unix.CAP_SYSLOG, "CAP_WAKE_ALARM": unix.CAP_WAKE_ALARM, "CAP_BLOCK_SUSPEND": unix.CAP_BLOCK_SUSPEND,
	"CAP_AUDIT_READ": unix.CAP_AUDIT_READ, "CAP_PERFMON": unix.CAP_PERFMON, "CAP_BPF": unix.CAP_BPF,
	"CAP_CHECKPOINT_RESTORE": unix.CAP_CHECKPOINT_RESTORE,
}

// capSet turns capability names into a bit set, without those in drop.
func capSet(names []string, drop map[uint]bool) (uint64, error) {
	var set uint64
	for _, n := range names {
		c, ok := capNames[strings.ToUpper(n)]
		if !ok {
			return 0, fmt.Errorf("unknown capability %q: %w", n, errdefs.ErrInvalidArgument)
		}
		if !drop[c] {
			set |= 1 << c
		}
	}
	return set, nil
}

// hostnameOf is the hostname the pod's containers see: the one of its
// hostname file (CRI's, or the node's for a pod on the host network).
func hostnameOf(sb *sandbox.Sandbox, file []byte) string {
	if h := strings.TrimSpace(string(file)); h != "" {
		return h
	}
	return sb.Config.GetHostname()
}

// podUsernsRequested reports whether the pod asks for a user namespace of
// its own.
func podUsernsRequested(sb *sandbox.Sandbox) bool {
	u := sb.Config.GetLinux().GetSecurityContext().GetNamespaceOptions().GetUsernsOptions()
	return u != nil && u.GetMode() == runtime.NamespaceMode_POD
}
