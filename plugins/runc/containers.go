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

	"github.com/containerd/containerd/api/types/runc/options"
	tasktypes "github.com/containerd/containerd/api/types/task"
	"github.com/containerd/containerd/v2/core/mount"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/containerd/typeurl/v2"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"

	"github.com/kuasar-io/containerd-kuasar/plugins/internal/cgroupstats"
	"github.com/kuasar-io/containerd-kuasar/plugins/internal/proc"
	"github.com/kuasar-io/containerd-kuasar/plugins/keeper"
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

// procData is the in-memory side of one process.
type procData struct {
	stdio *stdio
	start uint64
}

func data(p *task.Process) *procData {
	d, _ := p.Private.(*procData)
	if d == nil {
		d = &procData{stdio: newStdio(keeperKey(p), p.IO)}
		p.Private = d
	}
	return d
}

// keeperKey prefixes what the keeper holds for a process.
func keeperKey(p *task.Process) string {
	c := p.Container
	if p.ExecID == "" {
		return c.Namespace + "/" + c.ID + "/init/"
	}
	return c.Namespace + "/" + c.ID + "/exec/" + p.ExecID + "/"
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
		var ms []mount.Mount
		for _, m := range c.Rootfs {
			ms = append(ms, mount.Mount{Type: m.Type, Source: m.Source, Target: m.Target, Options: m.Options})
		}
		if err := mount.All(ms, rootfs); err != nil {
			return fmt.Errorf("mounting rootfs: %w", err)
		}
		defer func() {
			if retErr != nil {
				if err := mount.UnmountAll(rootfs, 0); err != nil {
					log.G(ctx).WithError(err).Warn("unmounting rootfs after failed create")
				}
			}
		}()
	}

	d := data(c.Init)
	pidFile := filepath.Join(c.Bundle, "init.pid")
	args := []string{"create", "--bundle", c.Bundle, "--pid-file", pidFile}
	begin := time.Now()
	pid, err := r.spawn(ctx, rc, c, d, args)
	log.G(ctx).WithField("container", c.ID).WithField("took", time.Since(begin)).Debug("runc create")
	if err != nil {
		if _, derr := rc.run(context.WithoutCancel(ctx), nil, "delete", "--force", c.ID); derr != nil && !errdefs.IsNotFound(derr) {
			log.G(ctx).WithError(derr).Warn("runc delete after failed create")
		}
		return err
	}
	c.Init.SetPid(pid)
	st.InitStart = d.start
	if st.Cgroup, err = cgroupstats.PidPaths(pid); err != nil {
		log.G(ctx).WithError(err).Warn("locating container cgroup")
	}
	if c.State, err = json.Marshal(&st); err != nil {
		return err
	}
	return r.k.env.Monitor.Watch(ctx, pid, d.start, func(e keeper.Exit) { r.initExited(c, e) })
}

// spawn runs a runc command that starts a process (create, exec) as a
// child of the keeper, wires its stdio and returns the process's pid.
func (r *containers) spawn(ctx context.Context, rc *runcCLI, c *task.Container, d *procData, args []string) (_ int, retErr error) {
	mon := r.k.env.Monitor
	files, sock, err := d.stdio.open(ctx, mon)
	if err != nil {
		return 0, err
	}
	defer closeFiles(files[:])
	defer func() {
		if retErr != nil {
			d.stdio.close(context.WithoutCancel(ctx), mon)
		}
	}()
	var consoleCh <-chan consoleResult
	if sock != nil {
		defer sock.Close()
		args = append(args, "--console-socket", sock.Path())
		consoleCh = receiveConsole(sock)
	}
	pidFile := args[indexOf(args, "--pid-file")+1]
	args = append(args, c.ID)

	var attached []*os.File
	req := keeper.SpawnRequest{
		Path:  rc.path,
		Args:  rc.argv(filepath.Join(c.Bundle, "log.json"), args...),
		Env:   os.Environ(),
		Dir:   c.Bundle,
		Stdio: [3]int{keeper.NoFD, keeper.NoFD, keeper.NoFD},
		Wait:  true,
	}
	for i, f := range files {
		if f == nil {
			continue
		}
		idx := -1
		for j, a := range attached {
			if a == f {
				idx = j
			}
		}
		if idx < 0 {
			attached = append(attached, f)
			idx = len(attached) - 1
		}
		req.Stdio[i] = idx
	}
	_, exit, err := mon.Spawn(ctx, req, attached...)
	if err != nil {
		return 0, fmt.Errorf("running runc %s: %w", args[0], err)
	}
	if exit.Status != 0 {
		msg := logError(filepath.Join(c.Bundle, "log.json"))
		if msg == "" {
			msg = fmt.Sprintf("runc %s exited with status %d", args[0], exit.Status)
		}
		return 0, fmt.Errorf("runc %s: %s: %w", args[0], msg, errdefs.ErrFailedPrecondition)
	}
	b, err := os.ReadFile(pidFile)
	if err != nil {
		return 0, fmt.Errorf("reading pid file: %w", err)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		return 0, fmt.Errorf("bad pid file %s: %w", pidFile, err)
	}
	d.start = proc.StartTime(pid)
	if consoleCh != nil {
		if err := d.stdio.attachConsole(ctx, mon, consoleCh); err != nil {
			_ = proc.Signal(pid, d.start, unix.SIGKILL)
			return 0, err
		}
	}
	return pid, nil
}

func indexOf(s []string, v string) int {
	for i, x := range s {
		if x == v {
			return i
		}
	}
	return -1
}

// initExited is called once when a container's init process ends.
func (r *containers) initExited(c *task.Container, e keeper.Exit) {
	st := containerState(c)
	if n, err := cgroupstats.OOMKills(st.Cgroup); err == nil && n > 0 {
		c.OOM()
	}
	data(c.Init).stdio.waitOutput()
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
	d := data(p)
	pid, err := r.spawn(ctx, rc, c, d, []string{"exec", "--detach", "--pid-file", pidFile, "--process", specFile})
	if err != nil {
		return err
	}
	p.SetPid(pid)
	return r.k.env.Monitor.Watch(ctx, pid, d.start, func(e keeper.Exit) {
		d.stdio.waitOutput()
		p.Exited(e.Status, e.At)
	})
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
// its cgroup, the rootfs mount and the held descriptors.
func (r *containers) Delete(ctx context.Context, p *task.Process) error {
	mon := r.k.env.Monitor
	if pid := p.Pid(); pid != 0 {
		mon.Unwatch(pid)
	}
	d := data(p)
	if p.ExecID != "" {
		d.stdio.close(ctx, mon)
		return nil
	}
	c := p.Container
	// runc's own state lives under the daemon's state dir; it may be gone
	// already (the container never got created, or a reboot).
	if rc, err := r.runcFor(c); err == nil {
		if _, err := rc.run(ctx, nil, "delete", "--force", c.ID); err != nil && !errdefs.IsNotFound(err) {
			return err
		}
	}
	for _, e := range c.Execs() {
		data(e).stdio.close(ctx, mon)
	}
	d.stdio.close(ctx, mon)
	if err := mount.UnmountAll(filepath.Join(c.Bundle, "rootfs"), 0); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("unmounting rootfs: %w", err)
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
	execs := map[int]string{}
	for _, e := range c.Execs() {
		execs[e.Pid()] = e.ExecID
	}
	out := make([]*tasktypes.ProcessInfo, 0, len(pids))
	for _, pid := range pids {
		pi := &tasktypes.ProcessInfo{Pid: uint32(pid)}
		if id, ok := execs[pid]; ok {
			if a, err := typeurl.MarshalAnyToProto(&options.ProcessDetails{ExecID: id}); err == nil {
				pi.Info = a
			}
		}
		out = append(out, pi)
	}
	return out, nil
}

func (r *containers) ResizePty(ctx context.Context, p *task.Process, w, h uint32) error {
	return data(p).stdio.resize(w, h)
}

func (r *containers) CloseIO(ctx context.Context, p *task.Process) error {
	return data(p).stdio.closeStdin(ctx, r.k.env.Monitor)
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

// Recover re-attaches to a container after a daemon restart.
func (r *containers) Recover(ctx context.Context, c *task.Container) error {
	st := containerState(c)
	d := data(c.Init)
	d.start = st.InitStart
	if c.Init.Status() == tasktypes.Status_STOPPED {
		return nil
	}
	pid := c.Init.Pid()
	if pid == 0 {
		return task.ErrNotRecoverable
	}
	if err := d.stdio.reattach(ctx, r.k.env.Monitor); err != nil {
		log.G(ctx).WithError(err).WithField("container", c.ID).Warn("terminal not recovered")
	}
	return r.k.env.Monitor.Rewatch(ctx, pid, st.InitStart, func(e keeper.Exit) { r.initExited(c, e) })
}
