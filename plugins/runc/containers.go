package runc

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	tasktypes "github.com/containerd/containerd/api/types/task"
	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/containerd/typeurl/v2"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"

	"github.com/kuasar-io/containerd-kuasar/plugins/internal/cgroupstats"
	"github.com/kuasar-io/containerd-kuasar/plugins/internal/proc"
	"github.com/kuasar-io/containerd-kuasar/plugins/internal/runcutil"
	"github.com/kuasar-io/containerd-kuasar/plugins/keeper"
	"github.com/kuasar-io/containerd-kuasar/plugins/keeper/api"
	"github.com/kuasar-io/containerd-kuasar/plugins/task"
)

// containers runs the containers of one kuasar-runc pod with runc. The
// processes are children of the node's keeper, not of a shim.
type containers struct {
	pod *pod
	k   *kind
}

var _ task.Runtime = (*containers)(nil)

// ctrState is what a container records for a restarted daemon.
type ctrState struct {
	InitStart uint64            `json:"initStart"`
	Cgroup    cgroupstats.Paths `json:"cgroup"`
	// Systemd is set when the container's cgroups are managed by systemd.
	Systemd bool `json:"systemd,omitempty"`
}

// procData is the in-memory side of one process: its start time, which
// with its pid names it.
type procData struct {
	start uint64
}

func data(p *task.Process) *procData {
	d, _ := p.Private.(*procData)
	if d == nil {
		d = &procData{}
		p.Private = d
	}
	return d
}

// ref names a started process for the keeper.
func ref(p *task.Process) keeper.ProcessRef {
	return keeper.ProcessRef{Pid: p.Pid(), StartTime: data(p).start}
}

func containerState(c *task.Container) ctrState {
	var st ctrState
	if len(c.State) > 0 {
		_ = json.Unmarshal(c.State, &st)
	}
	return st
}

// Create runs `runc create` for the container, through the keeper.
func (r *containers) Create(ctx context.Context, c *task.Container) (retErr error) {
	rc, err := r.k.runc()
	if err != nil {
		return err
	}
	if err := r.adaptSpec(c.Spec); err != nil {
		return err
	}
	st := ctrState{Systemd: isSystemdCgroupsPath(c.Spec.Linux.CgroupsPath)}
	rc = rc.forContainer(st)
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

	pidFile := filepath.Join(c.Bundle, "init.pid")
	begin := time.Now()
	init, err := r.spawn(ctx, rc, c.Bundle, c.ID, ioKey(c.Init), c.Init.IO,
		[]string{"create", "--bundle", c.Bundle, "--pid-file", pidFile}, pidFile)
	log.G(ctx).WithField("container", c.ID).WithField("took", time.Since(begin)).Debug("runc create")
	if err != nil {
		if _, derr := rc.run(context.WithoutCancel(ctx), nil, "delete", "--force", c.ID); derr != nil && !errdefs.IsNotFound(derr) {
			log.G(ctx).WithError(derr).Warn("runc delete after failed create")
		}
		return err
	}
	c.Init.SetPid(init.Pid)
	data(c.Init).start = init.StartTime
	st.InitStart = init.StartTime
	if st.Cgroup, err = cgroupstats.PidPaths(init.Pid); err != nil {
		log.G(ctx).WithError(err).Warn("locating container cgroup")
	}
	if c.State, err = json.Marshal(&st); err != nil {
		return err
	}
	r.k.env.Monitor.Watch(ctx, init, func(e keeper.Exit) { r.initExited(c, e) })
	return nil
}

// spawn runs a runc command that leaves a process behind (create, exec)
// as a child of the keeper, which holds the process's streams under key,
// and returns the process the pid file names.
func (r *containers) spawn(ctx context.Context, rc *runcCLI, bundle, id, key string, io task.IO, args []string, pidFile string) (keeper.ProcessRef, error) {
	req := &api.SpawnRequest{
		Env:     os.Environ(),
		Dir:     bundle,
		Stdio:   apiStdio(io),
		IoKey:   key,
		PidFile: pidFile,
		Wait:    true,
	}
	if io.Terminal {
		args = append(args, "--console-socket", consoleSocketArg)
		req.ConsoleSocket = consoleSocketArg
	}
	logPath := filepath.Join(bundle, "log.json")
	req.Args = rc.argv(logPath, append(args, id)...)
	req.Path = rc.path
	res, err := r.k.env.Monitor.Spawn(ctx, req)
	if err != nil {
		return keeper.ProcessRef{}, fmt.Errorf("running runc %s: %w", args[0], err)
	}
	if res.Exit.Status != 0 {
		msg := runcutil.LogError(logPath)
		if msg == "" {
			msg = fmt.Sprintf("runc %s exited with status %d", args[0], res.Exit.Status)
		}
		return keeper.ProcessRef{}, fmt.Errorf("runc %s: %s: %w", args[0], msg, errdefs.ErrFailedPrecondition)
	}
	if res.Child.Pid == 0 {
		return keeper.ProcessRef{}, fmt.Errorf("runc %s named no process in %s", args[0], pidFile)
	}
	return res.Child, nil
}

// initExited is called once when a container's init process ends.
func (r *containers) initExited(c *task.Container, e keeper.Exit) {
	st := containerState(c)
	if n, err := cgroupstats.OOMKills(st.Cgroup); err == nil && n > 0 {
		c.OOM()
	}
	c.Init.Exited(e.Status, e.At)
}

// adaptSpec points the namespaces CRI asked of the sandbox process (pid 0:
// there is none) at the pod's pinned namespace files. Where the pod uses
// the node's namespace it drops the entry instead: the container then
// stays in the node's namespace, as it would by joining a pause container
// that runs there.
func (r *containers) adaptSpec(spec *specs.Spec) error {
	if spec.Linux == nil {
		return fmt.Errorf("OCI spec has no linux section: %w", errdefs.ErrInvalidArgument)
	}
	out := spec.Linux.Namespaces[:0]
	for _, ns := range spec.Linux.Namespaces {
		if strings.HasPrefix(ns.Path, "/proc/0/") {
			path, host, err := r.pod.joinNamespace(ns.Type)
			if err != nil {
				return err
			}
			if host {
				continue
			}
			ns.Path = path
		}
		out = append(out, ns)
	}
	spec.Linux.Namespaces = out
	return nil
}

// Start starts the init process (runc start) or an exec (runc exec).
func (r *containers) Start(ctx context.Context, p *task.Process) error {
	c := p.Container
	rc, err := r.runcFor(c)
	if err != nil {
		return err
	}
	if p.ExecID == "" {
		if canStartInProcess(c.Spec) {
			begin := time.Now()
			err := startInProcess(rc.execFifo(c.ID), p.Pid(), data(p).start)
			log.G(ctx).WithField("container", c.ID).WithField("took", time.Since(begin)).WithError(err).Debug("started in-process")
			if !errors.Is(err, errNoExecFifo) {
				return err
			}
		}
		_, err := rc.run(ctx, nil, "start", c.ID)
		return err
	}
	spec, err := json.Marshal(p.Spec)
	if err != nil {
		return err
	}
	specFile := filepath.Join(c.Bundle, "exec-"+p.ExecID+".json")
	pidFile := filepath.Join(c.Bundle, "exec-"+p.ExecID+".pid")
	if err := os.WriteFile(specFile, spec, 0o600); err != nil {
		return err
	}
	defer os.Remove(specFile)
	defer os.Remove(pidFile)
	exec, err := r.spawn(ctx, rc, c.Bundle, c.ID, ioKey(p), p.IO,
		[]string{"exec", "--detach", "--pid-file", pidFile, "--process", specFile}, pidFile)
	if err != nil {
		return err
	}
	p.SetPid(exec.Pid)
	data(p).start = exec.StartTime
	r.k.env.Monitor.Watch(ctx, exec, func(e keeper.Exit) { p.Exited(e.Status, e.At) })
	return nil
}

// Exec checks an exec's process spec; runc runs it at Start.
func (r *containers) Exec(ctx context.Context, p *task.Process) error {
	if len(p.Spec.Args) == 0 {
		return fmt.Errorf("exec %q has no command: %w", p.ExecID, errdefs.ErrInvalidArgument)
	}
	return nil
}

// Kill signals a process through a pidfd, or every process of the
// container through runc.
func (r *containers) Kill(ctx context.Context, p *task.Process, sig unix.Signal, all bool) error {
	if all && p.ExecID == "" {
		rc, err := r.runcFor(p.Container)
		if err != nil {
			return err
		}
		_, err = rc.run(ctx, nil, "kill", "--all", p.Container.ID, strconv.Itoa(int(sig)))
		return err
	}
	pid := p.Pid()
	if pid == 0 {
		return fmt.Errorf("process %q has not started: %w", p.ID(), errdefs.ErrFailedPrecondition)
	}
	if err := proc.Signal(pid, data(p).start, sig); err != nil {
		if errors.Is(err, unix.ESRCH) {
			return fmt.Errorf("process %q already finished: %w", p.ID(), errdefs.ErrNotFound)
		}
		return err
	}
	return nil
}

// Delete releases an exec's streams, or the whole container: runc's state,
// its cgroup, the rootfs mount and the held streams.
func (r *containers) Delete(ctx context.Context, p *task.Process) error {
	mon := r.k.env.Monitor
	mon.Unwatch(ref(p))
	if p.ExecID != "" {
		return r.releaseIO(ctx, ioKey(p), false)
	}
	c := p.Container
	// runc's own state lives under the daemon's state dir; it may be gone
	// already (the container never got created, or a reboot).
	if rc, err := r.runcFor(c); err == nil {
		if _, err := rc.run(ctx, nil, "delete", "--force", c.ID); err != nil && !errdefs.IsNotFound(err) {
			return err
		}
	}
	if err := r.releaseIO(ctx, containerKey(c), true); err != nil {
		return err
	}
	if err := mount.UnmountAll(filepath.Join(c.Bundle, "rootfs"), 0); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("unmounting rootfs: %w", err)
	}
	return nil
}

// releaseIO drops streams the keeper holds; a keeper that is gone holds
// nothing.
func (r *containers) releaseIO(ctx context.Context, key string, prefix bool) error {
	if err := r.k.env.Monitor.ReleaseIO(ctx, key, prefix); err != nil && !errdefs.IsFailedPrecondition(err) {
		return fmt.Errorf("releasing streams: %w", err)
	}
	return nil
}

// Pids lists the container's processes, marking execs.
func (r *containers) Pids(ctx context.Context, c *task.Container) ([]*tasktypes.ProcessInfo, error) {
	rc, err := r.runcFor(c)
	if err != nil {
		return nil, err
	}
	pids, err := rc.ps(ctx, c.ID)
	if err != nil {
		return nil, err
	}
	return task.ProcessInfos(c, pids), nil
}

func (r *containers) ResizePty(ctx context.Context, p *task.Process, w, h uint32) error {
	return r.k.env.Monitor.ResizePty(ctx, ioKey(p), w, h)
}

func (r *containers) CloseIO(ctx context.Context, p *task.Process) error {
	err := r.k.env.Monitor.CloseStdin(ctx, ioKey(p))
	if errdefs.IsNotFound(err) {
		return nil // no stdin held: nothing to close
	}
	return err
}

// Update changes the container's cgroup limits (runc update).
func (r *containers) Update(ctx context.Context, c *task.Container, res *specs.LinuxResources, _ map[string]string) error {
	if res == nil {
		return nil
	}
	rc, err := r.runcFor(c)
	if err != nil {
		return err
	}
	b, err := json.Marshal(res)
	if err != nil {
		return err
	}
	_, err = rc.run(ctx, bytes.NewReader(b), "update", "--resources", "-", c.ID)
	return err
}

// Stats reads the container's cgroup.
func (r *containers) Stats(ctx context.Context, c *task.Container) (typeurl.Any, error) {
	st := containerState(c)
	if st.Cgroup.Unified == "" && len(st.Cgroup.Controllers) == 0 {
		return nil, fmt.Errorf("container %q has no known cgroup: %w", c.ID, errdefs.ErrNotFound)
	}
	return cgroupstats.Metrics(st.Cgroup)
}

func (r *containers) Pause(ctx context.Context, c *task.Container) error {
	return r.simple(ctx, "pause", c)
}

func (r *containers) Resume(ctx context.Context, c *task.Container) error {
	return r.simple(ctx, "resume", c)
}

func (r *containers) simple(ctx context.Context, cmd string, c *task.Container) error {
	rc, err := r.runcFor(c)
	if err != nil {
		return err
	}
	_, err = rc.run(ctx, nil, cmd, c.ID)
	return err
}

// runcFor returns the runc CLI for an existing container.
func (r *containers) runcFor(c *task.Container) (*runcCLI, error) {
	rc, err := r.k.runc()
	if err != nil {
		return nil, err
	}
	return rc.forContainer(containerState(c)), nil
}

// Recover re-attaches to a container after a daemon restart. Its streams
// stayed with the keeper.
func (r *containers) Recover(ctx context.Context, c *task.Container) error {
	st := containerState(c)
	data(c.Init).start = st.InitStart
	if c.Init.Status() == tasktypes.Status_STOPPED {
		return nil
	}
	if c.Init.Pid() == 0 {
		return task.ErrNotRecoverable
	}
	return r.k.env.Monitor.Rewatch(ctx, ref(c.Init), func(e keeper.Exit) { r.initExited(c, e) })
}
