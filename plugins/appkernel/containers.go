package appkernel

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"time"

	"github.com/containerd/containerd/api/types/runc/options"
	tasktypes "github.com/containerd/containerd/api/types/task"
	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/containerd/typeurl/v2"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"

	"github.com/kuasar-io/containerd-kuasar/plugins/appkernel/sentry"
	"github.com/kuasar-io/containerd-kuasar/plugins/keeper/api"
	"github.com/kuasar-io/containerd-kuasar/plugins/task"
)

// containers runs the containers of one kuasar-gvisor pod as
// subcontainers of its sandbox. runsc creates and starts them (through the
// keeper, so that their gofers are its children); everything else goes
// through the sandbox's control socket: nothing of ours runs per
// container.
type containers struct {
	p *pod

	mu sync.Mutex
	// res are the resources of the pod's containers, by ID, for the
	// sandbox's limits.
	res map[string]*specs.LinuxResources
}

var _ task.Runtime = (*containers)(nil)

func newContainers(p *pod) *containers {
	return &containers{p: p, res: map[string]*specs.LinuxResources{}}
}

// resources lists the resources of the pod's containers.
func (r *containers) resources() []*specs.LinuxResources {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := make([]*specs.LinuxResources, 0, len(r.res))
	for _, v := range r.res {
		out = append(out, v)
	}
	return out
}

func (r *containers) setResources(id string, res *specs.LinuxResources) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if res == nil {
		delete(r.res, id)
		return
	}
	r.res[id] = res
}

// ctrState is what a container records for a restarted daemon.
type ctrState struct {
	// Started is set once runsc started the container.
	Started bool `json:"started,omitempty"`
	// Resources are the container's, as last updated.
	Resources *specs.LinuxResources `json:"resources,omitempty"`
	// OOMKills is the sandbox's OOM kill count when the container started.
	OOMKills uint64 `json:"oomKills,omitempty"`
}

func containerState(c *task.Container) ctrState {
	var st ctrState
	if len(c.State) > 0 {
		_ = json.Unmarshal(c.State, &st)
	}
	return st
}

func setContainerState(c *task.Container, st ctrState) error {
	b, err := json.Marshal(&st)
	if err != nil {
		return err
	}
	c.State = b
	return nil
}

// procData is the in-memory side of one process.
type procData struct {
	mu sync.Mutex
	// stop ends the wait for the process's exit.
	stop context.CancelFunc
	// io is an exec's streams.
	io *execIO
	// pid is an exec's pid in the sandbox.
	pid int32
}

func data(p *task.Process) *procData {
	d, _ := p.Private.(*procData)
	if d == nil {
		d = &procData{}
		p.Private = d
	}
	return d
}

// containerKey prefixes the keys of every stream the keeper holds for a
// container.
func (r *containers) containerKey(c *task.Container) string {
	return podKey(r.p.sb) + c.ID + "/"
}

func (r *containers) initKey(c *task.Container) string { return r.containerKey(c) + "init" }

// consoleSocketArg is the argument the keeper replaces with the path of
// its console socket.
const consoleSocketArg = "@console-socket@"

// Create runs `runsc create` for a subcontainer: the sandbox learns of it
// (and, with a terminal, gets its terminal, whose master the keeper takes
// and copies to CRI's FIFOs). Nothing runs yet.
func (r *containers) Create(ctx context.Context, c *task.Container) (retErr error) {
	if r.p.hasEnded() {
		return fmt.Errorf("the pod's gVisor sandbox has exited: %w", errdefs.ErrFailedPrecondition)
	}
	if err := adaptSpec(r.p.sb, c.Spec); err != nil {
		return err
	}
	if err := c.WriteSpec(); err != nil {
		return err
	}
	rootfs := filepath.Join(c.Bundle, "rootfs")
	if len(c.Rootfs) > 0 {
		if err := os.MkdirAll(rootfs, 0o711); err != nil {
			return err
		}
		if err := c.MountRootfs(rootfs); err != nil {
			return err
		}
		defer func() {
			if retErr != nil {
				if err := mount.UnmountAll(rootfs, 0); err != nil {
					log.G(ctx).WithError(err).Warn("unmounting rootfs after failed create")
				}
			}
		}()
	}
	req := spawnRequest{args: []string{"create", "--bundle", c.Bundle}, dir: c.Bundle}
	if c.Init.IO.Terminal {
		req.args = append(req.args, "--console-socket", consoleSocketArg)
		req.consoleSocket = consoleSocketArg
		req.stdio = &api.Stdio{Terminal: true, Stdin: c.Init.IO.Stdin, Stdout: c.Init.IO.Stdout}
		req.ioKey = r.initKey(c)
		req.pidFile = r.p.sentryFile()
	}
	req.args = append(req.args, c.ID)
	begin := time.Now()
	_, err := r.p.cli.spawn(ctx, r.p.k.env.Monitor, req)
	log.G(ctx).WithField("container", c.ID).WithField("took", time.Since(begin)).WithError(err).Debug("runsc create")
	if err != nil {
		if derr := r.p.delete(context.WithoutCancel(ctx), c.ID); derr != nil {
			log.G(ctx).WithError(derr).Warn("runsc delete after failed create")
		}
		_ = r.releaseIO(ctx, r.containerKey(c), true)
		return err
	}
	c.Init.SetPid(r.p.sentryRef().Pid)
	st := ctrState{Resources: c.Spec.Linux.Resources}
	if err := setContainerState(c, st); err != nil {
		return err
	}
	r.setResources(c.ID, st.Resources)
	r.p.applyLimits(ctx)
	return nil
}

// Start starts the init (runsc start, through the keeper, which holds the
// streams it passes into the sandbox) or an exec (through the control
// socket).
func (r *containers) Start(ctx context.Context, p *task.Process) error {
	if r.p.hasEnded() {
		return fmt.Errorf("the pod's gVisor sandbox has exited: %w", errdefs.ErrFailedPrecondition)
	}
	if p.ExecID != "" {
		return r.startExec(ctx, p)
	}
	c := p.Container
	st := containerState(c)
	st.OOMKills = r.p.oomKills()
	req := spawnRequest{args: []string{"start", c.ID}, dir: c.Bundle}
	if !p.IO.Terminal {
		// runsc passes its own standard streams to the container.
		req.stdio = &api.Stdio{Stdin: p.IO.Stdin, Stdout: p.IO.Stdout, Stderr: p.IO.Stderr}
		req.ioKey = r.initKey(c)
		req.pidFile = r.p.sentryFile()
	}
	begin := time.Now()
	_, err := r.p.cli.spawn(ctx, r.p.k.env.Monitor, req)
	log.G(ctx).WithField("container", c.ID).WithField("took", time.Since(begin)).WithError(err).Debug("runsc start")
	if err != nil {
		return err
	}
	st.Started = true
	if err := setContainerState(c, st); err != nil {
		return err
	}
	r.watchInit(c)
	return nil
}

// watchInit waits, from a goroutine, for the exit of c's init in the
// sandbox. An init that exited while the daemon was down is reported at
// once: the sandbox keeps its status until the container is deleted.
func (r *containers) watchInit(c *task.Container) {
	ctx, cancel := context.WithCancel(context.Background())
	d := data(c.Init)
	d.mu.Lock()
	d.stop = cancel
	d.mu.Unlock()
	go func() {
		defer cancel()
		status := r.waitInit(ctx, c)
		if ctx.Err() != nil {
			return // deleted meanwhile
		}
		if r.oomKilled(c, status) {
			c.OOM()
		}
		c.Init.Exited(status, time.Now())
	}()
}

// waitInit returns the exit status of c's init.
func (r *containers) waitInit(ctx context.Context, c *task.Container) int {
	for backoff := 100 * time.Millisecond; ; backoff = min(2*backoff, 5*time.Second) {
		ws, err := r.p.ctl.Wait(ctx, c.ID)
		switch {
		case err == nil:
			return statusOf(ws)
		case ctx.Err() != nil:
			return 0
		case sentry.Gone(err) || r.p.hasEnded():
			// The sandbox went away, and the container with it.
			r.p.waitEnded(stopTimeout)
			return 128 + int(unix.SIGKILL)
		case errdefs.IsNotFound(err):
			log.G(ctx).WithError(err).WithField("container", c.ID).Warn("the sandbox does not know the container any more")
			return lostStatus
		}
		log.G(ctx).WithError(err).WithField("container", c.ID).Warn("waiting for a container in the sandbox; retrying")
		select {
		case <-ctx.Done():
			return 0
		case <-r.p.ended:
		case <-time.After(backoff):
		}
	}
}

// lostStatus is reported for a container whose exit status is unknown.
const lostStatus = 255

// statusOf is a wait status in containerd's convention.
func statusOf(ws unix.WaitStatus) int {
	switch {
	case ws.Exited():
		return ws.ExitStatus()
	case ws.Signaled():
		return 128 + int(ws.Signal())
	}
	return lostStatus
}

// oomKilled reports whether c's init ended because the sandbox ran out of
// memory: it was killed, and the OOM killer struck the sandbox since the
// container started.
func (r *containers) oomKilled(c *task.Container, status int) bool {
	if status != 128+int(unix.SIGKILL) {
		return false
	}
	return r.p.oomKills() > containerState(c).OOMKills
}

// Exec checks an exec's process spec; it starts at Start.
func (r *containers) Exec(ctx context.Context, p *task.Process) error {
	if len(p.Spec.Args) == 0 {
		return fmt.Errorf("exec %q has no command: %w", p.ExecID, errdefs.ErrInvalidArgument)
	}
	if !containerState(p.Container).Started {
		return fmt.Errorf("container %q has not started: %w", p.Container.ID, errdefs.ErrFailedPrecondition)
	}
	return nil
}

// Kill signals the init, an exec, or every process of the container,
// through the control socket. A container created but not started (or
// whose start failed) has no process: it counts as killed by a
// terminating signal; runsc removes it from the sandbox at Delete.
func (r *containers) Kill(ctx context.Context, p *task.Process, sig unix.Signal, all bool) error {
	c := p.Container
	if p.ExecID == "" && !containerState(c).Started {
		if sig == unix.SIGKILL || sig == unix.SIGTERM {
			p.Exited(128+int(sig), time.Now())
		}
		return nil
	}
	var pid int32
	mode := sentry.ToProcess
	switch {
	case p.ExecID != "":
		d := data(p)
		d.mu.Lock()
		pid = d.pid
		d.mu.Unlock()
		if pid == 0 {
			return fmt.Errorf("exec %q has not started: %w", p.ExecID, errdefs.ErrFailedPrecondition)
		}
	case all:
		mode = sentry.ToAll
	}
	err := r.p.ctl.Signal(ctx, c.ID, pid, sig, mode)
	switch {
	case err == nil:
		return nil
	case sentry.Gone(err) || errdefs.IsNotFound(err):
		return fmt.Errorf("process %q already finished: %w", p.ID(), errdefs.ErrNotFound)
	}
	return err
}

// Delete releases an exec's streams, or the container: runsc's record of
// it (and its gofer, and host cgroup), its rootfs mount, the streams the
// keeper holds.
func (r *containers) Delete(ctx context.Context, p *task.Process) error {
	d := data(p)
	d.mu.Lock()
	stop, eio := d.stop, d.io
	d.mu.Unlock()
	if stop != nil {
		stop()
	}
	if p.ExecID != "" {
		if eio != nil {
			eio.close()
		}
		return nil
	}
	c := p.Container
	if err := r.p.delete(ctx, c.ID); err != nil {
		return err
	}
	if err := r.releaseIO(ctx, r.containerKey(c), true); err != nil {
		return err
	}
	if err := mount.UnmountAll(filepath.Join(c.Bundle, "rootfs"), 0); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("unmounting rootfs: %w", err)
	}
	r.setResources(c.ID, nil)
	if !r.p.hasEnded() {
		r.p.applyLimits(ctx)
	}
	return nil
}

// releaseIO drops streams the keeper holds; a keeper that is gone holds
// nothing.
func (r *containers) releaseIO(ctx context.Context, key string, prefix bool) error {
	if err := r.p.k.env.Monitor.ReleaseIO(ctx, key, prefix); err != nil && !errdefs.IsFailedPrecondition(err) {
		return fmt.Errorf("releasing streams: %w", err)
	}
	return nil
}

// Pids lists the container's processes, as the sandbox's kernel numbers
// them, marking execs.
func (r *containers) Pids(ctx context.Context, c *task.Container) ([]*tasktypes.ProcessInfo, error) {
	ps, err := r.p.ctl.Processes(ctx, c.ID)
	if err != nil {
		return nil, err
	}
	execs := map[int32]string{}
	for _, e := range c.Execs() {
		d := data(e)
		d.mu.Lock()
		if d.pid != 0 {
			execs[d.pid] = e.ExecID
		}
		d.mu.Unlock()
	}
	out := make([]*tasktypes.ProcessInfo, 0, len(ps))
	for _, proc := range ps {
		pi := &tasktypes.ProcessInfo{Pid: uint32(proc.PID)}
		if id, ok := execs[proc.PID]; ok {
			if a, err := typeurl.MarshalAnyToProto(&options.ProcessDetails{ExecID: id}); err == nil {
				pi.Info = a
			}
		}
		out = append(out, pi)
	}
	return out, nil
}

func (r *containers) ResizePty(ctx context.Context, p *task.Process, w, h uint32) error {
	if p.ExecID != "" {
		d := data(p)
		d.mu.Lock()
		eio := d.io
		d.mu.Unlock()
		if eio == nil {
			return fmt.Errorf("exec %q has no terminal: %w", p.ExecID, errdefs.ErrFailedPrecondition)
		}
		return eio.resize(w, h)
	}
	return r.p.k.env.Monitor.ResizePty(ctx, r.initKey(p.Container), w, h)
}

func (r *containers) CloseIO(ctx context.Context, p *task.Process) error {
	if p.ExecID != "" {
		d := data(p)
		d.mu.Lock()
		eio := d.io
		d.mu.Unlock()
		if eio != nil {
			eio.closeStdin()
		}
		return nil
	}
	err := r.p.k.env.Monitor.CloseStdin(ctx, r.initKey(p.Container))
	if errdefs.IsNotFound(err) {
		return nil // no stdin held: nothing to close
	}
	return err
}

// Update changes the container's resources, and so the sandbox's limits.
func (r *containers) Update(ctx context.Context, c *task.Container, res *specs.LinuxResources, _ map[string]string) error {
	if res == nil {
		return nil
	}
	st := containerState(c)
	st.Resources = res
	if err := setContainerState(c, st); err != nil {
		return err
	}
	if err := c.SaveState(); err != nil {
		return err
	}
	r.setResources(c.ID, res)
	r.p.applyLimits(ctx)
	return nil
}

// Stats are what the sandbox's kernel accounts to the container.
func (r *containers) Stats(ctx context.Context, c *task.Container) (typeurl.Any, error) {
	ev, err := r.p.ctl.Event(ctx, c.ID)
	if err != nil {
		return nil, err
	}
	return metricsOf(c.ID, ev, containerState(c).Resources)
}

func (r *containers) Pause(context.Context, *task.Container) error {
	return fmt.Errorf("pausing a container of a gVisor sandbox (gVisor pauses whole sandboxes only): %w", errdefs.ErrNotImplemented)
}

func (r *containers) Resume(context.Context, *task.Container) error {
	return fmt.Errorf("resuming a container of a gVisor sandbox: %w", errdefs.ErrNotImplemented)
}

// Recover re-attaches to a container after a daemon restart: its exit is
// waited for again (the sandbox kept it if it came meanwhile); its streams
// stayed with the keeper and the sandbox.
func (r *containers) Recover(ctx context.Context, c *task.Container) error {
	st := containerState(c)
	r.setResources(c.ID, st.Resources)
	if c.Init.Status() == tasktypes.Status_STOPPED {
		return nil
	}
	if !st.Started {
		// A daemon killed during `runsc start` may have left the container
		// started in the sandbox though it recorded it created. Nobody
		// knows of that process: it is killed, and its exit reported, as
		// CRI expects of a container whose start a restart interrupted.
		state, err := r.p.ctl.State(ctx, c.ID)
		if err != nil || (state != sentry.StateRunning && state != sentry.StateStopped) {
			return nil
		}
		log.G(ctx).WithField("container", c.ID).Warn("a container whose start was interrupted runs in the sandbox; killing it")
		if state == sentry.StateRunning {
			if err := r.p.ctl.Signal(ctx, c.ID, 0, unix.SIGKILL, sentry.ToAll); err != nil && !errdefs.IsNotFound(err) {
				log.G(ctx).WithError(err).WithField("container", c.ID).Warn("killing a container whose start was interrupted")
			}
		}
		st.Started = true
		if err := setContainerState(c, st); err != nil {
			return err
		}
	}
	r.watchInit(c)
	return nil
}
