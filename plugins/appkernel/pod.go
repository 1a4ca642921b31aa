package appkernel

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
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

	"github.com/kuasar-io/containerd-kuasar/plugins/appkernel/sentry"
	"github.com/kuasar-io/containerd-kuasar/plugins/internal/cgroupstats"
	"github.com/kuasar-io/containerd-kuasar/plugins/internal/fsutil"
	"github.com/kuasar-io/containerd-kuasar/plugins/internal/proc"
	"github.com/kuasar-io/containerd-kuasar/plugins/keeper"
	"github.com/kuasar-io/containerd-kuasar/plugins/sandbox"
	"github.com/kuasar-io/containerd-kuasar/plugins/task"
)

// podState is what a kuasar-gvisor pod records about itself.
type podState struct {
	// Runsc and Flags are the binary and global flags every runsc command
	// of the sandbox uses.
	Runsc string   `json:"runsc"`
	Flags []string `json:"flags"`
	// SentryPid and SentryStart name the sandbox's sentry.
	SentryPid   int    `json:"sentryPid,omitempty"`
	SentryStart uint64 `json:"sentryStart,omitempty"`
	// Cgroup is the host cgroup of the sandbox's processes.
	Cgroup string `json:"cgroup"`
	// Started is set once the root container runs; Ended once the sentry
	// has exited.
	Started bool `json:"started,omitempty"`
	Ended   bool `json:"ended,omitempty"`
}

// pod is one kuasar-gvisor sandbox.
type pod struct {
	k   *kind
	sb  *sandbox.Sandbox
	cli *runscCLI
	ctl *sentry.Client
	rt  *containers

	mu sync.Mutex
	st podState

	// ended is closed once the sentry has exited.
	ended   chan struct{}
	endOnce sync.Once
}

func newPod(k *kind, sb *sandbox.Sandbox, runsc string) *pod {
	p := &pod{
		k:     k,
		sb:    sb,
		cli:   &runscCLI{path: runsc, log: filepath.Join(sb.Dir, "runsc.log")},
		ctl:   sentry.New(sentry.SocketPath(k.root, sb.ID)),
		ended: make(chan struct{}),
	}
	p.rt = newContainers(p)
	return p
}

func (p *pod) bundle() string     { return filepath.Join(p.sb.Dir, "root") }
func (p *pod) sentryFile() string { return filepath.Join(p.bundle(), "sentry.pid") }

func (p *pod) sentryRef() keeper.ProcessRef {
	p.mu.Lock()
	defer p.mu.Unlock()
	return keeper.ProcessRef{Pid: p.st.SentryPid, StartTime: p.st.SentryStart}
}

// create starts the sandbox: `runsc create` of the root container, through
// the keeper, which becomes the parent of the sentry and the root's gofer.
// On error it undoes what it did.
func (p *pod) create(ctx context.Context) (retErr error) {
	sb := p.sb
	if podUsernsRequested(sb) {
		return fmt.Errorf("pod user namespaces are not supported by kuasar-gvisor: %w", errdefs.ErrNotImplemented)
	}
	if !sb.HostNetwork() && sb.NetNSPath == "" {
		return fmt.Errorf("pod has no network namespace from CRI: %w", errdefs.ErrInvalidArgument)
	}
	p.st = podState{
		Runsc:  p.cli.path,
		Flags:  p.k.globalFlags(sb, p.cli.log),
		Cgroup: sandboxCgroup(sb),
	}
	p.cli.flags = p.st.Flags
	defer func() {
		if retErr != nil {
			if err := p.Shutdown(context.WithoutCancel(ctx)); err != nil {
				log.G(ctx).WithError(err).Warn("undoing a kuasar-gvisor pod that failed to create")
			}
		}
	}()
	if err := p.writeRootBundle(); err != nil {
		return fmt.Errorf("writing the root container's bundle: %w", err)
	}
	begin := time.Now()
	sentryRef, err := p.cli.spawn(ctx, p.k.env.Monitor, spawnRequest{
		args:    []string{"create", "--bundle", p.bundle(), "--pid-file", p.sentryFile(), sb.ID},
		pidFile: p.sentryFile(),
		dir:     p.bundle(),
	})
	log.G(ctx).WithField("sandbox", sb.ID).WithField("took", time.Since(begin)).WithError(err).Debug("runsc create (sandbox)")
	if err != nil {
		return fmt.Errorf("creating the gVisor sandbox: %w", err)
	}
	if sentryRef.Pid == 0 {
		return fmt.Errorf("runsc create named no sandbox process")
	}
	p.mu.Lock()
	p.st.SentryPid, p.st.SentryStart = sentryRef.Pid, sentryRef.StartTime
	p.mu.Unlock()
	p.k.env.Monitor.Watch(ctx, sentryRef, p.sentryExited)
	return p.saveState()
}

// writeRootBundle writes the root container's bundle: the idle program as
// its only file, and its spec.
func (p *pod) writeRootBundle() error {
	rootfs := filepath.Join(p.bundle(), "rootfs")
	if err := os.MkdirAll(rootfs, 0o755); err != nil {
		return err
	}
	prog, err := os.ReadFile(p.k.idle)
	if err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(rootfs, strings.TrimPrefix(idlePath, "/")), prog, 0o555); err != nil {
		return err
	}
	hostname, _ := os.ReadFile(p.sb.PodFile("hostname"))
	l := sandboxLimits(p.sb.Config.GetLinux().GetResources(), nil, p.k.cfg.SandboxMemoryOverhead)
	spec := rootSpec(p.sb, hostnameOf(p.sb, hostname), p.st.Cgroup, l.spec())
	b, err := json.Marshal(spec)
	if err != nil {
		return err
	}
	return fsutil.WriteFileAtomic(filepath.Join(p.bundle(), "config.json"), b, 0o600)
}

// sentryExited is called once when the sandbox's sentry ends: every
// container of the pod ended with it.
func (p *pod) sentryExited(e keeper.Exit) {
	p.endOnce.Do(func() { close(p.ended) })
	p.mu.Lock()
	p.st.Ended = true
	p.mu.Unlock()
	if err := p.saveState(); err != nil {
		log.L.WithError(err).WithField("sandbox", p.sb.ID).Warn("saving pod state")
	}
	log.L.WithField("sandbox", p.sb.ID).WithField("status", e.Status).Debug("gVisor sentry exited")
	p.sb.Exited(uint32(e.Status))
}

// waitEnded waits, at most d, for the sentry's exit; it reports whether
// it has exited.
func (p *pod) waitEnded(d time.Duration) bool {
	select {
	case <-p.ended:
		return true
	case <-time.After(d):
		return false
	}
}

func (p *pod) hasEnded() bool {
	select {
	case <-p.ended:
		return true
	default:
		return false
	}
}

func (p *pod) saveState() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	b, err := json.Marshal(&p.st)
	if err != nil {
		return err
	}
	p.sb.State = b
	return nil
}

// recover re-attaches to a sandbox a previous daemon started: the sentry's
// exit is watched again (an exit while the daemon was down is delivered
// now).
func (p *pod) recover(ctx context.Context) error {
	if p.st.Ended || p.st.SentryPid == 0 {
		p.endOnce.Do(func() { close(p.ended) })
		return nil
	}
	return p.k.env.Monitor.Rewatch(ctx, p.sentryRef(), p.sentryExited)
}

// Start starts the root container: the sandbox's network comes up.
func (p *pod) Start(ctx context.Context) error {
	begin := time.Now()
	_, err := p.cli.run(ctx, "start", p.sb.ID)
	log.G(ctx).WithField("sandbox", p.sb.ID).WithField("took", time.Since(begin)).WithError(err).Debug("runsc start (sandbox)")
	if err != nil {
		return fmt.Errorf("starting the gVisor sandbox: %w", err)
	}
	p.mu.Lock()
	p.st.Started = true
	p.mu.Unlock()
	return p.saveState()
}

func (p *pod) Runtime() task.Runtime { return p.rt }

// stopTimeout bounds the wait for the sentry to exit once killed.
const stopTimeout = 10 * time.Second

// Stop ends the sandbox: the sentry, and with it every container and
// gofer.
func (p *pod) Stop(ctx context.Context) error {
	p.killSentry(ctx)
	return p.saveState()
}

// killSentry kills the sentry and waits (bounded) for its exit.
func (p *pod) killSentry(ctx context.Context) {
	ref := p.sentryRef()
	if ref.Pid == 0 || p.hasEnded() {
		return
	}
	if err := proc.Signal(ref.Pid, ref.StartTime, unix.SIGKILL); err != nil && !errors.Is(err, unix.ESRCH) {
		log.G(ctx).WithError(err).WithField("sandbox", p.sb.ID).Warn("killing the gVisor sentry")
	}
	if !p.waitEnded(stopTimeout) {
		log.G(ctx).WithField("sandbox", p.sb.ID).Warn("the gVisor sentry did not exit after SIGKILL")
	}
}

// Shutdown releases everything of the sandbox: what runsc recorded of its
// containers (their host cgroups with it), the sandbox's cgroup, the
// streams the keeper holds for it. It is idempotent.
func (p *pod) Shutdown(ctx context.Context) error {
	p.killSentry(ctx)
	var errs []error
	if states, err := listState(p.k.root); err != nil {
		errs = append(errs, err)
	} else {
		// Subcontainers first: the root's delete is the sandbox's.
		var root bool
		for _, s := range states {
			if s.Sandbox != p.sb.ID {
				continue
			}
			if s.Container == p.sb.ID {
				root = true
				continue
			}
			if err := p.delete(ctx, s.Container); err != nil {
				errs = append(errs, err)
			}
		}
		if root {
			if err := p.delete(ctx, p.sb.ID); err != nil {
				errs = append(errs, err)
			}
		}
	}
	p.k.env.Monitor.Unwatch(p.sentryRef())
	if err := p.k.env.Monitor.ReleaseIO(ctx, podKey(p.sb), true); err != nil && !errdefs.IsFailedPrecondition(err) {
		errs = append(errs, fmt.Errorf("releasing streams: %w", err))
	}
	p.mu.Lock()
	cg := p.st.Cgroup
	p.mu.Unlock()
	if cg != "" {
		removeCgroup(cg)
	}
	return errors.Join(errs...)
}

// delete runs `runsc delete --force` for a container of the sandbox.
func (p *pod) delete(ctx context.Context, id string) error {
	if _, err := p.cli.run(ctx, "delete", "--force", id); err != nil && !errdefs.IsNotFound(err) {
		return err
	}
	return nil
}

// removeCgroup removes an (empty) cgroup from every hierarchy.
func removeCgroup(path string) {
	if cgroupstats.Unified() {
		_ = os.Remove(filepath.Join(cgroupRoot, path))
		return
	}
	entries, _ := os.ReadDir(cgroupRoot)
	for _, e := range entries {
		_ = os.Remove(filepath.Join(cgroupRoot, e.Name(), path))
	}
}

const cgroupRoot = "/sys/fs/cgroup"

// applyLimits sets the sandbox cgroup's limits for the pod's containers
// now.
func (p *pod) applyLimits(ctx context.Context) {
	l := sandboxLimits(p.sb.Config.GetLinux().GetResources(), p.rt.resources(), p.k.cfg.SandboxMemoryOverhead)
	p.mu.Lock()
	cg := p.st.Cgroup
	p.mu.Unlock()
	w := cgroupWriter{root: cgroupRoot, unified: cgroupstats.Unified()}
	if err := w.apply(cg, l); err != nil {
		log.G(ctx).WithError(err).WithField("sandbox", p.sb.ID).Warn("setting the sandbox's limits")
	}
}

// oomKills is how many processes the kernel's OOM killer ended in the
// sandbox's cgroup.
func (p *pod) oomKills() uint64 {
	p.mu.Lock()
	cg := p.st.Cgroup
	p.mu.Unlock()
	n, _ := cgroupstats.OOMKills(cgroupstats.StaticPaths(cg))
	return n
}

// Metrics of the pod: its cgroup, or the sandbox's for a pod without one.
func (p *pod) Metrics(ctx context.Context) (*types.Metric, error) {
	cg := p.sb.Config.GetLinux().GetCgroupParent()
	if cg == "" {
		p.mu.Lock()
		cg = p.st.Cgroup
		p.mu.Unlock()
	}
	data, err := cgroupstats.Metrics(cgroupstats.StaticPaths(cgroupstats.ExpandSlice(cg)))
	if err != nil {
		return nil, err
	}
	return &types.Metric{ID: p.sb.ID, Data: data}, nil
}

func (p *pod) Info() map[string]any {
	p.mu.Lock()
	defer p.mu.Unlock()
	return map[string]any{
		"pid":       0,
		"sentryPid": p.st.SentryPid,
		"platform":  p.k.platform(),
		"runscRoot": p.k.root,
		"cgroup":    p.st.Cgroup,
	}
}

// PodNamespaces: the pod's network namespace, the only one of the node
// the sandbox uses.
func (p *pod) PodNamespaces() []specs.LinuxNamespace {
	if p.sb.HostNetwork() || p.sb.NetNSPath == "" {
		return nil
	}
	return []specs.LinuxNamespace{{Type: specs.NetworkNamespace, Path: p.sb.NetNSPath}}
}

// podKey prefixes the keys of every stream the keeper holds for a pod.
func podKey(sb *sandbox.Sandbox) string {
	return ioKeyPrefix + sb.Namespace + "/" + sb.ID + "/"
}

// ioKeyPrefix starts the key of every stream kuasar-gvisor has the keeper
// hold.
const ioKeyPrefix = "gvisor/"

// PortForward connects stream to port on the pod's localhost: the sandbox
// dials it in its own network stack (where the pod's servers listen; the
// node's side of the pod's network namespace has none of them) and copies
// it over a socket pair whose other end the daemon copies to stream.
func (p *pod) PortForward(ctx context.Context, port int32, stream io.ReadWriteCloser) error {
	defer stream.Close()
	if port <= 0 || port > 65535 {
		return fmt.Errorf("port %d: %w", port, errdefs.ErrInvalidArgument)
	}
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("port-forward socket pair: %w", err)
	}
	ours, theirs := os.NewFile(uintptr(fds[0]), "port-forward"), os.NewFile(uintptr(fds[1]), "port-forward (sandbox)")
	err = p.ctl.PortForward(ctx, p.sb.ID, uint16(port), theirs)
	theirs.Close()
	if err != nil {
		ours.Close()
		return fmt.Errorf("port-forward to port %d of the sandbox: %w", port, err)
	}
	conn, err := net.FileConn(ours)
	ours.Close()
	if err != nil {
		return fmt.Errorf("port-forward socket: %w", err)
	}
	defer conn.Close()
	// The client's end of input half-closes the connection; the server's
	// end of output ends the forward.
	fromClient, toClient := make(chan struct{}), make(chan struct{})
	go func() {
		defer close(fromClient)
		_, _ = io.Copy(conn, stream)
		if cw, ok := conn.(interface{ CloseWrite() error }); ok {
			_ = cw.CloseWrite()
		}
	}()
	go func() {
		defer close(toClient)
		_, _ = io.Copy(stream, conn)
	}()
	select {
	case <-toClient:
	case <-ctx.Done():
	}
	conn.Close()
	stream.Close()
	<-fromClient
	<-toClient
	return nil
}
