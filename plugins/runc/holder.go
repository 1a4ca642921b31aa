package runc

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"
	runtime "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/kuasar-io/containerd-kuasar/plugins/internal/fsutil"
	"github.com/kuasar-io/containerd-kuasar/plugins/internal/nsutil"
	"github.com/kuasar-io/containerd-kuasar/plugins/internal/proc"
	"github.com/kuasar-io/containerd-kuasar/plugins/keeper"
	"github.com/kuasar-io/containerd-kuasar/plugins/task"
)

// A pod that shares one PID namespace among its containers needs a process
// to be that namespace's init, since the namespace ends with it. That is
// the only process a kuasar-runc pod ever has of its own: the holder. It is
// confined as stock containerd's pause is, by runc itself: the pod's
// network, IPC and UTS namespaces; a mount namespace whose root is an empty
// read-only directory holding nothing but the holder's own binary; its own
// cgroup namespace; the pod's cgroup; user and group 65535, no
// capabilities, no new privileges. From a container of the pod,
// /proc/1/root shows that empty directory and /proc/1/net the pod's
// network, nothing of the node.

// holderUID is the user and group the holder runs as, as stock pause.
const holderUID = 65535

// holderBinary is where the holder's binary (kuasar-keeper, which acts as
// pause when so named) appears inside its root.
const holderBinary = "/pause"

// holderID is the runc container ID of a pod's holder.
func holderID(sandboxID string) string { return "pod-" + sandboxID }

// holderSpec is the OCI spec of a pod's holder.
func (p *pod) holderSpec() (*specs.Spec, error) {
	sb := p.sb
	nsOpts := nsOptions(sb)
	namespaces := []specs.LinuxNamespace{
		{Type: specs.PIDNamespace},
		{Type: specs.MountNamespace},
		{Type: specs.CgroupNamespace},
	}
	join := func(t specs.LinuxNamespaceType, k nsutil.Kind) error {
		path, ok := p.st.Namespaces[k]
		if !ok {
			return fmt.Errorf("the pod has no %s namespace for its PID namespace holder", k)
		}
		namespaces = append(namespaces, specs.LinuxNamespace{Type: t, Path: path})
		return nil
	}
	if !sb.HostNetwork() {
		if err := join(specs.NetworkNamespace, nsutil.Net); err != nil {
			return nil, err
		}
		if err := join(specs.UTSNamespace, nsutil.UTS); err != nil {
			return nil, err
		}
	}
	if nsOpts.GetIpc() != runtime.NamespaceMode_NODE {
		if err := join(specs.IPCNamespace, nsutil.IPC); err != nil {
			return nil, err
		}
	}
	empty := []string{}
	return &specs.Spec{
		Version: specs.Version,
		Process: &specs.Process{
			Args:            []string{holderBinary},
			Env:             []string{"PATH=/"},
			Cwd:             "/",
			User:            specs.User{UID: holderUID, GID: holderUID},
			NoNewPrivileges: true,
			Capabilities:    &specs.LinuxCapabilities{Bounding: empty, Effective: empty, Permitted: empty, Inheritable: empty, Ambient: empty},
		},
		Root: &specs.Root{Path: "rootfs", Readonly: true},
		Mounts: []specs.Mount{
			{
				Destination: holderBinary,
				Type:        "bind",
				Source:      p.k.env.Monitor.KeeperBinary(),
				Options:     []string{"bind", "ro", "nosuid", "nodev"},
			},
			// runc's init needs /proc (it shows the pod's PID namespace)
			// and /dev/null, which masks paths of /proc.
			{Destination: "/proc", Type: "proc", Source: "proc", Options: []string{"nosuid", "noexec", "nodev"}},
			{Destination: "/dev", Type: "tmpfs", Source: "tmpfs", Options: []string{"nosuid", "noexec", "mode=755", "size=64k"}},
		},
		Linux: &specs.Linux{
			Namespaces:    namespaces,
			CgroupsPath:   p.holderCgroupsPath(),
			MaskedPaths:   maskedPaths,
			ReadonlyPaths: readonlyPaths,
		},
	}, nil
}

// maskedPaths and readonlyPaths are those of containerd's default spec.
var (
	maskedPaths = []string{
		"/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats", "/proc/timer_list",
		"/proc/timer_stats", "/proc/sched_debug", "/proc/scsi", "/sys/firmware", "/sys/devices/virtual/powercap",
	}
	readonlyPaths = []string{"/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"}
)

// holderCgroupsPath puts the holder in the pod's cgroup, as stock puts
// pause: <cgroup_parent>/<sandbox id>, or systemd's slice:prefix:name.
func (p *pod) holderCgroupsPath() string {
	parent := p.sb.Config.GetLinux().GetCgroupParent()
	switch {
	case parent == "":
		return "/" + p.sb.Namespace + "/" + holderID(p.sb.ID)
	case strings.HasSuffix(parent, ".slice"):
		return parent + ":kuasar:" + holderID(p.sb.ID)
	}
	return filepath.Join(parent, holderID(p.sb.ID))
}

// startHolder starts the init of the pod's shared PID namespace, through
// runc and the keeper, and watches it.
func (p *pod) startHolder(ctx context.Context) (retErr error) {
	mon := p.k.env.Monitor
	if mon.KeeperBinary() == "" {
		return fmt.Errorf("a shared PID namespace needs kuasar-keeper: %w", errdefs.ErrFailedPrecondition)
	}
	rc, err := p.k.runc()
	if err != nil {
		return err
	}
	spec, err := p.holderSpec()
	if err != nil {
		return err
	}
	bundle := filepath.Join(p.sb.Dir, "holder")
	rootfs := filepath.Join(bundle, "rootfs")
	for _, d := range []string{"proc", "dev"} {
		if err := os.MkdirAll(filepath.Join(rootfs, d), 0o555); err != nil {
			return err
		}
	}
	// The mount point of the binary, in a root that is read-only.
	if err := os.WriteFile(filepath.Join(rootfs, strings.TrimPrefix(holderBinary, "/")), nil, 0o555); err != nil {
		return err
	}
	b, err := json.Marshal(spec)
	if err != nil {
		return err
	}
	if err := fsutil.WriteFileAtomic(filepath.Join(bundle, "config.json"), b, 0o600); err != nil {
		return err
	}
	id := holderID(p.sb.ID)
	rc = rc.forContainer(ctrState{Systemd: isSystemdCgroupsPath(spec.Linux.CgroupsPath)})
	p.st.HolderSystemd = rc.systemd
	pidFile := filepath.Join(bundle, "init.pid")
	r := &containers{pod: p, k: p.k}
	p.st.HolderID = id
	defer func() {
		if retErr != nil {
			p.release(context.WithoutCancel(ctx))
		}
	}()
	holder, err := r.spawn(ctx, rc, bundle, id, "", task.IO{}, []string{"create", "--bundle", bundle, "--pid-file", pidFile}, pidFile)
	if err != nil {
		return fmt.Errorf("creating the pod's PID namespace holder: %w", err)
	}
	p.st.HolderPid, p.st.HolderStart = holder.Pid, holder.StartTime
	// Containers join the namespace through a file of the pod's, never
	// through /proc/<pid>, which a reused pid could make someone else's.
	pin := filepath.Join(p.sb.Dir, "ns", string(nsutil.PID))
	if err := nsutil.PinOf(holder.Pid, holder.StartTime, nsutil.PID, pin); err != nil {
		return fmt.Errorf("pinning the pod's PID namespace: %w", err)
	}
	p.st.Namespaces[nsutil.PID] = pin
	p.st.Pinned = append(p.st.Pinned, pin)
	if err := startInProcess(rc.execFifo(id), holder.Pid, holder.StartTime); err != nil {
		if !errors.Is(err, errNoExecFifo) {
			return fmt.Errorf("starting the pod's PID namespace holder: %w", err)
		}
		if _, err := rc.run(ctx, nil, "start", id); err != nil {
			return fmt.Errorf("starting the pod's PID namespace holder: %w", err)
		}
	}
	p.watchHolder(ctx)
	return nil
}

func (p *pod) holderRef() keeper.ProcessRef {
	return keeper.ProcessRef{Pid: p.st.HolderPid, StartTime: p.st.HolderStart}
}

func (p *pod) watchHolder(ctx context.Context) {
	p.k.env.Monitor.Watch(ctx, p.holderRef(), p.holderExited(p.holderRef()))
}

// holderExited ends the pod when its holder ends on its own.
func (p *pod) holderExited(watched keeper.ProcessRef) func(keeper.Exit) {
	return func(e keeper.Exit) {
		p.mu.Lock()
		mine := p.holderRef() == watched
		if mine {
			p.st.HolderPid, p.st.HolderStart = 0, 0
		}
		p.mu.Unlock()
		if mine {
			p.sb.Exited(uint32(e.Status))
		}
	}
}

// stopHolderLocked ends the holder and removes its runc state; called with
// p.mu held.
func (p *pod) stopHolderLocked(ctx context.Context) {
	if ref := p.holderRef(); ref.Pid != 0 {
		p.st.HolderPid, p.st.HolderStart = 0, 0
		p.k.env.Monitor.Unwatch(ref)
		if err := proc.Signal(ref.Pid, ref.StartTime, unix.SIGKILL); err == nil {
			waitGone(ref.Pid, ref.StartTime, 5*time.Second)
		}
	}
	if p.st.HolderID == "" {
		return
	}
	rc, err := p.k.runc()
	if err != nil {
		log.G(ctx).WithError(err).Warn("cannot remove the PID namespace holder's runc state")
		return
	}
	rc = rc.forContainer(ctrState{Systemd: p.st.HolderSystemd})
	if _, err := rc.run(ctx, nil, "delete", "--force", p.st.HolderID); err != nil && !errdefs.IsNotFound(err) {
		log.G(ctx).WithError(err).Warn("removing the PID namespace holder")
		return
	}
	p.st.HolderID = ""
}
