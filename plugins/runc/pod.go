package runc

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/containerd/containerd/api/types"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"
	runtime "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/kuasar-io/containerd-kuasar/plugins/internal/cgroupstats"
	"github.com/kuasar-io/containerd-kuasar/plugins/internal/nsutil"
	"github.com/kuasar-io/containerd-kuasar/plugins/internal/proc"
	"github.com/kuasar-io/containerd-kuasar/plugins/sandbox"
	"github.com/kuasar-io/containerd-kuasar/plugins/task"
)

// podState is what a kuasar-runc pod records about itself.
type podState struct {
	// Namespaces the pod owns or joins, by kind (ipc, uts, net).
	Namespaces map[nsutil.Kind]string `json:"namespaces,omitempty"`
	// Pinned lists the namespace files this pod created (and releases).
	Pinned []string `json:"pinned,omitempty"`
	// HolderPid and HolderStart name the init of the pod's shared PID
	// namespace, if any; HolderID is its runc container.
	HolderPid     int    `json:"holderPid,omitempty"`
	HolderStart   uint64 `json:"holderStart,omitempty"`
	HolderID      string `json:"holderID,omitempty"`
	HolderSystemd bool   `json:"holderSystemd,omitempty"`
	// Shm is the pod's /dev/shm mount, if it has its own.
	Shm string `json:"shm,omitempty"`
}

// pod is one kuasar-runc sandbox: namespaces pinned to files instead of a
// pause process, and CRI's pod files.
type pod struct {
	k  *kind
	sb *sandbox.Sandbox

	mu sync.Mutex
	st podState
}

const defaultShmSize = 64 << 20

func nsOptions(sb *sandbox.Sandbox) *runtime.NamespaceOption {
	return sb.Config.GetLinux().GetSecurityContext().GetNamespaceOptions()
}

// create builds the pod; on error it undoes what it did.
func (p *pod) create(ctx context.Context) (retErr error) {
	sb, ns := p.sb, nsOptions(p.sb)
	defer func() {
		if retErr != nil {
			if err := p.Shutdown(context.WithoutCancel(ctx)); err != nil {
				log.G(ctx).WithError(err).Warn("undoing a pod that failed to create")
			}
		}
	}()
	if u := ns.GetUsernsOptions(); u != nil && u.GetMode() == runtime.NamespaceMode_POD {
		return fmt.Errorf("pod user namespaces are not supported by kuasar-runc: %w", errdefs.ErrNotImplemented)
	}
	if ns.GetPid() == runtime.NamespaceMode_TARGET {
		return fmt.Errorf("a pod cannot target a container's PID namespace: %w", errdefs.ErrInvalidArgument)
	}
	p.st.Namespaces = map[nsutil.Kind]string{}
	var kinds []nsutil.Kind
	hostname := ""
	if ns.GetIpc() != runtime.NamespaceMode_NODE {
		kinds = append(kinds, nsutil.IPC)
	}
	if !sb.HostNetwork() {
		if sb.NetNSPath == "" {
			return fmt.Errorf("pod has no network namespace from CRI: %w", errdefs.ErrInvalidArgument)
		}
		p.st.Namespaces[nsutil.Net] = sb.NetNSPath
		kinds = append(kinds, nsutil.UTS)
		hostname = sb.Config.GetHostname()
	}
	pinned, err := nsutil.Create(filepath.Join(sb.Dir, "ns"), kinds, hostname)
	if err != nil {
		return fmt.Errorf("creating pod namespaces: %w", err)
	}
	for k, path := range pinned {
		p.st.Namespaces[k] = path
		p.st.Pinned = append(p.st.Pinned, path)
	}

	if ns.GetIpc() != runtime.NamespaceMode_NODE {
		shm := filepath.Join(sb.Dir, "shm")
		if err := os.MkdirAll(shm, 0o700); err != nil {
			return err
		}
		opts := fmt.Sprintf("mode=1777,size=%d", defaultShmSize)
		if err := unix.Mount("shm", shm, "tmpfs", unix.MS_NOEXEC|unix.MS_NOSUID|unix.MS_NODEV, opts); err != nil {
			return fmt.Errorf("mounting pod /dev/shm: %w", err)
		}
		p.st.Shm = shm
		sb.ShmDir = shm
	}

	if err := nsutil.ApplySysctls(p.st.Namespaces, p.sysctls()); err != nil {
		return fmt.Errorf("%w: %w", err, errdefs.ErrInvalidArgument)
	}

	if ns.GetPid() == runtime.NamespaceMode_POD {
		if err := p.startHolder(ctx); err != nil {
			return err
		}
	}
	return p.saveState()
}

// sysctls are the pod's, plus the unprivileged port and ICMP defaults CRI
// gives every pod with its own network.
func (p *pod) sysctls() map[string]string {
	out := map[string]string{}
	if !p.sb.HostNetwork() {
		if p.k.cfg.EnableUnprivilegedPorts {
			out["net.ipv4.ip_unprivileged_port_start"] = "0"
		}
		if p.k.cfg.EnableUnprivilegedICMP {
			out["net.ipv4.ping_group_range"] = "0 2147483647"
		}
	}
	for k, v := range p.sb.Config.GetLinux().GetSysctls() {
		out[k] = v
	}
	return out
}

func (p *pod) saveState() error {
	b, err := json.Marshal(&p.st)
	if err != nil {
		return err
	}
	p.sb.State = b
	return nil
}

func (p *pod) Start(context.Context) error { return nil }

func (p *pod) Runtime() task.Runtime { return &containers{pod: p, k: p.k} }

// Stop ends the PID namespace holder and releases the pod's namespaces and
// /dev/shm: nothing runs in them any more.
func (p *pod) Stop(ctx context.Context) error {
	p.release(ctx)
	return p.saveState()
}

// Shutdown releases everything.
func (p *pod) Shutdown(ctx context.Context) error {
	p.release(ctx)
	return nil
}

// release undoes create; it is idempotent.
func (p *pod) release(ctx context.Context) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.stopHolderLocked(ctx)
	for _, path := range p.st.Pinned {
		if err := nsutil.Release(path); err != nil {
			log.G(ctx).WithError(err).Warn("releasing pod namespace")
		}
	}
	p.st.Pinned = nil
	if p.st.Shm != "" {
		if err := unix.Unmount(p.st.Shm, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
			log.G(ctx).WithError(err).Warn("unmounting pod /dev/shm")
		}
		p.st.Shm = ""
	}
}

func waitGone(pid int, start uint64, d time.Duration) {
	for deadline := time.Now().Add(d); time.Now().Before(deadline); time.Sleep(5 * time.Millisecond) {
		if st, err := proc.ReadStat(pid); err != nil || st.StartTime != start || st.State == 'Z' {
			return
		}
	}
}

// Metrics of the pod's cgroup (its cgroup_parent).
func (p *pod) Metrics(ctx context.Context) (*types.Metric, error) {
	parent := p.sb.Config.GetLinux().GetCgroupParent()
	if parent == "" {
		return nil, fmt.Errorf("pod %s has no cgroup_parent to report: %w", p.sb.ID, errdefs.ErrFailedPrecondition)
	}
	if strings.HasSuffix(parent, ".slice") {
		parent = cgroupstats.ExpandSlice(parent)
	}
	data, err := cgroupstats.Metrics(cgroupstats.StaticPaths(parent))
	if err != nil {
		return nil, err
	}
	return &types.Metric{ID: p.sb.ID, Data: data}, nil
}

func (p *pod) Info() map[string]any {
	p.mu.Lock()
	defer p.mu.Unlock()
	ns := map[string]string{}
	for k, v := range p.st.Namespaces {
		ns[string(k)] = v
	}
	info := map[string]any{"namespaces": ns, "pid": 0}
	if p.st.HolderPid != 0 {
		info["pidNamespaceHolder"] = p.st.HolderPid
	}
	return info
}

// joinNamespace says where a container joins the pod's namespace of type
// t: the path of the pod's own, or host when the pod uses the node's.
func (p *pod) joinNamespace(t specs.LinuxNamespaceType) (path string, host bool, err error) {
	opts := nsOptions(p.sb)
	var kind nsutil.Kind
	switch t {
	case specs.NetworkNamespace, specs.UTSNamespace:
		// A pod on the node's network keeps the node's hostname too.
		if p.sb.HostNetwork() {
			return "", true, nil
		}
		kind = nsutil.Net
		if t == specs.UTSNamespace {
			kind = nsutil.UTS
		}
	case specs.IPCNamespace:
		if opts.GetIpc() == runtime.NamespaceMode_NODE {
			return "", true, nil
		}
		kind = nsutil.IPC
	case specs.PIDNamespace:
		if opts.GetPid() == runtime.NamespaceMode_NODE {
			return "", true, nil
		}
	default:
		return "", false, fmt.Errorf("the pod's %s namespace is not supported by kuasar-runc: %w", t, errdefs.ErrNotImplemented)
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if t == specs.PIDNamespace {
		switch {
		case p.st.HolderPid == 0 && opts.GetPid() == runtime.NamespaceMode_POD && p.st.HolderID != "":
			return "", false, fmt.Errorf("the init of the pod's shared PID namespace has exited: %w", errdefs.ErrFailedPrecondition)
		case p.st.HolderPid == 0:
		case p.st.Namespaces[nsutil.PID] != "":
			return p.st.Namespaces[nsutil.PID], false, nil
		default:
			// Recorded by an older daemon, which did not pin it.
			return nsutil.ProcPath(p.st.HolderPid, "pid"), false, nil
		}
	} else if path, ok := p.st.Namespaces[kind]; ok {
		return path, false, nil
	}
	return "", false, fmt.Errorf("container asks for the pod's %s namespace, which the pod does not have: %w", t, errdefs.ErrInvalidArgument)
}

// PodNamespaces are the namespaces of the pod on the node that its
// containers join.
func (p *pod) PodNamespaces() []specs.LinuxNamespace {
	var out []specs.LinuxNamespace
	for _, t := range []specs.LinuxNamespaceType{specs.NetworkNamespace, specs.IPCNamespace, specs.UTSNamespace, specs.PIDNamespace} {
		// No shared PID namespace (each container has its own) is an
		// error here: nothing to name.
		if path, host, err := p.joinNamespace(t); err == nil && !host {
			out = append(out, specs.LinuxNamespace{Type: t, Path: path})
		}
	}
	return out
}
