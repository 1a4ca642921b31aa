package agent

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	tasktypes "github.com/containerd/containerd/api/types/task"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/containerd/typeurl/v2"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"

	"github.com/kuasar-io/containerd-kuasar/plugins/internal/fsutil"
	"github.com/kuasar-io/containerd-kuasar/plugins/task"
	"github.com/kuasar-io/containerd-kuasar/plugins/vmm/agent/reaper"
	"github.com/kuasar-io/containerd-kuasar/plugins/vmm/agentapi"
	"github.com/kuasar-io/containerd-kuasar/plugins/vmm/guest"
)

// consoleTimeout bounds the wait for the terminal runc sent before it
// exited.
const consoleTimeout = 10 * time.Second

// containers is the task.Runtime of the guest: the pod's containers, run
// by the image's runc (guest.RuncPath) from the bundles the host shares.
// Each process's streams are the agent's (procIO); exits come from the
// reaper, the agent being every container process's reaper once runc has
// exited.
type containers struct {
	runc   *runcCLI
	reaper *reaper.Reaper
	pod    *pod
	// dir holds the guest's own bundle of each container (the spec runc
	// runs, pid files, runc's log): <dir>/<id>.
	dir string
	// consoles holds the console sockets of runc calls in progress.
	consoles string
	// limit bounds the unacknowledged output of a stream.
	limit int
	env   specEnv

	mu    sync.Mutex
	procs map[procKey]*procData
	ctrs  map[string]*ctrData
}

var _ task.Runtime = (*containers)(nil)

type procKey struct{ container, exec string }

func keyOf(p *task.Process) procKey { return procKey{p.Container.ID, p.ExecID} }

// procData is the agent's side of one process.
type procData struct {
	io *procIO

	fdMu  sync.Mutex
	pidfd int // -1 until started, and once deleted

	// mu orders an exit against Delete: an exit seen after Delete is not
	// reported (the records are gone).
	mu      sync.Mutex
	deleted bool
}

// ctrData is the agent's side of one container.
type ctrData struct {
	bundle string // the guest's own bundle
	// cgroup is the container's cgroup v2 path (below /sys/fs/cgroup).
	cgroup string
}

func newContainers(r *reaper.Reaper, p *pod, bin *runcBinary, stateDir string) *containers {
	apparmor, selinux := securityModules()
	return &containers{
		runc:     &runcCLI{bin: bin, root: filepath.Join(stateDir, "runc"), reaper: r},
		reaper:   r,
		pod:      p,
		dir:      filepath.Join(stateDir, "bundles"),
		consoles: filepath.Join(stateDir, "console"),
		limit:    0, // stream.DefaultLimit
		env:      specEnv{cgroupParent: guest.CgroupParent, apparmor: apparmor, selinux: selinux},
		procs:    map[procKey]*procData{},
		ctrs:     map[string]*ctrData{},
	}
}

func (r *containers) data(p *task.Process) (*procData, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	d, ok := r.procs[keyOf(p)]
	if !ok {
		return nil, fmt.Errorf("process %q of %q: %w", p.ExecID, p.Container.ID, errdefs.ErrNotFound)
	}
	return d, nil
}

func (r *containers) ctr(c *task.Container) (*ctrData, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	d, ok := r.ctrs[c.ID]
	if !ok {
		return nil, fmt.Errorf("container %q: %w", c.ID, errdefs.ErrNotFound)
	}
	return d, nil
}

// newProc makes the streams of p and registers it.
func (r *containers) newProc(p *task.Process) (*procData, error) {
	io, err := newProcIO(p.IO, r.limit)
	if err != nil {
		return nil, fmt.Errorf("making the streams of %q: %w", p.ID(), err)
	}
	d := &procData{io: io, pidfd: -1}
	r.mu.Lock()
	r.procs[keyOf(p)] = d
	r.mu.Unlock()
	return d, nil
}

// dropProc releases what a process holds and forgets it.
func (r *containers) dropProc(key procKey, d *procData) {
	d.mu.Lock()
	d.deleted = true
	d.mu.Unlock()
	d.fdMu.Lock()
	if d.pidfd >= 0 {
		unix.Close(d.pidfd)
		d.pidfd = -1
	}
	d.fdMu.Unlock()
	d.io.closeChild()
	d.io.release()
	r.mu.Lock()
	if r.procs[key] == d {
		delete(r.procs, key)
	}
	r.mu.Unlock()
}

// Create runs runc create for the container from a guest bundle of its
// own: the host's spec (config.json in guest.BundleDir) made the guest's.
func (r *containers) Create(ctx context.Context, c *task.Container) (retErr error) {
	if len(c.Rootfs) > 0 {
		return fmt.Errorf("container %q: rootfs mounts are not taken in the guest: the host mounts the root file system under its share (guest.BundleDir/rootfs) and sends none: %w", c.ID, errdefs.ErrInvalidArgument)
	}
	podNS, err := r.pod.specNamespaces()
	if err != nil {
		return err
	}
	env := r.env
	env.podNS = podNS
	spec, err := guestSpec(c.Spec, c.ID, c.Bundle, c.Init.IO.Terminal, env)
	if err != nil {
		return err
	}
	if st, err := os.Stat(spec.Root.Path); err != nil || !st.IsDir() {
		return fmt.Errorf("the root file system of %q is not in the guest at %s (the host mounts it under its share before Create): %v: %w", c.ID, spec.Root.Path, err, errdefs.ErrFailedPrecondition)
	}
	bundle := filepath.Join(r.dir, c.ID)
	if err := os.MkdirAll(bundle, 0o700); err != nil {
		return err
	}
	b, err := json.Marshal(spec)
	if err != nil {
		return err
	}
	if err := fsutil.WriteFileAtomic(filepath.Join(bundle, "config.json"), b, 0o600); err != nil {
		return err
	}
	d, err := r.newProc(c.Init)
	if err != nil {
		os.RemoveAll(bundle)
		return err
	}
	cd := &ctrData{bundle: bundle}
	defer func() {
		if retErr != nil {
			if _, err := r.runc.run(ctx, nil, "delete", "--force", c.ID); err != nil && !errdefs.IsNotFound(err) {
				log.G(ctx).WithError(err).WithField("container", c.ID).Warn("runc delete after a failed create")
			}
			r.dropProc(keyOf(c.Init), d)
			os.RemoveAll(bundle)
		}
	}()

	pidFile := filepath.Join(bundle, "init.pid")
	begin := time.Now()
	if err := r.spawn(ctx, d.io, filepath.Join(bundle, "log.json"),
		"create", "--bundle", bundle, "--pid-file", pidFile, c.ID); err != nil {
		return err
	}
	if err := r.started(c.Init, d, pidFile); err != nil {
		return err
	}
	cd.cgroup = spec.Linux.CgroupsPath
	if cg, err := cgroupOf(c.Init.Pid()); err == nil {
		cd.cgroup = cg
	} else {
		log.G(ctx).WithError(err).WithField("container", c.ID).Warn("reading the container's cgroup; assuming its spec's")
	}
	r.mu.Lock()
	r.ctrs[c.ID] = cd
	r.mu.Unlock()
	log.G(ctx).WithField("container", c.ID).WithField("pid", c.Init.Pid()).WithField("took", time.Since(begin)).Debug("container created")
	return nil
}

// spawn runs runc create or exec (args without the trailing container ID)
// with io's streams, a console socket for a terminal, and takes the
// terminal runc sent.
func (r *containers) spawn(ctx context.Context, io *procIO, logPath string, args ...string) error {
	id := args[len(args)-1]
	args = args[:len(args)-1]
	var cs *consoleSocket
	if io.terminal {
		if err := os.MkdirAll(r.consoles, 0o700); err != nil {
			return err
		}
		var err error
		if cs, err = newConsoleSocket(r.consoles); err != nil {
			return err
		}
		defer cs.Close()
		args = append(args, "--console-socket", cs.path)
	}
	err := r.runc.spawn(ctx, io.child, logPath, append(args, id)...)
	io.closeChild()
	if err != nil {
		return err
	}
	if cs != nil {
		master, err := cs.receive(consoleTimeout)
		if err != nil {
			return err
		}
		io.setConsole(master)
	}
	return nil
}

// started records the pid of a process runc started (from its pid file),
// pins it with a pidfd and reports its exit when the reaper sees it.
func (r *containers) started(p *task.Process, d *procData, pidFile string) error {
	b, err := os.ReadFile(pidFile)
	if err != nil {
		return fmt.Errorf("reading runc's pid file: %w", err)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil || pid <= 0 {
		return fmt.Errorf("runc's pid file holds %q", b)
	}
	// A pidfd names the process for Kill. An exec that ended at once may
	// have been reaped already (its exit waits for Watch, below): then
	// there is nothing to signal.
	fd, err := unix.PidfdOpen(pid, 0)
	switch {
	case err == nil:
		d.fdMu.Lock()
		d.pidfd = fd
		d.fdMu.Unlock()
	case !errors.Is(err, unix.ESRCH):
		return fmt.Errorf("pidfd of %d: %w", pid, err)
	}
	p.SetPid(pid)
	exited := r.reaper.Watch(pid)
	go func() {
		e := <-exited
		d.mu.Lock()
		defer d.mu.Unlock()
		if d.deleted {
			return
		}
		if p.ExecID == "" {
			if cd, err := r.ctr(p.Container); err == nil && cd.cgroup != "" {
				if n, err := oomKills(cd.cgroup); err == nil && n > 0 {
					p.Container.OOM()
				}
			}
		}
		p.Exited(e.Code(), e.At)
	}()
	return nil
}

// cgroupOf reads the cgroup v2 path of pid.
func cgroupOf(pid int) (string, error) {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/cgroup")
	if err != nil {
		return "", err
	}
	for _, l := range strings.Split(string(b), "\n") {
		if p, ok := strings.CutPrefix(l, "0::"); ok && p != "" {
			return p, nil
		}
	}
	return "", fmt.Errorf("no cgroup v2 entry in %q", b)
}

// Start releases a created container's init, or runs an exec.
func (r *containers) Start(ctx context.Context, p *task.Process) error {
	d, err := r.data(p)
	if err != nil {
		return err
	}
	c := p.Container
	if p.ExecID == "" {
		d.fdMu.Lock()
		pidfd := d.pidfd
		d.fdMu.Unlock()
		begin := time.Now()
		err := releaseInit(ctx, filepath.Join(r.runc.root, c.ID, "exec.fifo"), pidfd)
		log.G(ctx).WithField("container", c.ID).WithField("took", time.Since(begin)).WithError(err).Debug("container started")
		if errors.Is(err, errNoExecFifo) {
			_, err = r.runc.run(ctx, nil, "start", c.ID)
		}
		return err
	}
	cd, err := r.ctr(c)
	if err != nil {
		return err
	}
	spec, err := json.Marshal(execSpec(p.Spec, p.IO.Terminal, r.env))
	if err != nil {
		return err
	}
	base := filepath.Join(cd.bundle, "exec-"+p.ExecID)
	specFile, pidFile := base+".json", base+".pid"
	if err := os.WriteFile(specFile, spec, 0o600); err != nil {
		return err
	}
	defer os.Remove(specFile)
	defer os.Remove(pidFile)
	if err := r.spawn(ctx, d.io, base+".log",
		"exec", "--detach", "--pid-file", pidFile, "--process", specFile, c.ID); err != nil {
		return err
	}
	os.Remove(base + ".log")
	return r.started(p, d, pidFile)
}

// errNoExecFifo: the container has no exec fifo (runc start must do).
var errNoExecFifo = errors.New("no exec fifo")

// releaseInit starts a created container the way runc start does, without
// running runc: runc's init waits to write a byte into the container's
// exec fifo; reading it lets init exec the container's process, and
// removing the fifo marks the container running for runc. pidfd (the
// init's) ends the wait if init dies first.
func releaseInit(ctx context.Context, fifo string, pidfd int) error {
	fd, err := unix.Open(fifo, unix.O_RDONLY|unix.O_NONBLOCK|unix.O_CLOEXEC, 0)
	if errors.Is(err, unix.ENOENT) {
		return errNoExecFifo
	}
	if err != nil {
		return fmt.Errorf("opening the exec fifo: %w", err)
	}
	defer unix.Close(fd)
	deadline := time.Now().Add(time.Minute)
	if dl, ok := ctx.Deadline(); ok && dl.Before(deadline) {
		deadline = dl
	}
	got := 0
	buf := make([]byte, 16)
	for {
		n, err := unix.Read(fd, buf)
		switch {
		case n > 0:
			got += n
			continue
		case n == 0 && err == nil && got > 0:
			// init wrote and closed its end (exec'd): started.
			return os.Remove(fifo)
		case err != nil && err != unix.EAGAIN && err != unix.EINTR:
			return fmt.Errorf("reading the exec fifo: %w", err)
		}
		// Nothing yet (no writer, or one that has not written).
		wait := time.Until(deadline)
		if wait <= 0 {
			return fmt.Errorf("the container's init did not take the start signal: %w", context.DeadlineExceeded)
		}
		fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
		if pidfd >= 0 {
			fds = append(fds, unix.PollFd{Fd: int32(pidfd), Events: unix.POLLIN})
		}
		if _, err := unix.Poll(fds, int(min(wait, 100*time.Millisecond)/time.Millisecond)+1); err != nil && err != unix.EINTR {
			return fmt.Errorf("waiting on the exec fifo: %w", err)
		}
		if len(fds) > 1 && fds[1].Revents&unix.POLLIN != 0 && fds[0].Revents == 0 {
			return fmt.Errorf("the container's init exited before it was started: %w", errdefs.ErrFailedPrecondition)
		}
		if err := ctx.Err(); err != nil {
			return err
		}
	}
}

// Exec checks an exec and makes its streams; runc runs it at Start.
func (r *containers) Exec(ctx context.Context, p *task.Process) error {
	if p.Spec == nil || len(p.Spec.Args) == 0 {
		return fmt.Errorf("exec %q has no command: %w", p.ExecID, errdefs.ErrInvalidArgument)
	}
	_, err := r.newProc(p)
	return err
}

// Kill signals one process through its pidfd, or with all every process
// of the container (runc kill --all).
func (r *containers) Kill(ctx context.Context, p *task.Process, sig unix.Signal, all bool) error {
	if all && p.ExecID == "" {
		_, err := r.runc.run(ctx, nil, "kill", "--all", p.Container.ID, strconv.Itoa(int(sig)))
		if errdefs.IsNotFound(err) && p.Status() == tasktypes.Status_STOPPED {
			return nil // nothing left to signal
		}
		return err
	}
	d, err := r.data(p)
	if err != nil {
		return err
	}
	d.fdMu.Lock()
	defer d.fdMu.Unlock()
	if d.pidfd < 0 {
		if p.Pid() > 0 {
			return fmt.Errorf("process %q already finished: %w", p.ID(), errdefs.ErrNotFound)
		}
		return fmt.Errorf("process %q has not started: %w", p.ID(), errdefs.ErrFailedPrecondition)
	}
	if err := unix.PidfdSendSignal(d.pidfd, sig, nil, 0); err != nil {
		if errors.Is(err, unix.ESRCH) {
			return fmt.Errorf("process %q already finished: %w", p.ID(), errdefs.ErrNotFound)
		}
		return fmt.Errorf("signalling %q: %w", p.ID(), err)
	}
	return nil
}

// Delete releases an exec's streams, or everything of a container: its
// processes left (runc delete --force), its cgroup, runc's state, the
// streams of its init and execs, its guest bundle. The host reads each
// stream to its end before (output still buffered is dropped here).
func (r *containers) Delete(ctx context.Context, p *task.Process) error {
	d, err := r.data(p)
	if err != nil {
		return nil // never made, or deleted already
	}
	if p.ExecID != "" {
		r.dropProc(keyOf(p), d)
		return nil
	}
	c := p.Container
	if _, err := r.runc.run(ctx, nil, "delete", "--force", c.ID); err != nil && !errdefs.IsNotFound(err) {
		return err
	}
	r.dropProc(keyOf(p), d)
	r.mu.Lock()
	var execs []procKey
	for k := range r.procs {
		if k.container == c.ID {
			execs = append(execs, k)
		}
	}
	cd := r.ctrs[c.ID]
	delete(r.ctrs, c.ID)
	r.mu.Unlock()
	for _, k := range execs {
		r.mu.Lock()
		ed := r.procs[k]
		r.mu.Unlock()
		if ed != nil {
			r.dropProc(k, ed)
		}
	}
	if cd != nil {
		if err := os.RemoveAll(cd.bundle); err != nil {
			log.G(ctx).WithError(err).WithField("container", c.ID).Warn("removing the guest bundle")
		}
	}
	return nil
}

// Pids lists the container's processes (guest pids), marking execs.
func (r *containers) Pids(ctx context.Context, c *task.Container) ([]*tasktypes.ProcessInfo, error) {
	pids, err := r.runc.ps(ctx, c.ID)
	if err != nil {
		return nil, err
	}
	return task.ProcessInfos(c, pids), nil
}

func (r *containers) ResizePty(ctx context.Context, p *task.Process, width, height uint32) error {
	d, err := r.data(p)
	if err != nil {
		return err
	}
	return d.io.resize(width, height)
}

func (r *containers) CloseIO(ctx context.Context, p *task.Process) error {
	d, err := r.data(p)
	if err != nil {
		return err
	}
	return d.io.closeStdin()
}

// Update changes the container's resources in the guest (runc update).
func (r *containers) Update(ctx context.Context, c *task.Container, res *specs.LinuxResources, _ map[string]string) error {
	if res == nil {
		return nil
	}
	b, err := json.Marshal(res)
	if err != nil {
		return err
	}
	_, err = r.runc.run(ctx, bytes.NewReader(b), "update", "--resources", "-", c.ID)
	return err
}

// Stats are the metrics of the container's cgroup, kept until Delete (so
// an OOM kill shows after the exit, in MemoryEvents.OomKill).
func (r *containers) Stats(ctx context.Context, c *task.Container) (typeurl.Any, error) {
	cd, err := r.ctr(c)
	if err != nil {
		return nil, err
	}
	return cgroupMetrics(cd.cgroup)
}

func (r *containers) Pause(ctx context.Context, c *task.Container) error {
	_, err := r.runc.run(ctx, nil, "pause", c.ID)
	return err
}

func (r *containers) Resume(ctx context.Context, c *task.Container) error {
	_, err := r.runc.run(ctx, nil, "resume", c.ID)
	return err
}

// Recover is never called: the agent lives as long as the guest, and
// keeps its records on the guest's tmpfs.
func (r *containers) Recover(ctx context.Context, c *task.Container) error {
	return task.ErrNotRecoverable
}

// podCgroup is the cgroup holding every container: the parent of their
// cgroups when they share one, else guest.CgroupParent.
func (r *containers) podCgroup() string {
	r.mu.Lock()
	defer r.mu.Unlock()
	parent := ""
	for _, cd := range r.ctrs {
		p := path.Dir(cd.cgroup)
		if parent != "" && p != parent {
			return r.env.cgroupParent
		}
		parent = p
	}
	if parent == "" || parent == "/" {
		return r.env.cgroupParent
	}
	return parent
}

// process returns the streams of a process of the task service.
func (r *containers) process(ps *agentapi.ProcessStdio) (*procIO, error) {
	if ps == nil || ps.ContainerId == "" {
		return nil, fmt.Errorf("no process named: %w", errdefs.ErrInvalidArgument)
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	d, ok := r.procs[procKey{ps.ContainerId, ps.ExecId}]
	if !ok {
		if ps.ExecId != "" {
			return nil, fmt.Errorf("exec %q of container %q: %w", ps.ExecId, ps.ContainerId, errdefs.ErrNotFound)
		}
		return nil, fmt.Errorf("container %q: %w", ps.ContainerId, errdefs.ErrNotFound)
	}
	return d.io, nil
}
