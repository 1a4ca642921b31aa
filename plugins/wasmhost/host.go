package wasmhost

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"runtime"
	"sort"
	"sync"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"golang.org/x/sys/unix"
)

// Options of a Host.
type Options struct {
	// CacheDir keeps compiled code across host restarts ("": none).
	CacheDir string
	// KeepModules is how many compiled modules no container uses stay in
	// memory for the next pod of the same image.
	KeepModules int
	// Idle is how long the host runs without containers before it exits
	// (0: never).
	Idle time.Duration
}

// Host runs the Wasm containers of a node.
type Host struct {
	engine *engine
	boot   string
	idle   time.Duration
	ncpu   int

	mu         sync.Mutex
	containers map[string]*container
	pods       map[string]*pod
	running    int
	listening  int  // containers with pre-opened sockets
	closing    bool // exiting for idleness: no more containers
	busyAt     time.Time
}

// container is one Wasm container: its isolation, limits and processes.
type container struct {
	id, pod string
	req     *CreateRequest
	acc     *account
	cg      *cpuCgroup
	iso     *isolation
	module  *compiled // the init's module, shared with execs running it
	init    *process

	mu       sync.Mutex
	execs    map[string]*process
	deleting bool // set once, by the delete that releases the container

	deleteOnce sync.Once
	deleted    chan struct{} // closed once the container is released
}

// execList returns the container's execs.
func (c *container) execList() []*process {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := make([]*process, 0, len(c.execs))
	for _, e := range c.execs {
		out = append(out, e)
	}
	return out
}

// pod groups containers under the pod's memory limit.
type pod struct {
	acc  *account
	refs int
}

// NewHost returns a host with a fresh Wasm engine.
func NewHost(ctx context.Context, o Options) (*Host, error) {
	e, err := newEngine(ctx, o.CacheDir, o.KeepModules)
	if err != nil {
		return nil, err
	}
	_ = lastCap() // while /proc is the host's
	b := make([]byte, 8)
	_, _ = rand.Read(b)
	return &Host{
		engine:     e,
		boot:       hex.EncodeToString(b),
		idle:       o.Idle,
		ncpu:       runtime.NumCPU(),
		containers: map[string]*container{},
		pods:       map[string]*pod{},
		busyAt:     time.Now(),
	}, nil
}

// Close kills every process and releases the engine.
func (h *Host) Close(ctx context.Context) error {
	h.mu.Lock()
	cs := make([]*container, 0, len(h.containers))
	for _, c := range h.containers {
		cs = append(cs, c)
	}
	h.mu.Unlock()
	for _, c := range cs {
		_ = h.deleteContainer(c, true)
	}
	return h.engine.close(ctx)
}

func (h *Host) container(id string) (*container, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	c, ok := h.containers[id]
	if !ok || c.init == nil {
		return nil, fmt.Errorf("wasm container %q: %w", id, errdefs.ErrNotFound)
	}
	return c, nil
}

func (h *Host) process(r Ref) (*container, *process, error) {
	c, err := h.container(r.ID)
	if err != nil {
		return nil, nil, err
	}
	if r.ExecID == "" {
		return c, c.init, nil
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	p, ok := c.execs[r.ExecID]
	if !ok {
		return nil, nil, fmt.Errorf("exec %q in wasm container %q: %w", r.ExecID, r.ID, errdefs.ErrNotFound)
	}
	return c, p, nil
}

// Create prepares a container: its isolation, its module instance and its
// IO. It returns once the module is instantiated and ready to start.
func (h *Host) Create(ctx context.Context, req *CreateRequest) (_ State, retErr error) {
	if req.ID == "" || req.Pod == "" {
		return State{}, fmt.Errorf("a container needs an id and a pod: %w", errdefs.ErrInvalidArgument)
	}
	if len(req.Process.Args) == 0 {
		return State{}, fmt.Errorf("container %s has no command: %w", req.ID, errdefs.ErrInvalidArgument)
	}
	h.mu.Lock()
	if h.closing {
		h.mu.Unlock()
		return State{}, fmt.Errorf("the wasm host is exiting: %w", errdefs.ErrUnavailable)
	}
	if _, ok := h.containers[req.ID]; ok {
		h.mu.Unlock()
		return State{}, fmt.Errorf("wasm container %q: %w", req.ID, errdefs.ErrAlreadyExists)
	}
	pd := h.pods[req.Pod]
	if pd == nil {
		pd = &pod{acc: newAccount(nil, 0)}
		h.pods[req.Pod] = pd
	}
	if req.PodMemoryBytes > 0 {
		pd.acc.setLimit(req.PodMemoryBytes)
	}
	pd.refs++
	c := &container{id: req.ID, pod: req.Pod, req: req, acc: newAccount(pd.acc, req.Limits.MemoryBytes),
		execs: map[string]*process{}, deleted: make(chan struct{})}
	h.containers[req.ID] = c // reserved; init is set once created
	h.busyAt = time.Now()
	h.mu.Unlock()
	defer func() {
		if retErr != nil {
			h.forget(c)
		}
	}()

	begin := time.Now()
	defer func() {
		log.G(ctx).WithField("container", req.ID).WithField("took", time.Since(begin)).WithError(retErr).Debug("create")
	}()
	if req.Cgroup != "" {
		cg, err := newCPUCgroup(req.Cgroup, req.ID)
		switch {
		case err != nil && req.Limits.CPUQuota > 0:
			return State{}, fmt.Errorf("the container's CPU limit cannot be enforced: %w: %w", err, errdefs.ErrFailedPrecondition)
		case err != nil:
			log.G(ctx).WithError(err).WithField("container", req.ID).Warn("no CPU cgroup for the wasm container: its CPU time is accounted, not bounded")
		default:
			if err := cg.set(req.Limits); err != nil {
				_ = cg.remove()
				return State{}, fmt.Errorf("applying CPU limits: %w: %w", err, errdefs.ErrFailedPrecondition)
			}
			c.cg = cg
		}
	}
	st, err := openStdio(req.Process.Stdio)
	if err != nil {
		return State{}, err
	}
	p := newProcess(h, c, "", req.Process)
	p.stdio = st
	defer func() {
		if retErr != nil {
			st.close()
		}
	}()

	module := func() (*compiled, error) { return h.rootfsModule(ctx, req.Process) }
	var pre *compiled // a module acquired here, until the thread takes it
	defer func() {
		if pre != nil {
			h.engine.release(pre)
		}
	}()
	if req.Module.Path != "" {
		if req.Module.Digest == "" {
			return State{}, fmt.Errorf("a module layer needs its digest: %w", errdefs.ErrInvalidArgument)
		}
		// A layer blob on the host: read it (if not compiled already)
		// before the thread leaves the host's mounts.
		m, err := h.engine.acquire(ctx, req.Module.Digest, func() ([]byte, error) {
			b, err := readModule(req.Module.Path)
			if errors.Is(err, errNotModuleFile) {
				return nil, fmt.Errorf("module layer %s is not a readable file: %w", req.Module.Path, errdefs.ErrNotFound)
			}
			return b, err
		})
		if err != nil {
			return State{}, err
		}
		pre = m
		module = func() (*compiled, error) {
			m := pre
			pre = nil
			return m, nil
		}
	}
	isolate := func() error {
		iso, err := isolateInit(req)
		c.iso = iso
		return err
	}
	if err := p.spawn(isolate, func() (*compiled, error) {
		m, err := module()
		if err == nil {
			c.module = m
			h.engine.hold(m) // the container's own reference, for execs
		}
		return m, err
	}); err != nil {
		return State{}, err
	}
	h.mu.Lock()
	c.init = p
	if len(req.Listen) > 0 {
		h.listening++
	}
	h.mu.Unlock()
	return p.state(), nil
}

// rootfsModule compiles (or finds compiled) the module proc's command
// names in the container's root; it runs on a container thread.
func (h *Host) rootfsModule(ctx context.Context, proc Process) (*compiled, error) {
	code, err := loadFromRootfs(proc.Args[0], proc.Env)
	if err != nil {
		return nil, err
	}
	return h.engine.acquire(ctx, Digest(code), func() ([]byte, error) { return code, nil })
}

// containersOf returns the created containers of a pod ("": of all).
func (h *Host) containersOf(podName string) []*container {
	h.mu.Lock()
	defer h.mu.Unlock()
	var cs []*container
	for _, c := range h.containers {
		if c.init != nil && (podName == "" || c.pod == podName) {
			cs = append(cs, c)
		}
	}
	return cs
}

// forget drops a container that failed to be created, or was deleted.
func (h *Host) forget(c *container) {
	c.iso.close()
	if c.module != nil {
		h.engine.release(c.module)
		c.module = nil
	}
	if c.cg != nil {
		if err := c.cg.remove(); err != nil {
			log.L.WithError(err).WithField("container", c.id).Warn("removing wasm container cgroup")
		}
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.containers[c.id] != c {
		return // already forgotten
	}
	if c.init != nil && len(c.req.Listen) > 0 {
		h.listening--
	}
	delete(h.containers, c.id)
	if pd := h.pods[c.pod]; pd != nil {
		pd.refs--
		if pd.refs <= 0 {
			delete(h.pods, c.pod)
		}
	}
	h.busyAt = time.Now()
}

// Exec prepares an additional module instance in a running container.
func (h *Host) Exec(ctx context.Context, req *ExecRequest) (_ State, retErr error) {
	c, err := h.container(req.ID)
	if err != nil {
		return State{}, err
	}
	if req.ExecID == "" || len(req.Process.Args) == 0 {
		return State{}, fmt.Errorf("an exec needs an id and a command: %w", errdefs.ErrInvalidArgument)
	}
	if c.init.state().Status != Running {
		return State{}, fmt.Errorf("wasm container %q is not running: %w", req.ID, errdefs.ErrFailedPrecondition)
	}
	p := newProcess(h, c, req.ExecID, req.Process)
	if p.stdio, err = openStdio(req.Process.Stdio); err != nil {
		return State{}, err
	}
	defer func() {
		if retErr != nil {
			p.stdio.close()
		}
	}()
	c.mu.Lock()
	if c.deleting {
		c.mu.Unlock()
		return State{}, fmt.Errorf("wasm container %q is being deleted: %w", req.ID, errdefs.ErrFailedPrecondition)
	}
	if _, ok := c.execs[req.ExecID]; ok {
		c.mu.Unlock()
		return State{}, fmt.Errorf("exec %q: %w", req.ExecID, errdefs.ErrAlreadyExists)
	}
	c.execs[req.ExecID] = p
	c.mu.Unlock()
	defer func() {
		if retErr != nil {
			c.mu.Lock()
			delete(c.execs, req.ExecID)
			c.mu.Unlock()
		}
	}()
	cwd := req.Process.Cwd
	if cwd == "" {
		cwd = c.req.Process.Cwd
	}
	isolate := func() error { return isolateExec(c.iso, c.req.NetNS, cwd) }
	module := func() (*compiled, error) {
		if c.module != nil && req.Process.Args[0] == c.req.Process.Args[0] {
			h.engine.hold(c.module)
			return c.module, nil
		}
		return h.rootfsModule(ctx, req.Process)
	}
	if err := p.spawn(isolate, module); err != nil {
		return State{}, err
	}
	return p.state(), nil
}

// Start runs a created process.
func (h *Host) Start(r Ref) (State, error) {
	_, p, err := h.process(r)
	if err != nil {
		return State{}, err
	}
	p.mu.Lock()
	switch p.status {
	case Created:
		p.status = Running
	case Running:
		p.mu.Unlock()
		return State{}, fmt.Errorf("process %s is already running: %w", r.ID, errdefs.ErrFailedPrecondition)
	case Stopped:
		p.mu.Unlock()
		return State{}, fmt.Errorf("process %s has exited: %w", r.ID, errdefs.ErrFailedPrecondition)
	}
	p.mu.Unlock()
	p.startOnce.Do(func() { close(p.start) })
	return p.state(), nil
}

// Wait blocks until the process exits, or ctx is done.
func (h *Host) Wait(ctx context.Context, r Ref) (Exit, error) {
	_, p, err := h.process(r)
	if err != nil {
		return Exit{}, err
	}
	select {
	case <-p.done:
	case <-ctx.Done():
		return Exit{}, ctx.Err()
	}
	return *p.state().Exit, nil
}

// State reports a process.
func (h *Host) State(r Ref) (State, error) {
	_, p, err := h.process(r)
	if err != nil {
		return State{}, err
	}
	return p.state(), nil
}

// ignoredSignals do nothing to a module: their default action is to be
// ignored, or they stop and continue a process, which a module instance
// cannot be.
var ignoredSignals = map[unix.Signal]bool{
	unix.SIGCHLD: true, unix.SIGURG: true, unix.SIGWINCH: true, unix.SIGCONT: true,
	unix.SIGSTOP: true, unix.SIGTSTP: true, unix.SIGTTIN: true, unix.SIGTTOU: true,
}

// Kill delivers a signal. A WASI module cannot handle signals, so every
// signal whose default action ends a process ends it at once, with status
// 128+signal, as it would a process without handlers.
func (h *Host) Kill(r KillRequest) error {
	c, p, err := h.process(r.Ref)
	if err != nil {
		return err
	}
	sig := unix.Signal(r.Signal)
	if sig < 0 || sig > 64 {
		return fmt.Errorf("signal %d: %w", r.Signal, errdefs.ErrInvalidArgument)
	}
	targets := []*process{p}
	if r.All && r.ExecID == "" {
		targets = append(targets, c.execList()...)
	}
	if p.state().Status == Stopped && !r.All {
		return fmt.Errorf("process already finished: %w", errdefs.ErrNotFound)
	}
	if sig == 0 || ignoredSignals[sig] {
		return nil
	}
	for _, t := range targets {
		t.kill(128+int(sig), false)
	}
	return nil
}

// Delete releases a stopped process; for an init, the whole container.
func (h *Host) Delete(r Ref) (State, error) {
	c, p, err := h.process(r)
	if err != nil {
		return State{}, err
	}
	st := p.state()
	if st.Status != Stopped {
		if st.Status == Running {
			return State{}, fmt.Errorf("process %s is running: %w", p.c.id, errdefs.ErrFailedPrecondition)
		}
		// Created, never started: end it first.
		p.kill(128+int(unix.SIGKILL), false)
		<-p.done
		st = p.state()
	}
	if r.ExecID != "" {
		c.mu.Lock()
		delete(c.execs, r.ExecID)
		c.mu.Unlock()
		p.stdio.close()
		return st, nil
	}
	return st, h.deleteContainer(c, false)
}

// deleteContainer releases a container; with force it kills what still
// runs in it first. It releases a container once, however many deletes
// race for it; the others wait for that one.
func (h *Host) deleteContainer(c *container, force bool) error {
	if !force && c.init != nil && c.init.state().Status == Running {
		return fmt.Errorf("wasm container %s is running: %w", c.id, errdefs.ErrFailedPrecondition)
	}
	c.deleteOnce.Do(func() {
		c.mu.Lock()
		c.deleting = true // no exec joins from now on
		c.mu.Unlock()
		procs := c.execList()
		if c.init != nil {
			procs = append(procs, c.init)
		}
		for _, p := range procs {
			if p.state().Status != Stopped {
				p.kill(128+int(unix.SIGKILL), false)
			}
		}
		for _, p := range procs {
			select {
			case <-p.done:
			case <-time.After(stuckTimeout):
				// Blocked where no kill reaches (a write to a pipe nobody
				// reads): release the container anyway; the thread cleans
				// up after itself when it returns.
				log.L.WithField("container", c.id).WithField("exec", p.execID).Error("a wasm process did not end after SIGKILL; releasing its container anyway")
			}
			p.stdio.close()
		}
		h.forget(c)
		close(c.deleted)
	})
	<-c.deleted
	return nil
}

// stuckTimeout is how long a delete waits for a killed process.
const stuckTimeout = 10 * time.Second

// CloseStdin closes a process's stdin (once the daemon's writer is gone).
func (h *Host) CloseStdin(r Ref) error {
	_, p, err := h.process(r)
	if err != nil {
		return err
	}
	p.stdio.closeStdin()
	return nil
}

// Update changes a container's limits.
func (h *Host) Update(req UpdateRequest) error {
	c, err := h.container(req.ID)
	if err != nil {
		return err
	}
	c.acc.setLimit(req.Limits.MemoryBytes)
	if c.cg != nil {
		return c.cg.set(req.Limits)
	}
	return nil
}

// Stats reports a container's memory and CPU.
func (h *Host) Stats(r Ref) (Stats, error) {
	c, err := h.container(r.ID)
	if err != nil {
		return Stats{}, err
	}
	var s Stats
	s.MemoryBytes, s.MemoryMax, s.MemoryLimit = c.acc.usage()
	if s.MemoryLimit == 0 {
		_, _, s.MemoryLimit = c.acc.parent.usage()
	}
	if c.init.state().Exit != nil && c.init.state().Exit.OOM {
		s.OOMKills = 1
	}
	// One source for the life of the container, so that its counters only
	// grow: its cgroup when that accounts, else its threads' times.
	if c.cg == nil || !c.cg.cpuStats(&s) {
		for _, p := range append([]*process{c.init}, c.execList()...) {
			t := p.cpuTime()
			s.CPUUserNanos += uint64(t.user)
			s.CPUSystemNanos += uint64(t.system)
		}
	}
	return s, nil
}

// List reports the processes of a pod, or of every pod.
func (h *Host) List(podName string) []State {
	var out []State
	for _, c := range h.containersOf(podName) {
		out = append(out, c.init.state())
		for _, e := range c.execList() {
			out = append(out, e.state())
		}
	}
	sort.Slice(out, func(i, j int) bool {
		if out[i].ID != out[j].ID {
			return out[i].ID < out[j].ID
		}
		return out[i].ExecID < out[j].ExecID
	})
	return out
}

// ReleasePod kills and deletes whatever is left of a pod.
func (h *Host) ReleasePod(podName string) error {
	if podName == "" {
		return nil // no container is of no pod; "" is not "every pod" here
	}
	var errs []error
	for _, c := range h.containersOf(podName) {
		errs = append(errs, h.deleteContainer(c, true))
	}
	return errors.Join(errs...)
}

// HostStats reports node-wide figures.
func (h *Host) HostStats() HostStats {
	h.mu.Lock()
	defer h.mu.Unlock()
	return HostStats{Containers: len(h.containers), Pods: len(h.pods), Modules: h.engine.count()}
}

// runningChanged keeps a processor for every running module: a module's
// thread holds one while it runs, and one throttled by its CPU cgroup holds
// it while it waits, so the rest of the host needs its own.
func (h *Host) runningChanged(delta int) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.running += delta
	procs := h.ncpu + h.running
	if procs > maxProcs(h.ncpu) {
		procs = maxProcs(h.ncpu)
	}
	if runtime.GOMAXPROCS(0) != procs {
		runtime.GOMAXPROCS(procs)
	}
}

func maxProcs(ncpu int) int { return max(64, 2*ncpu) }

func (h *Host) exited(*process) {
	h.mu.Lock()
	h.busyAt = time.Now()
	h.mu.Unlock()
}

// socketGCInterval paces collections while modules have sockets: wazero
// (v1.12) does not close a connection a module closes, it only drops it,
// and the socket is closed when the garbage collector finalizes it. The
// host's heap is small (linear memory is not in it), so collections are
// rare unless asked for.
const socketGCInterval = 2 * time.Second

// collectSockets runs the collector while modules hold sockets, until ctx
// is done.
func (h *Host) collectSockets(ctx context.Context) {
	t := time.NewTicker(socketGCInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		h.mu.Lock()
		n := h.listening
		h.mu.Unlock()
		if n > 0 {
			runtime.GC()
		}
	}
}

// beginIdleExit reports whether the host has had no container for idle,
// and if so stops taking new ones.
func (h *Host) beginIdleExit(idle time.Duration) bool {
	h.mu.Lock()
	defer h.mu.Unlock()
	if len(h.containers) > 0 || time.Since(h.busyAt) < idle {
		return false
	}
	h.closing = true
	return true
}
