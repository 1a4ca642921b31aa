package wasm

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"strings"
	"time"

	tasktypes "github.com/containerd/containerd/api/types/task"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/containerd/typeurl/v2"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"

	"github.com/kuasar-io/containerd-kuasar/plugins/internal/cgroupstats"
	"github.com/kuasar-io/containerd-kuasar/plugins/task"
	"github.com/kuasar-io/containerd-kuasar/plugins/wasmhost"
)

// ListenAnnotation on a container lists TCP addresses (host:port,
// comma-separated) the module gets as pre-opened listening sockets in the
// pod's network: fds 4, 5, ... (fd 3 is the pre-opened root directory).
const ListenAnnotation = "wasm.kuasar.io/listen"

// containers runs a pod's containers in the Wasm host.
type containers struct {
	pod *pod
	k   *kind
}

var _ task.Runtime = (*containers)(nil)

// hostID names a container in the host: unique on the node.
func hostID(c *task.Container) string { return c.Namespace + "/" + c.ID }

func ref(p *task.Process) wasmhost.Ref {
	return wasmhost.Ref{ID: hostID(p.Container), ExecID: p.ExecID}
}

func stdio(io task.IO) wasmhost.Stdio {
	return wasmhost.Stdio{Stdin: io.Stdin, Stdout: io.Stdout, Stderr: io.Stderr, Terminal: io.Terminal}
}

// Create instantiates the container's module in the host, ready to start.
func (r *containers) Create(ctx context.Context, c *task.Container) error {
	spec := c.Spec
	if spec == nil || spec.Process == nil || len(spec.Process.Args) == 0 {
		return fmt.Errorf("container %s has no command: %w", c.ID, errdefs.ErrInvalidArgument)
	}
	module, err := r.k.moduleFromImage(ctx, c.Namespace, spec.Annotations[imageNameAnnotation], spec.Process.Args[0])
	if err != nil {
		return err
	}
	req := &wasmhost.CreateRequest{
		ID:        hostID(c),
		Pod:       r.pod.key(),
		RootfsDir: filepath.Join(c.Bundle, "rootfs"),
		Module:    module,
		Process: wasmhost.Process{
			Args:         spec.Process.Args,
			Env:          spec.Process.Env,
			Cwd:          spec.Process.Cwd,
			User:         user(spec.Process.User),
			Capabilities: capabilities(spec.Process.Capabilities),
			Stdio:        stdio(c.Init.IO),
		},
		PodMemoryBytes: podMemoryLimit(r.pod.sb),
	}
	for _, m := range c.Rootfs {
		req.Rootfs = append(req.Rootfs, wasmhost.Mount{Type: m.Type, Source: m.Source, Options: m.Options})
	}
	if spec.Root != nil {
		req.Readonly = spec.Root.Readonly
	}
	for _, m := range spec.Mounts {
		req.Mounts = append(req.Mounts, wasmhost.Mount{Type: m.Type, Source: m.Source, Destination: m.Destination, Options: m.Options})
	}
	if !r.pod.sb.HostNetwork() {
		req.NetNS = r.pod.sb.NetNSPath
	}
	if spec.Linux != nil {
		req.Cgroup = cgroupstats.SpecPath(spec.Linux.CgroupsPath)
		req.Limits = limits(spec.Linux.Resources)
	}
	if l := spec.Annotations[ListenAnnotation]; l != "" {
		for _, a := range strings.Split(l, ",") {
			req.Listen = append(req.Listen, strings.TrimSpace(a))
		}
	}
	begin := time.Now()
	st, err := r.k.host.Create(ctx, req)
	if err != nil {
		if ctx.Err() != nil {
			// The host may still finish what we gave up on.
			go r.abandon(wasmhost.Ref{ID: req.ID})
		}
		return fmt.Errorf("%s: %w", ID, err)
	}
	log.G(ctx).WithField("container", c.ID).WithField("took", time.Since(begin)).Debug("wasm host create")
	c.Init.SetPid(st.Pid)
	r.pod.track(req.ID, true)
	go r.wait(c.Init)
	return nil
}

// user is the OCI process user as the host takes it; root needs nothing.
func user(u specs.User) *wasmhost.User {
	if u.UID == 0 && u.GID == 0 && len(u.AdditionalGids) == 0 {
		return nil
	}
	return &wasmhost.User{UID: u.UID, GID: u.GID, AdditionalGids: u.AdditionalGids}
}

// abandon removes from the host a process whose creation the daemon gave up
// waiting for, once the host has finished creating it.
func (r *containers) abandon(ref wasmhost.Ref) {
	ctx := context.Background()
	for deadline := time.Now().Add(abandonTimeout); time.Now().Before(deadline); time.Sleep(time.Second) {
		_ = r.k.host.Kill(ctx, ref, int(unix.SIGKILL), true)
		_, err := r.k.host.Delete(ctx, ref)
		switch {
		case err == nil:
			log.G(ctx).WithField("container", ref.ID).WithField("exec", ref.ExecID).Info("removed a wasm process whose creation was abandoned")
			return
		case errors.Is(err, wasmhost.ErrHostGone):
			return
		}
		// Not found yet (still being created), or still ending: again.
	}
}

// abandonTimeout bounds how long an abandoned creation is waited for.
const abandonTimeout = time.Minute

// capabilities are the OCI process's, as the host takes them.
func capabilities(c *specs.LinuxCapabilities) *wasmhost.Capabilities {
	if c == nil {
		return nil
	}
	return &wasmhost.Capabilities{Bounding: c.Bounding, Effective: c.Effective, Permitted: c.Permitted, Inheritable: c.Inheritable}
}

// limits maps OCI resources to the host's limits.
func limits(res *specs.LinuxResources) wasmhost.Limits {
	var l wasmhost.Limits
	if res == nil {
		return l
	}
	if m := res.Memory; m != nil && m.Limit != nil && *m.Limit > 0 {
		l.MemoryBytes = *m.Limit
	}
	if cpu := res.CPU; cpu != nil {
		if cpu.Quota != nil {
			l.CPUQuota = *cpu.Quota
		}
		if cpu.Period != nil {
			l.CPUPeriod = *cpu.Period
		}
		if cpu.Shares != nil {
			l.CPUShares = *cpu.Shares
		}
	}
	return l
}

// wait reports p's exit, however long it runs: across a restart of the
// daemon (by Recover) and through reconnections to the host. If the host
// itself is gone, so is the process: it is reported lost.
func (r *containers) wait(p *task.Process) {
	ctx := context.Background()
	ref := ref(p)
	for {
		e, err := r.k.host.Wait(ctx, ref)
		if err == nil {
			r.exited(p, e)
			return
		}
		if !errors.Is(err, wasmhost.ErrHostGone) && !errdefs.IsNotFound(err) {
			log.G(ctx).WithError(err).WithField("container", p.Container.ID).Warn("waiting for a wasm process; retrying")
			time.Sleep(time.Second)
			continue
		}
		// Is the process still there, with a host that came back? Asking
		// does not start a host.
		st, serr := r.k.host.State(ctx, ref)
		switch {
		case serr == nil && st.Status == wasmhost.Stopped && st.Exit != nil:
			r.exited(p, *st.Exit)
			return
		case serr == nil:
			continue
		case errors.Is(serr, wasmhost.ErrHostGone) || errdefs.IsNotFound(serr):
			log.G(ctx).WithField("container", p.Container.ID).WithField("exec", p.ExecID).
				Warn("the wasm host that ran this process is gone; reporting it lost")
			p.Exited(255, time.Now())
			return
		default:
			time.Sleep(time.Second)
		}
	}
}

func (r *containers) exited(p *task.Process, e wasmhost.Exit) {
	if e.OOM {
		p.Container.OOM()
	}
	if e.Reason != "" {
		log.L.WithField("container", p.Container.ID).WithField("exec", p.ExecID).WithField("status", e.Status).
			Info("wasm process ended: " + e.Reason)
	}
	p.Exited(e.Status, e.At)
}

// Start runs the module's _start.
func (r *containers) Start(ctx context.Context, p *task.Process) error {
	begin := time.Now()
	_, err := r.k.host.Start(ctx, ref(p))
	log.G(ctx).WithField("container", p.Container.ID).WithField("took", time.Since(begin)).Debug("wasm host start")
	return err
}

// Exec runs another instance of a module of the container (its own, or a
// .wasm file of its rootfs named by the exec's command) in the container's
// file system and network, with the exec's arguments, environment and IO.
func (r *containers) Exec(ctx context.Context, p *task.Process) error {
	if p.Spec == nil || len(p.Spec.Args) == 0 {
		return fmt.Errorf("exec has no command: %w", errdefs.ErrInvalidArgument)
	}
	st, err := r.k.host.Exec(ctx, &wasmhost.ExecRequest{
		ID:     hostID(p.Container),
		ExecID: p.ExecID,
		Process: wasmhost.Process{
			Args:         p.Spec.Args,
			Env:          p.Spec.Env,
			Cwd:          p.Spec.Cwd,
			User:         user(p.Spec.User),
			Capabilities: capabilities(p.Spec.Capabilities),
			Stdio:        stdio(p.IO),
		},
	})
	if err != nil {
		if ctx.Err() != nil {
			go r.abandon(ref(p))
		}
		if errdefs.IsNotFound(err) {
			return fmt.Errorf("%s runs WebAssembly modules only, and exec needs one: %w", ID, err)
		}
		return fmt.Errorf("%s: %w", ID, err)
	}
	p.SetPid(st.Pid)
	go r.wait(p)
	return nil
}

// Kill signals a process. A module cannot handle signals: any that would
// end a process without handlers ends it at once.
func (r *containers) Kill(ctx context.Context, p *task.Process, sig unix.Signal, all bool) error {
	return r.k.host.Kill(ctx, ref(p), int(sig), all)
}

// Delete releases what the host holds of the process.
func (r *containers) Delete(ctx context.Context, p *task.Process) error {
	_, err := r.k.host.Delete(ctx, ref(p))
	if err != nil && !errdefs.IsNotFound(err) && !errors.Is(err, wasmhost.ErrHostGone) {
		return err
	}
	if p.ExecID == "" {
		r.pod.track(hostID(p.Container), false)
	}
	return nil
}

// Pids lists the threads the container's processes run on.
func (r *containers) Pids(_ context.Context, c *task.Container) ([]*tasktypes.ProcessInfo, error) {
	var out []*tasktypes.ProcessInfo
	for _, p := range append([]*task.Process{c.Init}, c.Execs()...) {
		if pid := p.Pid(); pid != 0 && p.Status() != tasktypes.Status_STOPPED {
			out = append(out, &tasktypes.ProcessInfo{Pid: uint32(pid)})
		}
	}
	return out, nil
}

// ResizePty has nothing to resize: a module's terminal is plain streams.
func (r *containers) ResizePty(context.Context, *task.Process, uint32, uint32) error { return nil }

// CloseIO closes the process's stdin.
func (r *containers) CloseIO(ctx context.Context, p *task.Process) error {
	return r.k.host.CloseStdin(ctx, ref(p))
}

// Update changes the container's memory and CPU limits.
func (r *containers) Update(ctx context.Context, c *task.Container, res *specs.LinuxResources, _ map[string]string) error {
	if res == nil {
		return nil
	}
	return r.k.host.Update(ctx, hostID(c), limits(res))
}

// Stats reports the container's linear memory and CPU time.
func (r *containers) Stats(ctx context.Context, c *task.Container) (typeurl.Any, error) {
	s, err := r.k.host.Stats(ctx, hostID(c))
	if err != nil {
		return nil, err
	}
	return metrics(s)
}

func (r *containers) Pause(context.Context, *task.Container) error {
	return fmt.Errorf("pausing a container is not supported by %s: %w", ID, errdefs.ErrNotImplemented)
}

func (r *containers) Resume(context.Context, *task.Container) error {
	return fmt.Errorf("resuming a container is not supported by %s: %w", ID, errdefs.ErrNotImplemented)
}

// Recover re-attaches to a container after a daemon restart. The host kept
// running it; an exit that happened meanwhile is kept there until Delete.
func (r *containers) Recover(ctx context.Context, c *task.Container) error {
	p := c.Init
	r.pod.track(hostID(c), true)
	if p.Status() == tasktypes.Status_STOPPED {
		return nil
	}
	st, err := r.k.host.State(ctx, ref(p))
	if err != nil {
		return fmt.Errorf("%w: %w", task.ErrNotRecoverable, err)
	}
	if st.Status == wasmhost.Stopped && st.Exit != nil {
		r.exited(p, *st.Exit)
		return nil
	}
	p.SetPid(st.Pid)
	go r.wait(p)
	return nil
}
