package wasm

import (
	"context"
	"encoding/json"
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
	"github.com/kuasar-io/containerd-kuasar/plugins/wasmhost/api"
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

// ctrState is what a container records of itself, for a restarted daemon
// and for a host that is gone: which host process runs it, and the cgroups
// that host made for it.
type ctrState struct {
	Boot       string   `json:"boot,omitempty"`
	CgroupDirs []string `json:"cgroupDirs,omitempty"`
}

// stateOf returns c's recorded state, kept decoded on its init process
// (by Create and Recover).
func stateOf(c *task.Container) *ctrState {
	if st, ok := c.Init.Private.(*ctrState); ok {
		return st
	}
	return decodeState(c)
}

func decodeState(c *task.Container) *ctrState {
	st := &ctrState{}
	if len(c.State) > 0 {
		_ = json.Unmarshal(c.State, st) // a record of before: any host
	}
	return st
}

// hostID names a container in the host: unique on the node.
func hostID(c *task.Container) string { return c.Namespace + "/" + c.ID }

// ref names p in the host process that runs it.
func ref(p *task.Process) *api.ProcessRef {
	return &api.ProcessRef{Id: hostID(p.Container), ExecId: p.ExecID, Boot: stateOf(p.Container).Boot}
}

func stdio(io task.IO) *api.Stdio {
	return &api.Stdio{Stdin: io.Stdin, Stdout: io.Stdout, Stderr: io.Stderr, Terminal: io.Terminal}
}

// Create instantiates the container's module in the host, ready to start.
func (r *containers) Create(ctx context.Context, c *task.Container) error {
	spec := c.Spec
	if spec == nil || spec.Process == nil || len(spec.Process.Args) == 0 {
		return fmt.Errorf("container %s has no command: %w", c.ID, errdefs.ErrInvalidArgument)
	}
	module, err := r.k.moduleFromImage(ctx, c)
	if err != nil {
		return err
	}
	req := &api.CreateRequest{
		Id:        hostID(c),
		Pod:       r.pod.key(),
		RootfsDir: filepath.Join(c.Bundle, "rootfs"),
		Module:    module,
		Process: &api.Process{
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
		req.Rootfs = append(req.Rootfs, &api.Mount{Type: m.Type, Source: m.Source, Options: m.Options})
	}
	if spec.Root != nil {
		req.Readonly = spec.Root.Readonly
	}
	for _, m := range spec.Mounts {
		req.Mounts = append(req.Mounts, &api.Mount{Type: m.Type, Source: m.Source, Destination: m.Destination, Options: m.Options})
	}
	if !r.pod.sb.HostNetwork() {
		req.Netns = r.pod.sb.NetNSPath
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
			// The host undoes a create whose deadline passed; one that
			// finished just as the daemon gave up is removed here.
			go r.abandon(&api.ProcessRef{Id: req.Id, Boot: r.k.host.Boot()})
		}
		return fmt.Errorf("%s: %w", ID, err)
	}
	log.G(ctx).WithField("container", c.ID).WithField("took", time.Since(begin)).Debug("wasm host create")
	state := &ctrState{Boot: st.GetBoot(), CgroupDirs: st.GetCgroupDirs()}
	if c.State, err = json.Marshal(state); err != nil {
		return err
	}
	c.Init.Private = state
	c.Init.SetPid(int(st.GetPid()))
	r.pod.track(req.Id, state.Boot)
	go r.wait(c.Init)
	return nil
}

// user is the OCI process user as the host takes it; root needs nothing.
func user(u specs.User) *api.User {
	if u.UID == 0 && u.GID == 0 && len(u.AdditionalGids) == 0 {
		return nil
	}
	return &api.User{Uid: u.UID, Gid: u.GID, AdditionalGids: u.AdditionalGids}
}

// abandon removes from the host a process whose creation the daemon gave
// up waiting for, in case the host finished creating it meanwhile.
func (r *containers) abandon(ref *api.ProcessRef) {
	ctx, cancel := context.WithTimeout(context.Background(), abandonTimeout)
	defer cancel()
	_ = r.k.host.Kill(ctx, ref, int(unix.SIGKILL), true)
	if _, err := r.k.host.Delete(ctx, ref); err == nil {
		log.G(ctx).WithField("container", ref.GetId()).WithField("exec", ref.GetExecId()).Info("removed a wasm process whose creation was abandoned")
	}
}

// abandonTimeout bounds the removal of an abandoned creation.
const abandonTimeout = 10 * time.Second

// capabilities are the OCI process's, as the host takes them.
func capabilities(c *specs.LinuxCapabilities) *api.Capabilities {
	if c == nil {
		return nil
	}
	return &api.Capabilities{Bounding: c.Bounding, Effective: c.Effective, Permitted: c.Permitted, Inheritable: c.Inheritable}
}

// limits maps OCI resources to the host's limits.
func limits(res *specs.LinuxResources) *api.Limits {
	l := &api.Limits{}
	if res == nil {
		return l
	}
	if m := res.Memory; m != nil && m.Limit != nil && *m.Limit > 0 {
		l.MemoryBytes = *m.Limit
	}
	if cpu := res.CPU; cpu != nil {
		if cpu.Quota != nil {
			l.CpuQuota = *cpu.Quota
		}
		if cpu.Period != nil {
			l.CpuPeriod = *cpu.Period
		}
		if cpu.Shares != nil {
			l.CpuShares = *cpu.Shares
		}
	}
	return l
}

// wait reports p's exit, however long it runs: across a restart of the
// daemon (by Recover) and through reconnections to the host. When the
// host that ran it is gone, so is the process: the broken connection ends
// the wait at once, and the process is reported exited (255), as a process
// whose parent was killed would be by the kubelet's other runtimes.
func (r *containers) wait(p *task.Process) {
	ctx := context.Background()
	ref := ref(p)
	for delay := time.Duration(0); ; {
		e, err := r.k.host.Wait(ctx, ref)
		switch {
		case err == nil:
			r.exited(p, e)
			return
		case errors.Is(err, wasmhost.ErrHostGone) || errdefs.IsNotFound(err):
			r.lost(ctx, p)
			return
		}
		delay = min(max(2*delay, 50*time.Millisecond), time.Second)
		log.G(ctx).WithError(err).WithField("container", p.Container.ID).WithField("exec", p.ExecID).Warn("waiting for a wasm process; retrying")
		time.Sleep(delay)
	}
}

// lost reports a process whose host is gone.
func (r *containers) lost(ctx context.Context, p *task.Process) {
	if p.Status() == tasktypes.Status_STOPPED {
		return
	}
	log.G(ctx).WithField("container", p.Container.ID).WithField("exec", p.ExecID).
		Warn("the wasm host that ran this process is gone; reporting it exited (255)")
	p.Exited(255, time.Now())
}

func (r *containers) exited(p *task.Process, e *api.Exit) {
	if e.GetOom() {
		p.Container.OOM()
	}
	if e.GetReason() != "" {
		log.L.WithField("container", p.Container.ID).WithField("exec", p.ExecID).WithField("status", e.GetStatus()).
			Info("wasm process ended: " + e.GetReason())
	}
	at := time.Now()
	if e.GetExitedAt() != nil {
		at = e.GetExitedAt().AsTime()
	}
	p.Exited(int(e.GetStatus()), at)
}

// Start runs the module's _start.
func (r *containers) Start(ctx context.Context, p *task.Process) error {
	begin := time.Now()
	_, err := r.k.host.Start(ctx, ref(p))
	log.G(ctx).WithField("container", p.Container.ID).WithField("took", time.Since(begin)).Debug("wasm host start")
	if errors.Is(err, wasmhost.ErrHostGone) {
		return fmt.Errorf("%s: %w", ID, err)
	}
	return err
}

// Exec runs another instance of a module of the container (its own, or a
// .wasm file of its rootfs named by the exec's command) in the container's
// file system and network, with the exec's arguments, environment and IO.
func (r *containers) Exec(ctx context.Context, p *task.Process) error {
	if p.Spec == nil || len(p.Spec.Args) == 0 {
		return fmt.Errorf("exec has no command: %w", errdefs.ErrInvalidArgument)
	}
	st, err := r.k.host.Exec(ctx, &api.ExecRequest{
		Id:     hostID(p.Container),
		ExecId: p.ExecID,
		Boot:   stateOf(p.Container).Boot,
		Process: &api.Process{
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
	p.SetPid(int(st.GetPid()))
	go r.wait(p)
	return nil
}

// Kill signals a process. A module cannot handle signals: any that would
// end a process without handlers ends it at once. The processes of a host
// that is gone have nothing left to signal: they are reported exited.
func (r *containers) Kill(ctx context.Context, p *task.Process, sig unix.Signal, all bool) error {
	err := r.k.host.Kill(ctx, ref(p), int(sig), all)
	if !errors.Is(err, wasmhost.ErrHostGone) {
		return err
	}
	r.lost(ctx, p)
	if all && p.ExecID == "" {
		for _, e := range p.Container.Execs() {
			r.lost(ctx, e)
		}
	}
	return nil
}

// Delete releases what the host holds of the process. When that host is
// gone, what is left of it is the container's cgroups: they are removed
// here.
func (r *containers) Delete(ctx context.Context, p *task.Process) error {
	_, err := r.k.host.Delete(ctx, ref(p))
	switch {
	case err == nil, errdefs.IsNotFound(err):
	case errors.Is(err, wasmhost.ErrHostGone):
		if p.ExecID == "" {
			if err := wasmhost.RemoveCgroups(stateOf(p.Container).CgroupDirs); err != nil {
				log.G(ctx).WithError(err).WithField("container", p.Container.ID).Warn("removing the cgroups of a container of a wasm host that is gone")
			}
		}
	default:
		return err
	}
	if p.ExecID == "" {
		r.pod.untrack(hostID(p.Container))
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

// CloseIO closes the process's stdin (nothing to close once its host is
// gone).
func (r *containers) CloseIO(ctx context.Context, p *task.Process) error {
	if err := r.k.host.CloseStdin(ctx, ref(p)); !errors.Is(err, wasmhost.ErrHostGone) {
		return err
	}
	return nil
}

// Update changes the container's memory and CPU limits.
func (r *containers) Update(ctx context.Context, c *task.Container, res *specs.LinuxResources, _ map[string]string) error {
	if res == nil {
		return nil
	}
	return r.k.host.Update(ctx, ref(c.Init), limits(res))
}

// Stats reports the container's linear memory and CPU time.
func (r *containers) Stats(ctx context.Context, c *task.Container) (typeurl.Any, error) {
	s, err := r.k.host.Stats(ctx, ref(c.Init))
	if errors.Is(err, wasmhost.ErrHostGone) {
		return nil, fmt.Errorf("container %s ended with its wasm host: %w", c.ID, errdefs.ErrNotFound)
	}
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
// A container of a host that is gone since is reported exited (255).
func (r *containers) Recover(ctx context.Context, c *task.Container) error {
	p := c.Init
	st := decodeState(c)
	p.Private = st
	r.pod.track(hostID(c), st.Boot)
	if p.Status() == tasktypes.Status_STOPPED {
		return nil
	}
	ps, err := r.k.host.State(ctx, ref(p))
	switch {
	case errors.Is(err, wasmhost.ErrHostGone) || errdefs.IsNotFound(err):
		r.lost(ctx, p)
		return nil
	case err != nil:
		return fmt.Errorf("%w: %w", task.ErrNotRecoverable, err)
	}
	if ps.GetStatus() == api.Status_STOPPED && ps.GetExit() != nil {
		r.exited(p, ps.GetExit())
		return nil
	}
	p.SetPid(int(ps.GetPid()))
	go r.wait(p)
	return nil
}
