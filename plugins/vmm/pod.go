package vmm

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/containerd/containerd/api/types"
	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/moby/sys/mountinfo"
	"golang.org/x/sys/unix"
	"google.golang.org/protobuf/types/known/emptypb"
	"google.golang.org/protobuf/types/known/timestamppb"
	runtime "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/kuasar-io/containerd-kuasar/plugins/internal/proc"
	"github.com/kuasar-io/containerd-kuasar/plugins/keeper"
	"github.com/kuasar-io/containerd-kuasar/plugins/keeper/api"
	"github.com/kuasar-io/containerd-kuasar/plugins/sandbox"
	"github.com/kuasar-io/containerd-kuasar/plugins/task"
	"github.com/kuasar-io/containerd-kuasar/plugins/vmm/agentapi"
	"github.com/kuasar-io/containerd-kuasar/plugins/vmm/guest"
	"github.com/kuasar-io/containerd-kuasar/plugins/vmm/hypervisor"
	"github.com/kuasar-io/containerd-kuasar/plugins/vmm/jail"
	"github.com/kuasar-io/containerd-kuasar/plugins/vmm/network"
	"github.com/kuasar-io/containerd-kuasar/plugins/vmm/qemu"
)

// podInterface is the CNI interface of a pod's network namespace that the
// VM's NIC takes the place of.
const podInterface = "eth0"

// podState is what a kuasar-vmm pod records about itself.
type podState struct {
	VCPUs     int    `json:"vcpus"`
	MemoryMiB int    `json:"memoryMiB"`
	RunDir    string `json:"runDir"`
	Cgroup    string `json:"cgroup"`
	// VM is the hypervisor's record, once it is spawned.
	VM *hypervisor.State `json:"vm,omitempty"`
	// Template is the key of the template the VM was cloned from ("":
	// booted).
	Template string `json:"template,omitempty"`
	// Network is set once the pod interface is joined to the VM's tap.
	Network bool `json:"network,omitempty"`
}

// pod is one kuasar-vmm sandbox: a VM.
type pod struct {
	k  *kind
	sb *sandbox.Sandbox

	mu    sync.Mutex
	st    podState
	vm    *qemu.VM
	guest *guestConn
	// stopping is set once Stop began: the VM's exit is then no surprise.
	stopping bool
	rt       *containers
}

// shareDir is the host directory the guest mounts at guest.ShareDir.
func (p *pod) shareDir() string { return filepath.Join(p.sb.Dir, "shared") }

// shareRW is the share's own directory, where the daemon makes what the
// guest sees; shareDir is a read-only bind of it, which the hypervisor
// exports: the guest writes only in the mounts attached beneath (a
// container's rootfs, its volumes), on their file systems, never in the
// share's own directories on the node's state file system (a tmpfs).
func (p *pod) shareRW() string { return filepath.Join(p.sb.Dir, "share") }

// prepareShare makes the share and its read-only bind (again, after a
// crash left part of it).
func (p *pod) prepareShare() error {
	for _, d := range []string{p.shareRW(), p.shareDir()} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return err
		}
	}
	if ok, err := mountinfo.Mounted(p.shareDir()); err != nil || ok {
		return err
	}
	if err := unix.Mount(p.shareRW(), p.shareDir(), "", unix.MS_BIND, ""); err != nil {
		return fmt.Errorf("binding the pod's share: %w", err)
	}
	if err := unix.Mount("", p.shareDir(), "", unix.MS_REMOUNT|unix.MS_BIND|unix.MS_RDONLY|unix.MS_NOSUID|unix.MS_NODEV, ""); err != nil {
		_ = unix.Unmount(p.shareDir(), unix.MNT_DETACH)
		return fmt.Errorf("making the pod's share read-only: %w", err)
	}
	return nil
}

func (p *pod) create(ctx context.Context) (retErr error) {
	sb := p.sb
	ns := sb.Config.GetLinux().GetSecurityContext().GetNamespaceOptions()
	switch {
	case sb.HostNetwork():
		return fmt.Errorf("a %s pod cannot use the node's network: a VM has a network of its own (use another runtime handler for hostNetwork pods): %w", ID, errdefs.ErrInvalidArgument)
	case ns.GetIpc() == runtime.NamespaceMode_NODE:
		return fmt.Errorf("a %s pod cannot use the node's IPC namespace (hostIPC): a VM has its own: %w", ID, errdefs.ErrInvalidArgument)
	case ns.GetPid() == runtime.NamespaceMode_NODE:
		return fmt.Errorf("a %s pod cannot use the node's PID namespace (hostPID): a VM has its own: %w", ID, errdefs.ErrInvalidArgument)
	case ns.GetPid() == runtime.NamespaceMode_TARGET:
		return fmt.Errorf("a pod cannot target a container's PID namespace: %w", errdefs.ErrInvalidArgument)
	case ns.GetUsernsOptions() != nil && ns.GetUsernsOptions().GetMode() == runtime.NamespaceMode_POD:
		return fmt.Errorf("pod user namespaces are not supported by %s: %w", ID, errdefs.ErrNotImplemented)
	case sb.NetNSPath == "":
		return fmt.Errorf("pod has no network namespace from CRI: %w", errdefs.ErrInvalidArgument)
	}
	vcpus, mem, err := p.k.size(sb.Config)
	if err != nil {
		return err
	}
	h := sha256.Sum256([]byte(sb.Namespace + "/" + sb.ID))
	p.st = podState{
		VCPUs:     vcpus,
		MemoryMiB: mem,
		RunDir:    filepath.Join(p.k.runDirs, hex.EncodeToString(h[:8])),
		Cgroup:    vmCgroup(sb),
	}
	if err := p.prepareShare(); err != nil {
		return err
	}
	return p.saveState()
}

func (p *pod) saveState() error {
	b, err := json.Marshal(&p.st)
	if err != nil {
		return err
	}
	p.sb.State = b
	return nil
}

// Start boots the pod's VM (or restores a clone of its template), joins it
// to the pod's network, and makes the guest the pod. On error it leaves
// nothing running.
func (p *pod) Start(ctx context.Context) (retErr error) {
	ctx, cancel := context.WithTimeout(ctx, p.k.bootTimeout)
	defer cancel()
	begin := time.Now()
	defer func() {
		if retErr != nil && ctx.Err() != nil && !strings.Contains(retErr.Error(), "boot_timeout") {
			// Out of time at any step: say which bound it was.
			retErr = fmt.Errorf("the pod's VM did not start within boot_timeout (%s; an overloaded node may need more: raise it under [plugins.'io.containerd.sandbox.controller.v1.%s']): %w", p.k.bootTimeout, ID, retErr)
		}
		if retErr != nil {
			p.release(context.WithoutCancel(ctx))
		}
	}()
	img, err := p.k.image()
	if err != nil {
		return err
	}
	cfg := p.vmConfig(img)
	clone := false
	if p.k.cfg.Template == "auto" {
		t, err := p.k.templates.get(ctx, img, cfg, p.templateScope())
		if err != nil {
			log.G(ctx).WithError(err).WithField("sandbox", p.sb.ID).Warn("no VM template: booting the pod's VM")
		} else if err := p.startClone(ctx, cfg, t); err != nil {
			log.G(ctx).WithError(err).WithField("sandbox", p.sb.ID).Warn("restoring the VM template failed: booting the pod's VM")
			p.stopVM(ctx)
		} else {
			clone = true
		}
	}
	if !clone {
		if err := p.spawn(ctx, cfg); err != nil {
			return err
		}
	}
	spawned := time.Since(begin)
	s, err := p.guest.session(ctx)
	if err != nil {
		if ctx.Err() != nil {
			// Out of time, whatever the last attempt said.
			return fmt.Errorf("the VM's agent did not answer within %s (raise boot_timeout under [plugins.'io.containerd.sandbox.controller.v1.%s']; the guest's console ended with %q): %v: %w",
				p.k.bootTimeout, ID, p.consoleTail(ctx), err, context.DeadlineExceeded)
		}
		return fmt.Errorf("reaching the VM's agent (the guest's console ended with %q): %w", p.consoleTail(ctx), err)
	}
	if _, err := s.agent.SyncClock(ctx, &agentapi.SyncClockRequest{HostTime: timestamppb.Now()}); err != nil {
		return fmt.Errorf("setting the guest's clock: %w", err)
	}
	ready := time.Since(begin)
	boot := "cold"
	if clone {
		boot = "template"
	}
	p.k.env.Metrics.VMBooted(p.sb.Handler, string(p.k.accel), boot, ready)
	if err := p.joinNetwork(ctx); err != nil {
		return err
	}
	if err := p.setupSandbox(ctx); err != nil {
		return err
	}
	log.G(ctx).WithField("sandbox", p.sb.ID).WithField("accel", p.k.accel).WithField("template", p.st.Template).
		WithField("spawned", spawned).WithField("agentReady", ready).WithField("took", time.Since(begin)).
		WithField("vcpus", p.st.VCPUs).WithField("memoryMiB", p.st.MemoryMiB).Info("pod VM started")
	return p.saveState()
}

func (p *pod) vmConfig(img *guest.Image) hypervisor.Config {
	return hypervisor.Config{
		ID:           p.sb.ID,
		RunDir:       p.st.RunDir,
		Binary:       p.k.cfg.HypervisorPath,
		Kernel:       img.Kernel,
		Initrd:       img.Initrd,
		VCPUs:        p.st.VCPUs,
		MemoryMiB:    p.st.MemoryMiB,
		Accel:        p.k.accel,
		TBSizeMiB:    p.k.cfg.TBSizeMiB,
		HotplugSlots: 1,
		Shares:       []hypervisor.Share{{Tag: guest.ShareTag, Path: p.shareDir()}},
	}
}

// templateScope is who the pod's VM may share a template with: a clone's
// QEMU holds its template's RAM file open for writing (QEMU 7.2 maps it
// copy-on-write from a writable file only), so a QEMU a guest took over
// could change the RAM of every VM cloned from the same template. With
// template_scope "namespace" those are its namespace's pods only.
func (p *pod) templateScope() string {
	if p.k.cfg.TemplateScope == "node" {
		return ""
	}
	return "namespace/" + p.sb.Config.GetMetadata().GetNamespace()
}

// spawn starts a VM from cfg through the node's keeper, in the pod's
// cgroup, and attaches to it.
func (p *pod) spawn(ctx context.Context, cfg hypervisor.Config) error {
	launch, st, err := qemu.Driver{}.Prepare(ctx, cfg)
	if err != nil {
		return err
	}
	p.st.VM = &st
	ref, err := p.k.spawnVMM(ctx, launch)
	if err != nil {
		return err
	}
	st.Pid, st.StartTime = ref.Pid, ref.StartTime
	if err := joinCgroup(p.st.Cgroup, ref.Pid); err != nil {
		log.G(ctx).WithError(err).WithField("sandbox", p.sb.ID).Warn("the VM does not run in the pod's cgroup")
	}
	vm, err := qemu.Attach(ctx, st)
	if err != nil {
		// Not left running: nothing attached to it to stop it later.
		_ = proc.Signal(ref.Pid, ref.StartTime, unix.SIGKILL)
		return fmt.Errorf("the VM did not come up (QEMU said %q): %w", qemu.LogTail(st.RunDir, 512), err)
	}
	p.mu.Lock()
	p.vm, p.guest = vm, newGuestConn(vm)
	st = vm.State()
	p.st.VM = &st
	p.mu.Unlock()
	p.watchVM(ctx, ref)
	return p.saveState()
}

// spawnVMM starts a hypervisor as a child of the node's process keeper
// (it must outlive the daemon), its output to the launch's log, jailed
// (package jail) unless the config says otherwise.
func (k *kind) spawnVMM(ctx context.Context, l *hypervisor.Launch) (keeper.ProcessRef, error) {
	envv := l.Env
	if envv == nil {
		envv = []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
	}
	path, args := l.Path, append([]string{l.Path}, l.Args...)
	var cloneflags uint64
	if k.cfg.Jail {
		// Namespaces of its own but for the user one: it sees no
		// process, network (the node's loopback services, the metadata
		// service, abstract sockets), IPC object or host name of the
		// node. Its tap comes as a descriptor, its sockets are paths.
		cloneflags = unix.CLONE_NEWPID | unix.CLONE_NEWNET | unix.CLONE_NEWIPC | unix.CLONE_NEWUTS
		helper := k.env.Monitor.KeeperBinary()
		if helper == "" {
			return keeper.ProcessRef{}, fmt.Errorf("jailing the hypervisor: kuasar-keeper not found: %w", errdefs.ErrNotFound)
		}
		var err error
		path, args, err = jail.Command(helper, jail.Spec{
			Root:         filepath.Join(l.Dir, "jail"),
			ReadOnly:     l.Access.ReadOnly,
			Writable:     l.Access.Writable,
			Devices:      l.Access.Devices,
			Capabilities: l.Access.Capabilities,
		}, l.Path, l.Args)
		if err != nil {
			return keeper.ProcessRef{}, fmt.Errorf("jailing the hypervisor: %w", err)
		}
	}
	r, err := k.env.Monitor.Spawn(ctx, &api.SpawnRequest{
		Path:   path,
		Args:   args,
		Env:    envv,
		Dir:    l.Dir,
		Stdio:  &api.Stdio{Stdout: "file://" + l.Log, Stderr: "file://" + l.Log},
		Setsid: true,
		// A mount namespace of its own, where the share's mounts go
		// (share.go); jailed, PID, network, IPC and UTS ones too.
		Unshareflags: unix.CLONE_NEWNS,
		Cloneflags:   cloneflags,
	})
	if err != nil {
		return keeper.ProcessRef{}, fmt.Errorf("starting the hypervisor %s: %w", l.Path, err)
	}
	return r.Process, nil
}

// watchVM ends the pod when its VM exits without being asked to.
func (p *pod) watchVM(ctx context.Context, ref keeper.ProcessRef) {
	p.k.env.Monitor.Watch(ctx, ref, func(e keeper.Exit) { p.vmExited(e) })
}

func (p *pod) vmExited(e keeper.Exit) {
	p.mu.Lock()
	expected := p.stopping
	p.mu.Unlock()
	if !expected {
		log.L.WithField("sandbox", p.sb.ID).WithField("status", e.Status).Error("the pod's VM exited")
	}
	p.sb.Exited(uint32(e.Status))
}

// joinNetwork gives the VM the pod's interface: a tap in the pod's
// network namespace, joined to the CNI interface, hot-plugged into the VM
// as a NIC with the interface's MAC, and configured in the guest with its
// addresses and routes.
func (p *pod) joinNetwork(ctx context.Context) (retErr error) {
	att, err := network.Attach(ctx, p.sb.NetNSPath, podInterface)
	if err != nil {
		return fmt.Errorf("joining the pod's network: %w", err)
	}
	defer att.Tap.Close() // QEMU holds its own once added
	p.st.Network = true
	if err := p.vm.AddNIC(ctx, hypervisor.NIC{ID: "nic0", MAC: att.Interface.MAC, TapFD: att.Tap.Fd()}); err != nil {
		return fmt.Errorf("adding the VM's NIC: %w", err)
	}
	return p.guest.call(ctx, false, func(ctx context.Context, s *session) error {
		_, err := s.agent.SetupNetwork(ctx, network.SetupRequest(att.Interface))
		return err
	})
}

// setupSandbox makes the guest the pod (its namespaces, /dev/shm,
// sysctls, the share).
func (p *pod) setupSandbox(ctx context.Context) error {
	cfg := p.sb.Config
	req := &agentapi.SetupSandboxRequest{
		SandboxId: p.sb.ID,
		Hostname:  cfg.GetHostname(),
		Sysctls:   cfg.GetLinux().GetSysctls(),
		SharePid:  cfg.GetLinux().GetSecurityContext().GetNamespaceOptions().GetPid() == runtime.NamespaceMode_POD,
		ShareTag:  guest.ShareTag,
		ShareType: hypervisor.Share9P,
	}
	return p.guest.call(ctx, true, func(ctx context.Context, s *session) error {
		_, err := s.agent.SetupSandbox(ctx, req)
		return err
	})
}

// recover takes the VM back after a daemon restart.
func (p *pod) recover(ctx context.Context) error {
	if p.st.VM == nil {
		return nil // never started
	}
	ref := keeper.ProcessRef{Pid: p.st.VM.Pid, StartTime: p.st.VM.StartTime}
	vm, err := qemu.Attach(ctx, *p.st.VM)
	if err != nil {
		if errdefs.IsNotFound(err) {
			// The VM ended while the daemon was down: its exit (kept by
			// the keeper) ends the pod.
			log.G(ctx).WithField("sandbox", p.sb.ID).Warn("the pod's VM exited while the daemon was down")
			return p.k.env.Monitor.Rewatch(ctx, ref, p.vmExited)
		}
		return fmt.Errorf("attaching to the pod's VM: %w", err)
	}
	p.vm, p.guest = vm, newGuestConn(vm)
	return p.k.env.Monitor.Rewatch(ctx, ref, p.vmExited)
}

func (p *pod) Runtime() task.Runtime {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.rt == nil {
		p.rt = &containers{pod: p}
	}
	return p.rt
}

// Stop ends the VM: the guest is asked to power off, then QEMU to quit,
// then it is killed.
func (p *pod) Stop(ctx context.Context) error {
	p.stopVM(ctx)
	p.detachNetwork(ctx)
	return p.saveState()
}

func (p *pod) stopVM(ctx context.Context) {
	p.mu.Lock()
	vm, g := p.vm, p.guest
	p.stopping = true
	p.mu.Unlock()
	if vm == nil {
		return
	}
	if g != nil {
		sctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		if s, err := g.current(); err == nil && s != nil {
			_, _ = s.agent.Shutdown(sctx, &agentapi.ShutdownRequest{})
		}
		cancel()
		g.close()
	}
	sctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	if err := vm.Stop(sctx); err != nil {
		log.G(ctx).WithError(err).WithField("sandbox", p.sb.ID).Warn("stopping the pod's VM")
	}
	if p.st.VM != nil {
		p.k.env.Monitor.Unwatch(keeper.ProcessRef{Pid: p.st.VM.Pid, StartTime: p.st.VM.StartTime})
	}
	if err := vm.Cleanup(); err != nil {
		log.G(ctx).WithError(err).WithField("sandbox", p.sb.ID).Warn("removing the VM's run directory")
	}
	vm.Close()
	p.mu.Lock()
	p.vm, p.guest = nil, nil
	p.mu.Unlock()
}

func (p *pod) detachNetwork(ctx context.Context) {
	if !p.st.Network {
		return
	}
	if err := network.Detach(ctx, p.sb.NetNSPath, podInterface); err != nil {
		log.G(ctx).WithError(err).WithField("sandbox", p.sb.ID).Warn("detaching the pod's network")
		return
	}
	p.st.Network = false
}

// release undoes Start and Create: nothing of the pod is left running or
// mounted.
func (p *pod) release(ctx context.Context) {
	p.stopVM(ctx)
	if p.st.VM == nil {
		// Never attached (spawn failed): end what the keeper may run.
		p.killUnattached(ctx)
	}
	p.detachNetwork(ctx)
	// Rootfs mounts a crash left in the stage directory (the share has
	// none on the node: they are in the VM's mount namespace).
	if err := mount.UnmountRecursive(filepath.Join(p.sb.Dir, "stage"), unix.MNT_DETACH); err != nil && !errors.Is(err, os.ErrNotExist) {
		log.G(ctx).WithError(err).WithField("sandbox", p.sb.ID).Warn("unmounting the pod's staged rootfs")
	}
	if err := removeCgroup(p.st.Cgroup); err != nil {
		log.G(ctx).WithError(err).WithField("sandbox", p.sb.ID).Warn("removing the pod's cgroup")
	}
	if p.st.RunDir != "" {
		_ = os.RemoveAll(p.st.RunDir)
	}
}

// killUnattached ends a VM spawned but never attached to, by its run
// directory's pid file.
func (p *pod) killUnattached(ctx context.Context) {
	if p.st.RunDir == "" {
		return
	}
	killVMIn(ctx, p.st.RunDir)
}

// Shutdown releases everything the pod holds.
func (p *pod) Shutdown(ctx context.Context) error {
	p.release(ctx)
	return nil
}

// Metrics of the pod: its containers together, as the guest counts them.
func (p *pod) Metrics(ctx context.Context) (*types.Metric, error) {
	p.mu.Lock()
	g := p.guest
	p.mu.Unlock()
	if g == nil {
		return nil, fmt.Errorf("pod %s has no VM running: %w", p.sb.ID, errdefs.ErrFailedPrecondition)
	}
	var m *agentapi.PodStatsResponse
	err := g.call(ctx, true, func(ctx context.Context, s *session) error {
		var err error
		m, err = s.agent.PodStats(ctx, &emptypb.Empty{})
		return err
	})
	if err != nil {
		return nil, err
	}
	return &types.Metric{ID: p.sb.ID, Timestamp: timestamppb.Now(), Data: m.GetMetrics()}, nil
}

// Info: the VM, and how it came up.
func (p *pod) Info() map[string]any {
	p.mu.Lock()
	defer p.mu.Unlock()
	info := map[string]any{
		"hypervisor": qemu.Name,
		"accel":      string(p.k.accel),
		"vcpus":      p.st.VCPUs,
		"memoryMiB":  p.st.MemoryMiB,
		"boot":       "cold",
		"cgroup":     p.st.Cgroup,
		"pid":        0,
	}
	if p.st.Template != "" {
		info["boot"], info["template"] = "template", p.st.Template
	}
	if p.st.VM != nil {
		info["vmPid"] = p.st.VM.Pid
	}
	return info
}

// vmPid is the hypervisor's pid: the pid the pod's processes report on the
// node (they have none of their own there).
func (p *pod) vmPid() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.st.VM == nil {
		return 0
	}
	return p.st.VM.Pid
}

// conn returns the connection to the VM's agent.
func (p *pod) conn() (*guestConn, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.guest == nil {
		return nil, fmt.Errorf("pod %s has no VM running: %w", p.sb.ID, errdefs.ErrFailedPrecondition)
	}
	return p.guest, nil
}

// PortForward relays stream and the guest's localhost:port (CRI's
// port-forward: the pod's network namespace on the node is not where the
// pod's localhost is).
func (p *pod) PortForward(ctx context.Context, port int32, stream io.ReadWriteCloser) error {
	defer stream.Close()
	if port <= 0 || port > 65535 {
		return fmt.Errorf("port %d: %w", port, errdefs.ErrInvalidArgument)
	}
	g, err := p.conn()
	if err != nil {
		return err
	}
	s, err := g.session(ctx)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	fs, err := s.agent.PortForward(ctx)
	if err != nil {
		return fmt.Errorf("port-forward to the pod's VM: %w", err)
	}
	if err := fs.Send(&agentapi.PortForwardFrame{Port: uint32(port)}); err != nil {
		return fmt.Errorf("port-forward to the pod's VM: %w", err)
	}
	err = agentapi.Relay(ctx, stream, fs, true)
	_ = fs.CloseSend()
	if err != nil && !errors.Is(err, io.EOF) {
		return fmt.Errorf("port-forward to localhost:%d in the pod's VM: %w", port, err)
	}
	return nil
}

// consoleTail is the end of the VM's console, for errors.
func (p *pod) consoleTail(ctx context.Context) string {
	p.mu.Lock()
	vm := p.vm
	p.mu.Unlock()
	if vm == nil {
		return ""
	}
	return strings.TrimSpace(vm.Console(context.WithoutCancel(ctx), 400))
}
