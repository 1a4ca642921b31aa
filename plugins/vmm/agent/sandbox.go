package agent

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"syscall"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"golang.org/x/sys/unix"
	"google.golang.org/protobuf/types/known/emptypb"

	"github.com/kuasar-io/containerd-kuasar/plugins/internal/nsutil"
	"github.com/kuasar-io/containerd-kuasar/plugins/internal/proc"
	"github.com/kuasar-io/containerd-kuasar/plugins/vmm/agent/reaper"
	"github.com/kuasar-io/containerd-kuasar/plugins/vmm/agentapi"
	"github.com/kuasar-io/containerd-kuasar/plugins/vmm/guest"
)

// Options of the share mount. 9p: msize 128 KiB (the virtio transport
// allows up to ~500 KB; larger buffers mean larger contiguous allocations
// in a small guest), cache=mmap: nothing is cached but what an mmap needs,
// so files and mounts the host adds under the share later are seen at
// once, every lookup gets a fresh inode (no stale or colliding inodes from
// the several host file systems under the share), and shared writable
// mmap works.
const (
	share9pOptions       = "trans=virtio,version=9p2000.L,msize=131072,cache=mmap"
	shareVirtiofsOptions = ""
	// defaultShmSize is the pod's /dev/shm when the host gives no size.
	defaultShmSize = 64 << 20
)

// pod is what SetupSandbox made of the guest: the share, the pod's
// namespaces and /dev/shm.
type pod struct {
	reaper *reaper.Reaper
	// self is the agent's binary, started as the pod's PID namespace init.
	self string
	// shareDir, nsDir and shmDir are guest.ShareDir, guest.PodNSDir and
	// guest.PodShmDir (elsewhere in tests).
	shareDir, nsDir, shmDir string

	mu    sync.Mutex
	id    string
	ready bool
	ns    map[nsutil.Kind]string
	pause *exec.Cmd
	// pauseDone is closed when the pause process exited.
	pauseDone chan struct{}
}

func newPod(r *reaper.Reaper) *pod {
	return &pod{
		reaper: r, self: "/proc/self/exe",
		shareDir: guest.ShareDir, nsDir: guest.PodNSDir, shmDir: guest.PodShmDir,
		ns: map[nsutil.Kind]string{},
	}
}

// SetupSandbox makes the guest the pod (see agent.proto).
func (a *agent) SetupSandbox(ctx context.Context, r *agentapi.SetupSandboxRequest) (*agentapi.SetupSandboxResponse, error) {
	if err := a.mods.wait(ctx); err != nil { // 9p and virtio-fs are late modules
		return nil, err
	}
	if err := a.pod.setup(ctx, r); err != nil {
		return nil, err
	}
	return &agentapi.SetupSandboxResponse{}, nil
}

func (p *pod) setup(ctx context.Context, r *agentapi.SetupSandboxRequest) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.ready && r.SandboxId != "" && p.id != "" && r.SandboxId != p.id {
		return fmt.Errorf("the guest is already sandbox %q, not %q: %w", p.id, r.SandboxId, errdefs.ErrAlreadyExists)
	}
	for _, d := range []string{p.shareDir, p.shmDir} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return err
		}
	}
	if err := mountShare(ctx, p.shareDir, r.ShareTag, r.ShareType); err != nil {
		return err
	}
	if err := p.namespaces(ctx, r.Hostname, r.SharePid); err != nil {
		return err
	}
	if err := mountShm(p.shmDir, r.ShmSizeBytes); err != nil {
		return err
	}
	sysctlNS := map[nsutil.Kind]string{nsutil.Net: "/proc/self/ns/net"}
	for _, k := range []nsutil.Kind{nsutil.IPC, nsutil.UTS} {
		sysctlNS[k] = p.ns[k]
	}
	if err := nsutil.ApplySysctls(sysctlNS, r.Sysctls); err != nil {
		return fmt.Errorf("pod sysctls: %w: %w", err, errdefs.ErrInvalidArgument)
	}
	if !p.ready {
		log.G(ctx).WithField("sandbox", r.SandboxId).WithField("hostname", r.Hostname).WithField("sharePid", r.SharePid).Info("sandbox set up")
	}
	p.ready, p.id = true, r.SandboxId
	return nil
}

// mountShare mounts the host's share at dir, unless something is mounted
// there already (a second SetupSandbox).
func mountShare(ctx context.Context, dir, tag, kind string) error {
	if tag == "" {
		tag = guest.ShareTag
	}
	fstype, opts := "9p", share9pOptions
	switch kind {
	case "", "9p":
	case "virtiofs", "virtio-fs":
		fstype, opts = "virtiofs", shareVirtiofsOptions
	default:
		return fmt.Errorf("share type %q: want 9p or virtiofs: %w", kind, errdefs.ErrInvalidArgument)
	}
	if have, ok := mountedType(dir); ok {
		if have != fstype {
			return fmt.Errorf("%s is a %s mount, not %s: %w", dir, have, fstype, errdefs.ErrFailedPrecondition)
		}
		return nil
	}
	if err := unix.Mount(tag, dir, fstype, 0, opts); err != nil {
		return fmt.Errorf("mounting the host's %s share %q at %s (is the VM started with it?): %w", fstype, tag, dir, err)
	}
	log.G(ctx).WithField("tag", tag).WithField("type", fstype).WithField("options", opts).Debug("share mounted")
	return nil
}

// mountShm mounts the pod's /dev/shm, unless it is there.
func mountShm(dir string, size uint64) error {
	if _, ok := mountedType(dir); ok {
		return nil
	}
	if size == 0 {
		size = defaultShmSize
	}
	data := "mode=1777,size=" + strconv.FormatUint(size, 10)
	if err := unix.Mount("shm", dir, "tmpfs", unix.MS_NOSUID|unix.MS_NODEV|unix.MS_NOEXEC, data); err != nil {
		return fmt.Errorf("mounting the pod's /dev/shm: %w", err)
	}
	return nil
}

// namespaces makes the pod's IPC and UTS namespaces and, with sharePid,
// its PID namespace, keeping those that are there.
func (p *pod) namespaces(ctx context.Context, hostname string, sharePid bool) error {
	ipc, uts := p.nsDir+"/"+string(nsutil.IPC), p.nsDir+"/"+string(nsutil.UTS)
	switch {
	case nsutil.IsPinned(ipc) && nsutil.IsPinned(uts):
	default:
		for _, f := range []string{ipc, uts} {
			if err := nsutil.Release(f); err != nil {
				return err
			}
		}
		if _, err := nsutil.Create(p.nsDir, []nsutil.Kind{nsutil.IPC, nsutil.UTS}, hostname); err != nil {
			return fmt.Errorf("making the pod's namespaces: %w", err)
		}
	}
	p.ns[nsutil.IPC], p.ns[nsutil.UTS] = ipc, uts
	if !sharePid {
		return nil
	}
	pidNS := p.nsDir + "/" + string(nsutil.PID)
	if nsutil.IsPinned(pidNS) && p.pauseAlive() {
		p.ns[nsutil.PID] = pidNS
		return nil
	}
	if err := nsutil.Release(pidNS); err != nil {
		return err
	}
	if err := p.startPause(ctx, pidNS); err != nil {
		return err
	}
	p.ns[nsutil.PID] = pidNS
	return nil
}

func (p *pod) pauseAlive() bool {
	if p.pause == nil {
		return false
	}
	select {
	case <-p.pauseDone:
		return false
	default:
		return true
	}
}

// startPause starts the init of the pod's PID namespace (this binary, as
// PauseArg, in a new PID namespace) and pins the namespace at target.
func (p *pod) startPause(ctx context.Context, target string) error {
	cmd := exec.Command(p.self, PauseArg)
	cmd.Args[0] = guest.InitPath                  // as ps shows it: "/init pause"
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr // the console
	cmd.SysProcAttr = &syscall.SysProcAttr{Cloneflags: syscall.CLONE_NEWPID}
	if err := p.reaper.Start(cmd); err != nil {
		return fmt.Errorf("starting the pod's PID namespace init: %w", err)
	}
	done := make(chan struct{})
	pid := cmd.Process.Pid
	go func() {
		err := cmd.Wait()
		p.reaper.Done(pid)
		log.G(ctx).WithError(err).WithField("pid", pid).Error("the init of the pod's PID namespace exited: containers can no longer join it")
		close(done)
	}()
	if err := nsutil.PinOf(pid, proc.StartTime(pid), nsutil.PID, target); err != nil {
		_ = cmd.Process.Kill()
		<-done
		return fmt.Errorf("pinning the pod's PID namespace: %w", err)
	}
	p.pause, p.pauseDone = cmd, done
	log.G(ctx).WithField("pid", pid).Debug("pod PID namespace init started")
	return nil
}

// specNamespaces returns the pod's namespaces for a container's spec, or
// an error if the sandbox is not set up.
func (p *pod) specNamespaces() (map[nsutil.Kind]string, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if !p.ready {
		return nil, fmt.Errorf("the sandbox is not set up in the guest (SetupSandbox first): %w", errdefs.ErrFailedPrecondition)
	}
	out := make(map[nsutil.Kind]string, len(p.ns))
	for k, v := range p.ns {
		out[k] = v
	}
	if _, ok := out[nsutil.PID]; ok && !p.pauseAlive() {
		delete(out, nsutil.PID)
	}
	return out, nil
}

// mountedType returns the file system type mounted at dir, if dir is a
// mount point.
func mountedType(dir string) (string, bool) {
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return "", false
	}
	defer f.Close()
	return findMount(bufio.NewScanner(f), dir)
}

// findMount looks dir up in mountinfo lines; the last mount there wins.
func findMount(sc *bufio.Scanner, dir string) (string, bool) {
	var fstype string
	found := false
	for sc.Scan() {
		// id parent major:minor root mountpoint options [optional...] - fstype source super
		f := strings.Fields(sc.Text())
		if len(f) < 7 || unescapeMountinfo(f[4]) != dir {
			continue
		}
		for i := 6; i < len(f)-1; i++ {
			if f[i] == "-" {
				fstype, found = f[i+1], true
				break
			}
		}
	}
	return fstype, found
}

// unescapeMountinfo undoes mountinfo's octal escapes (\040 for a space).
func unescapeMountinfo(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if v, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(v))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// PodStats are the metrics of the cgroup that holds every container.
func (a *agent) PodStats(ctx context.Context, _ *emptypb.Empty) (*agentapi.PodStatsResponse, error) {
	m, err := cgroupMetrics(a.ctrs.podCgroup())
	if err != nil {
		return nil, err
	}
	return &agentapi.PodStatsResponse{Metrics: m}, nil
}
