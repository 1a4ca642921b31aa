package wasmhost

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"golang.org/x/sys/unix"

	"github.com/kuasar-io/containerd-kuasar/plugins/wasmhost/api"
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
	// MaxCompiles bounds the modules compiled at once (0: one per CPU).
	MaxCompiles int
	// CompileMemory bounds the bytes of module code read or being compiled
	// at once (0: twice MaxModuleSize).
	CompileMemory int64
	// MaxOpenFiles bounds the files all modules hold open together (0:
	// half of the host's RLIMIT_NOFILE).
	MaxOpenFiles int64
}

// Host runs the Wasm containers of a node.
type Host struct {
	engine *engine
	files  *fileBudget
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
	req     *api.CreateRequest
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

// state is the init's state, with what the daemon needs to know of the
// container.
func (c *container) state() *api.ProcessState {
	st := c.init.state()
	if c.cg != nil {
		st.CgroupDirs = append([]string(nil), c.cg.dirs...)
	}
	return st
}

// pod groups containers under the pod's memory limit.
type pod struct {
	acc  *account
	refs int
}

// NewHost returns a host with a fresh Wasm engine.
func NewHost(ctx context.Context, o Options) (*Host, error) {
	e, err := newEngine(ctx, o.CacheDir, o.KeepModules, engineLimits{maxCompiles: o.MaxCompiles, compileMemory: o.CompileMemory})
	if err != nil {
		return nil, err
	}
	_ = lastCap() // while /proc is the host's
	b := make([]byte, 8)
	_, _ = rand.Read(b)
	return &Host{
		engine:     e,
		files:      newFileBudget(o.MaxOpenFiles),
		boot:       hex.EncodeToString(b),
		idle:       o.Idle,
		ncpu:       runtime.NumCPU(),
		containers: map[string]*container{},
		pods:       map[string]*pod{},
		busyAt:     time.Now(),
	}, nil
}

// Boot identifies this host process.
func (h *Host) Boot() string { return h.boot }

// Close kills every process and releases the engine.
func (h *Host) Close(ctx context.Context) error {
	h.mu.Lock()
	cs := make([]*container, 0, len(h.containers))
	for _, c := range h.containers {
		if c.init != nil {
			cs = append(cs, c)
		}
	}
	h.mu.Unlock()
	for _, c := range cs {
		_ = h.deleteContainer(c, true)
	}
	return h.engine.close(ctx)
}

// checkBoot refuses a ref meant for another host process: what it names
// ended with that host.
func (h *Host) checkBoot(boot, id string) error {
	if boot != "" && boot != h.boot {
		return fmt.Errorf("wasm container %q belongs to the wasm host %s, which is gone (this is %s): %w", id, boot, h.boot, errdefs.ErrNotFound)
	}
	return nil
}

func (h *Host) container(id, boot string) (*container, error) {
	if err := h.checkBoot(boot, id); err != nil {
		return nil, err
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	c, ok := h.containers[id]
	if !ok || c.init == nil {
		return nil, fmt.Errorf("wasm container %q: %w", id, errdefs.ErrNotFound)
	}
	return c, nil
}

func (h *Host) process(r *api.ProcessRef) (*container, *process, error) {
	c, err := h.container(r.GetId(), r.GetBoot())
	if err != nil {
		return nil, nil, err
	}
	if r.GetExecId() == "" {
		return c, c.init, nil
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	p, ok := c.execs[r.GetExecId()]
	if !ok {
		return nil, nil, fmt.Errorf("exec %q in wasm container %q: %w", r.GetExecId(), r.GetId(), errdefs.ErrNotFound)
	}
	return c, p, nil
}

// Create prepares a container: its isolation, its module instance and its
// IO. It returns once the module is instantiated and ready to start. When
// ctx is done first, Create returns and the container's thread undoes what
// it made at its next step.
func (h *Host) Create(ctx context.Context, req *api.CreateRequest) (_ *api.ProcessState, retErr error) {
	if req.GetId() == "" || req.GetPod() == "" {
		return nil, fmt.Errorf("a container needs an id and a pod: %w", errdefs.ErrInvalidArgument)
	}
	if len(req.GetProcess().GetArgs()) == 0 {
		return nil, fmt.Errorf("container %s has no command: %w", req.GetId(), errdefs.ErrInvalidArgument)
	}
	h.mu.Lock()
	if h.closing {
		h.mu.Unlock()
		return nil, fmt.Errorf("the wasm host is exiting: %w", errdefs.ErrUnavailable)
	}
	if _, ok := h.containers[req.GetId()]; ok {
		h.mu.Unlock()
		return nil, fmt.Errorf("wasm container %q: %w", req.GetId(), errdefs.ErrAlreadyExists)
	}
	pd := h.pods[req.GetPod()]
	if pd == nil {
		pd = &pod{acc: newAccount(nil, 0)}
		h.pods[req.GetPod()] = pd
	}
	if req.GetPodMemoryBytes() > 0 {
		pd.acc.setLimit(req.GetPodMemoryBytes())
	}
	pd.refs++
	c := &container{id: req.GetId(), pod: req.GetPod(), req: req, acc: newAccount(pd.acc, req.GetLimits().GetMemoryBytes()),
		execs: map[string]*process{}, deleted: make(chan struct{})}
	h.containers[req.GetId()] = c // reserved; init is set once created
	h.busyAt = time.Now()
	h.mu.Unlock()

	// What is made from here on is undone once, by whoever is last to use
	// it: this call, or the container's thread if this call gave up first.
	var st *stdio
	var pre *compiled // a module acquired here, until the thread takes it
	undo := func() {
		st.close()
		if pre != nil {
			h.engine.release(pre)
			pre = nil
		}
		h.forget(c)
	}
	spawned := false
	defer func() {
		if retErr != nil && !spawned {
			undo()
		}
	}()

	begin := time.Now()
	defer func() {
		log.G(ctx).WithField("container", req.GetId()).WithField("took", time.Since(begin)).WithError(retErr).Debug("create")
	}()
	if req.GetCgroup() != "" {
		cg, err := newCPUCgroup(req.GetCgroup(), req.GetId())
		switch {
		case err != nil && req.GetLimits().GetCpuQuota() > 0:
			return nil, fmt.Errorf("the container's CPU limit cannot be enforced: %w: %w", err, errdefs.ErrFailedPrecondition)
		case err != nil:
			log.G(ctx).WithError(err).WithField("container", req.GetId()).Warn("no CPU cgroup for the wasm container: its CPU time is accounted, not bounded")
		default:
			c.cg = cg // removed by forget
			if err := cg.set(req.GetLimits()); err != nil {
				return nil, fmt.Errorf("applying CPU limits: %w: %w", err, errdefs.ErrFailedPrecondition)
			}
		}
	}
	var err error
	if st, err = openStdio(req.GetProcess().GetStdio()); err != nil {
		return nil, err
	}
	p := newProcess(h, c, "", req.GetProcess())
	p.stdio = st

	module := func(ctx context.Context) (*compiled, error) { return h.rootfsModule(ctx, req.GetProcess()) }
	if path := req.GetModule().GetPath(); path != "" {
		digest := req.GetModule().GetDigest()
		if digest == "" {
			return nil, fmt.Errorf("a module layer needs its digest: %w", errdefs.ErrInvalidArgument)
		}
		// A layer blob on the host: read it (if not compiled already)
		// before the thread leaves the host's mounts.
		m, err := h.engine.acquire(ctx, digest, func(ctx context.Context) ([]byte, func(), error) {
			b, release, err := h.engine.readModule(ctx, path)
			if errors.Is(err, errNotModuleFile) {
				return nil, nil, fmt.Errorf("module layer %s is not a readable file: %w", path, errdefs.ErrNotFound)
			}
			return b, release, err
		})
		if err != nil {
			return nil, err
		}
		pre = m
		module = func(context.Context) (*compiled, error) {
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
	spawned = true
	err = p.spawn(ctx, isolate, func(ctx context.Context) (*compiled, error) {
		m, err := module(ctx)
		if err == nil {
			c.module = m
			h.engine.hold(m) // the container's own reference, for execs
		}
		return m, err
	}, undo)
	switch {
	case errors.Is(err, errAbandoned):
		return nil, err // the thread undoes it
	case err != nil:
		undo()
		return nil, err
	}
	h.mu.Lock()
	c.init = p
	if len(req.GetListen()) > 0 {
		h.listening++
	}
	h.mu.Unlock()
	return c.state(), nil
}

// rootfsModule compiles (or finds compiled) the module proc's command
// names in the container's root; it runs on a container thread.
func (h *Host) rootfsModule(ctx context.Context, proc *api.Process) (*compiled, error) {
	code, release, err := h.engine.loadFromRootfs(ctx, proc.GetArgs()[0], proc.GetEnv())
	if err != nil {
		return nil, err
	}
	// The code's reservation goes to the compile if there is one (it ends
	// with it), else ends here.
	var taken atomic.Bool
	m, err := h.engine.acquire(ctx, Digest(code), func(context.Context) ([]byte, func(), error) {
		taken.Store(true)
		return code, release, nil
	})
	if !taken.Load() {
		release()
	}
	return m, err
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
	if c.init != nil && len(c.req.GetListen()) > 0 {
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
func (h *Host) Exec(ctx context.Context, req *api.ExecRequest) (_ *api.ProcessState, retErr error) {
	c, err := h.container(req.GetId(), req.GetBoot())
	if err != nil {
		return nil, err
	}
	execID := req.GetExecId()
	if execID == "" || len(req.GetProcess().GetArgs()) == 0 {
		return nil, fmt.Errorf("an exec needs an id and a command: %w", errdefs.ErrInvalidArgument)
	}
	if c.init.state().GetStatus() != api.Status_RUNNING {
		return nil, fmt.Errorf("wasm container %q is not running: %w", req.GetId(), errdefs.ErrFailedPrecondition)
	}
	p := newProcess(h, c, execID, req.GetProcess())
	if p.stdio, err = openStdio(req.GetProcess().GetStdio()); err != nil {
		return nil, err
	}
	c.mu.Lock()
	if c.deleting {
		c.mu.Unlock()
		p.stdio.close()
		return nil, fmt.Errorf("wasm container %q is being deleted: %w", req.GetId(), errdefs.ErrFailedPrecondition)
	}
	if _, ok := c.execs[execID]; ok {
		c.mu.Unlock()
		p.stdio.close()
		return nil, fmt.Errorf("exec %q: %w", execID, errdefs.ErrAlreadyExists)
	}
	c.execs[execID] = p
	c.mu.Unlock()
	undo := func() {
		c.mu.Lock()
		if c.execs[execID] == p {
			delete(c.execs, execID)
		}
		c.mu.Unlock()
		p.stdio.close()
	}
	cwd := req.GetProcess().GetCwd()
	if cwd == "" {
		cwd = c.req.GetProcess().GetCwd()
	}
	isolate := func() error { return isolateExec(c.iso, c.req.GetNetns(), cwd) }
	module := func(ctx context.Context) (*compiled, error) {
		if c.module != nil && req.GetProcess().GetArgs()[0] == c.req.GetProcess().GetArgs()[0] {
			h.engine.hold(c.module)
			return c.module, nil
		}
		return h.rootfsModule(ctx, req.GetProcess())
	}
	switch err := p.spawn(ctx, isolate, module, undo); {
	case errors.Is(err, errAbandoned):
		return nil, err
	case err != nil:
		undo()
		return nil, err
	}
	return p.state(), nil
}

// Start runs a created process.
func (h *Host) Start(r *api.ProcessRef) (*api.ProcessState, error) {
	_, p, err := h.process(r)
	if err != nil {
		return nil, err
	}
	p.mu.Lock()
	switch p.status {
	case api.Status_CREATED:
		p.status = api.Status_RUNNING
	case api.Status_RUNNING:
		p.mu.Unlock()
		return nil, fmt.Errorf("process %s is already running: %w", r.GetId(), errdefs.ErrFailedPrecondition)
	default:
		p.mu.Unlock()
		return nil, fmt.Errorf("process %s has exited: %w", r.GetId(), errdefs.ErrFailedPrecondition)
	}
	p.mu.Unlock()
	p.startOnce.Do(func() { close(p.start) })
	return p.state(), nil
}

// Wait blocks until the process exits, or ctx is done.
func (h *Host) Wait(ctx context.Context, r *api.ProcessRef) (*api.Exit, error) {
	_, p, err := h.process(r)
	if err != nil {
		return nil, err
	}
	select {
	case <-p.done:
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	return p.state().GetExit(), nil
}

// State reports a process.
func (h *Host) State(r *api.ProcessRef) (*api.ProcessState, error) {
	c, p, err := h.process(r)
	if err != nil {
		return nil, err
	}
	if p == c.init {
		return c.state(), nil
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
func (h *Host) Kill(r *api.KillRequest) error {
	c, p, err := h.process(r.GetRef())
	if err != nil {
		return err
	}
	sig := unix.Signal(r.GetSignal())
	if sig < 0 || sig > 64 {
		return fmt.Errorf("signal %d: %w", r.GetSignal(), errdefs.ErrInvalidArgument)
	}
	targets := []*process{p}
	if r.GetAll() && r.GetRef().GetExecId() == "" {
		targets = append(targets, c.execList()...)
	}
	if p.stopped() && !r.GetAll() {
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
func (h *Host) Delete(r *api.ProcessRef) (*api.ProcessState, error) {
	c, p, err := h.process(r)
	if err != nil {
		return nil, err
	}
	st := p.state()
	if st.GetStatus() != api.Status_STOPPED {
		if st.GetStatus() == api.Status_RUNNING {
			return nil, fmt.Errorf("process %s is running: %w", p.c.id, errdefs.ErrFailedPrecondition)
		}
		// Created, never started: end it first.
		p.kill(128+int(unix.SIGKILL), false)
		<-p.done
		st = p.state()
	}
	if r.GetExecId() != "" {
		c.mu.Lock()
		delete(c.execs, r.GetExecId())
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
	if !force && c.init != nil && c.init.state().GetStatus() == api.Status_RUNNING {
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
			if !p.stopped() {
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
func (h *Host) CloseStdin(r *api.ProcessRef) error {
	_, p, err := h.process(r)
	if err != nil {
		return err
	}
	p.stdio.closeStdin()
	return nil
}

// Update changes a container's limits.
func (h *Host) Update(req *api.UpdateRequest) error {
	c, err := h.container(req.GetRef().GetId(), req.GetRef().GetBoot())
	if err != nil {
		return err
	}
	c.acc.setLimit(req.GetLimits().GetMemoryBytes())
	if c.cg != nil {
		return c.cg.set(req.GetLimits())
	}
	return nil
}

// Stats reports a container's memory and CPU.
func (h *Host) Stats(r *api.ProcessRef) (*api.ContainerStats, error) {
	c, err := h.container(r.GetId(), r.GetBoot())
	if err != nil {
		return nil, err
	}
	s := &api.ContainerStats{}
	s.MemoryBytes, s.MemoryMax, s.MemoryLimit = c.acc.usage()
	if s.MemoryLimit == 0 {
		_, _, s.MemoryLimit = c.acc.parent.usage()
	}
	if c.init.state().GetExit().GetOom() {
		s.OomKills = 1
	}
	// One source for the life of the container, so that its counters only
	// grow: its cgroup when that accounts, else its threads' times.
	if c.cg == nil || !c.cg.cpuStats(s) {
		for _, p := range append([]*process{c.init}, c.execList()...) {
			t := p.cpuTime()
			s.CpuUserNanos += uint64(t.user)
			s.CpuSystemNanos += uint64(t.system)
		}
	}
	return s, nil
}

// List reports the processes of a pod, or of every pod.
func (h *Host) List(podName string) []*api.ProcessState {
	var out []*api.ProcessState
	for _, c := range h.containersOf(podName) {
		out = append(out, c.state())
		for _, e := range c.execList() {
			out = append(out, e.state())
		}
	}
	sort.Slice(out, func(i, j int) bool {
		if out[i].GetId() != out[j].GetId() {
			return out[i].GetId() < out[j].GetId()
		}
		return out[i].GetExecId() < out[j].GetExecId()
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
func (h *Host) HostStats() *api.HostStatsResponse {
	h.mu.Lock()
	defer h.mu.Unlock()
	var linear uint64
	for _, pd := range h.pods {
		used, _, _ := pd.acc.usage()
		linear += used
	}
	return &api.HostStatsResponse{
		Containers:          int32(len(h.containers)),
		Pods:                int32(len(h.pods)),
		Modules:             int32(h.engine.count()),
		Compiling:           h.engine.compiling.Load(),
		OpenFiles:           h.files.open.Load(),
		Instances:           int32(h.running),
		LinearMemoryBytes:   int64(linear),
		ResidentMemoryBytes: residentBytes(),
	}
}

// residentBytes is the host process's resident set (0 if unknown).
func residentBytes() int64 {
	b, err := os.ReadFile("/proc/self/statm")
	if err != nil {
		return 0
	}
	f := strings.Fields(string(b))
	if len(f) < 2 {
		return 0
	}
	pages, err := strconv.ParseInt(f[1], 10, 64)
	if err != nil {
		return 0
	}
	return pages * int64(os.Getpagesize())
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
