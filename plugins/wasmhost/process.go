package wasmhost

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/tetratelabs/wazero"
	wapi "github.com/tetratelabs/wazero/api"
	"github.com/tetratelabs/wazero/experimental"
	"github.com/tetratelabs/wazero/experimental/sock"
	"github.com/tetratelabs/wazero/experimental/sysfs"
	"github.com/tetratelabs/wazero/sys"
	"golang.org/x/sys/unix"
	"google.golang.org/protobuf/types/known/timestamppb"

	"github.com/kuasar-io/containerd-kuasar/plugins/wasmhost/api"
)

// Exit statuses the host reports besides a module's own exit code.
const (
	// statusOOM is what a process killed by the kernel's OOM killer gets.
	statusOOM = 128 + int(unix.SIGKILL)
	// statusTrap is reported for a module that trapped (a crash): the
	// status of a process that aborted.
	statusTrap = 128 + int(unix.SIGABRT)
)

// MaxModuleSize bounds a module (its bytes are read into the host, outside
// every pod's limit, to be compiled).
const MaxModuleSize = 256 << 20

// process is one module instance: a container's init or an exec. It runs
// on an OS thread of its own, isolated as its container is.
type process struct {
	h      *Host
	c      *container
	execID string
	spec   *api.Process
	stdio  *stdio
	env    *environ
	files  *rootFS

	start  chan struct{} // closed by Start
	killed chan struct{} // closed by the first kill
	done   chan struct{} // closed at exit
	cancel context.CancelFunc
	// wake is an eventfd a kill signals, for a module waiting in poll
	// (-1: none).
	wake int

	// Used by poll_oneoff, on the process's thread only.
	pollDelay time.Duration
	lastPoll  time.Time

	mu        sync.Mutex
	tid       int
	status    api.Status
	exit      *api.Exit
	killCode  int
	oom       bool
	cpu       cpuTimes // of the thread, once it has exited
	startOnce sync.Once
	killOnce  sync.Once
}

type cpuTimes struct{ user, system time.Duration }

func newProcess(h *Host, c *container, execID string, spec *api.Process) *process {
	return &process{
		h:      h,
		c:      c,
		execID: execID,
		spec:   spec,
		start:  make(chan struct{}),
		killed: make(chan struct{}),
		done:   make(chan struct{}),
		status: api.Status_CREATED,
		wake:   -1,
	}
}

func (p *process) state() *api.ProcessState {
	p.mu.Lock()
	defer p.mu.Unlock()
	st := &api.ProcessState{Id: p.c.id, ExecId: p.execID, Pod: p.c.pod, Pid: int32(p.tid), Status: p.status, Boot: p.h.boot}
	if p.exit != nil {
		st.Exit = cloneExit(p.exit)
	}
	return st
}

func cloneExit(e *api.Exit) *api.Exit {
	return &api.Exit{Status: e.Status, ExitedAt: e.ExitedAt, Oom: e.Oom, Reason: e.Reason}
}

// stopped reports whether the process has stopped.
func (p *process) stopped() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.status == api.Status_STOPPED
}

func newExit(status int, reason string) *api.Exit {
	return &api.Exit{Status: int32(status), ExitedAt: timestamppb.Now(), Reason: reason}
}

// instance is what a thread prepares before the process starts.
type instance struct {
	mod    wapi.Module
	module *compiled
	alloc  *allocator
}

// handoff passes the outcome of a thread's preparation to the call that
// created the process, or, once that call has given up (its deadline
// passed), tells the thread to undo its work itself.
type handoff struct {
	mu        sync.Mutex
	ready     chan struct{}
	err       error
	delivered bool
	abandoned bool
}

// deliver hands the outcome over; it returns false if the caller has given
// up, in which case the thread must undo what it made.
func (o *handoff) deliver(err error) bool {
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.abandoned {
		return false
	}
	o.err, o.delivered = err, true
	close(o.ready)
	return true
}

// wait returns the outcome, or errAbandoned once ctx is done first: the
// thread then undoes its work when it gets there.
func (o *handoff) wait(ctx context.Context) error {
	select {
	case <-o.ready:
		return o.err
	case <-ctx.Done():
	}
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.delivered {
		return o.err
	}
	o.abandoned = true
	return fmt.Errorf("%w: %w", errAbandoned, ctx.Err())
}

// errAbandoned is a creation given up on before the process was ready.
var errAbandoned = errors.New("given up before the process was ready")

// spawn starts the process's thread: isolate runs first on it, then the
// module is instantiated. It returns once the process is created (or failed
// to be); the thread then waits for Start. When ctx is done first, spawn
// returns an error wrapping errAbandoned and the thread stops at its next
// step, releases what it made and calls undo.
func (p *process) spawn(ctx context.Context, isolate func() error, module func(context.Context) (*compiled, error), undo func()) error {
	if p.stdio.pollable() {
		fd, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
		if err != nil {
			return fmt.Errorf("eventfd: %w", err)
		}
		p.wake = fd
	}
	o := &handoff{ready: make(chan struct{})}
	go p.thread(ctx, isolate, module, o, undo)
	return o.wait(ctx)
}

func (p *process) thread(ctx context.Context, isolate func() error, module func(context.Context) (*compiled, error), o *handoff, undo func()) {
	// The thread is changed for this container; it must never run anything
	// else. Not unlocking makes it end with this goroutine.
	runtime.LockOSThread()
	tid := unix.Gettid()
	if tid == unix.Getpid() {
		// The main thread cannot end with its goroutine, and what it is
		// would be what /proc/self shows: it must stay the host's.
		err := errors.New("wasm host bug: a container thread landed on the main thread; the program must lock its main goroutine to it (runtime.LockOSThread in init)")
		p.finish(nil, newExit(255, err.Error()))
		if !o.deliver(err) {
			go undo()
		}
		return
	}
	p.mu.Lock()
	p.tid = tid
	p.mu.Unlock()

	inst, err := p.prepare(ctx, isolate, module)
	if err != nil {
		p.finish(nil, newExit(255, err.Error()))
		if !o.deliver(err) {
			go undo() // once this thread is gone (it holds the cgroup)
		}
		return
	}
	if !o.deliver(nil) {
		log.G(ctx).WithField("container", p.c.id).WithField("exec", p.execID).Info("wasm process created after its creation was given up; removing it")
		p.finish(inst, newExit(255, "creation given up"))
		go undo()
		return
	}

	select {
	case <-p.start:
	case <-p.killed:
		e, _ := p.killExit()
		p.finish(inst, e)
		return
	}
	p.h.runningChanged(1)
	err = p.run(inst)
	p.h.runningChanged(-1)
	p.finish(inst, p.exitOf(err))
}

// prepare isolates the thread and instantiates the module, without running
// it. It stops between steps once ctx is done.
func (p *process) prepare(ctx context.Context, isolate func() error, module func(context.Context) (*compiled, error)) (inst *instance, retErr error) {
	defer func() {
		if r := recover(); r != nil {
			retErr = fmt.Errorf("preparing the module failed: %v", r)
		}
	}()
	// The cgroup first: isolation leaves the host's file systems behind.
	if cg := p.c.cg; cg != nil {
		if err := cg.attach(unix.Gettid()); err != nil {
			return nil, err
		}
	}
	t0 := time.Now()
	if err := isolate(); err != nil {
		return nil, err
	}
	t1 := time.Now()
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	env, err := newEnviron(ctx, p.spec.GetEnv(), p.spec.GetCwd())
	if err != nil {
		return nil, err
	}
	p.env = env
	m, err := module(ctx)
	if err != nil {
		return nil, err
	}
	t2 := time.Now()
	defer func() {
		log.L.WithField("container", p.c.id).WithField("exec", p.execID).WithField("isolate", t1.Sub(t0)).
			WithField("module", t2.Sub(t1)).WithField("instantiate", time.Since(t2)).Debug("prepared module instance")
	}()
	inst = &instance{module: m}
	defer func() {
		if retErr != nil {
			p.h.engine.release(m)
		}
	}()
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	inst.alloc = &allocator{acc: p.c.acc, overLimit: func() {
		// Recorded now: the module may exit on its own right after its
		// failed growth, and must still be reported killed for memory.
		p.markKilled(statusOOM, true)
		go p.kill(statusOOM, true)
	}}
	ictx := experimental.WithMemoryAllocator(context.Background(), inst.alloc)
	if listen := p.c.req.GetListen(); len(listen) > 0 && p.execID == "" {
		cfg := sock.NewConfig()
		for _, addr := range listen {
			host, port, err := net.SplitHostPort(addr)
			if err != nil {
				return nil, fmt.Errorf("listen address %q: %w: %w", addr, err, errdefs.ErrInvalidArgument)
			}
			n, err := strconv.Atoi(port)
			if err != nil {
				return nil, fmt.Errorf("listen port %q: %w", port, errdefs.ErrInvalidArgument)
			}
			cfg = cfg.WithTCPListener(host, n)
		}
		ictx = sock.WithConfig(ictx, cfg)
	}
	// The container's user and capabilities before anything of the module
	// is made: its listening sockets are bound with them (a port below
	// 1024 needs what it would need in a process of that user), and what
	// it opens is checked as theirs.
	if err := setCredentials(p.spec.GetUser(), p.spec.GetCapabilities()); err != nil {
		return nil, err
	}
	p.files = newRootFS(p.h.files)
	mod, err := p.h.engine.rt.InstantiateModule(ictx, m.cm, p.moduleConfig())
	if err != nil {
		inst.alloc.release()
		p.files.release()
		if errors.Is(err, unix.EACCES) || errors.Is(err, unix.EPERM) {
			return nil, fmt.Errorf("instantiating module: %v: %w", err, errdefs.ErrPermissionDenied)
		}
		return nil, fmt.Errorf("instantiating module: %v: %w", err, errdefs.ErrInvalidArgument)
	}
	inst.mod = mod
	return inst, nil
}

// moduleConfig is the instance's configuration. The environment is not in
// it: wazero's WithEnv copies the whole environment at each call, which
// makes a large one quadratic; the host's environ_get serves p.env instead.
func (p *process) moduleConfig() wazero.ModuleConfig {
	cfg := wazero.NewModuleConfig().
		WithName("").
		WithStartFunctions(). // _start runs at Start
		WithArgs(p.spec.GetArgs()...).
		WithSysWalltime().
		WithSysNanotime().
		WithNanosleep(p.nanosleep).
		WithRandSource(rand.Reader).
		WithFSConfig(wazero.NewFSConfig().(sysfs.FSConfig).WithSysFSMount(p.files, "/"))
	if in := p.stdio.stdinReader(); in != nil {
		cfg = cfg.WithStdin(in)
	}
	if out := p.stdio.out; out != nil {
		cfg = cfg.WithStdout(out)
	}
	if errw := p.stdio.err; errw != nil {
		cfg = cfg.WithStderr(errw)
	}
	return cfg
}

// nanosleep sleeps for the module, waking early when it is killed.
func (p *process) nanosleep(ns int64) {
	t := time.NewTimer(time.Duration(ns))
	defer t.Stop()
	select {
	case <-t.C:
	case <-p.killed:
	}
}

// run calls the module's _start. A kill cancels the call's context, which
// wazero checks in every loop and call.
func (p *process) run(inst *instance) (err error) {
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("wasm host error: %v", r)
		}
	}()
	ctx, cancel := context.WithCancel(context.WithValue(context.Background(), processKey{}, p))
	defer cancel()
	p.mu.Lock()
	p.cancel = cancel
	killed := p.killCode != 0
	p.mu.Unlock()
	if killed {
		return nil
	}
	_, err = inst.mod.ExportedFunction("_start").Call(ctx)
	return err
}

// markKilled records why the process is being killed; the first reason
// stands.
func (p *process) markKilled(code int, oom bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.killCode == 0 && p.status != api.Status_STOPPED {
		p.killCode, p.oom = code, oom
	}
}

// kill ends the process with status code (128+signal), or for memory.
func (p *process) kill(code int, oom bool) {
	p.markKilled(code, oom)
	p.mu.Lock()
	if p.status == api.Status_STOPPED {
		p.mu.Unlock()
		return
	}
	cancel := p.cancel
	p.mu.Unlock()
	p.killOnce.Do(func() {
		close(p.killed)
		if p.wake >= 0 {
			_, _ = unix.Write(p.wake, []byte{1, 0, 0, 0, 0, 0, 0, 0})
		}
	})
	if cancel != nil {
		cancel()
	}
	// A module blocked reading stdin or writing a full pipe returns.
	p.stdio.interrupt()
}

// exitOf turns what _start returned into an exit.
func (p *process) exitOf(err error) *api.Exit {
	if e, killed := p.killExit(); killed {
		return e
	}
	var ee *sys.ExitError
	switch {
	case err == nil:
		return newExit(0, "")
	case errors.As(err, &ee):
		return newExit(int(ee.ExitCode()&0xff), "")
	default:
		msg := err.Error()
		p.stdio.report("kuasar-wasm: the module trapped: " + msg)
		return newExit(statusTrap, "trap: "+firstLine(msg))
	}
}

// killExit is the exit of a killed process, if it was killed.
func (p *process) killExit() (*api.Exit, bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	switch {
	case p.oom:
		reason := "OOMKilled: linear memory would grow past the pod's limit"
		if _, _, limit := p.c.acc.usage(); limit != 0 {
			reason = fmt.Sprintf("OOMKilled: linear memory would grow past the container's limit of %d bytes", limit)
		}
		e := newExit(statusOOM, reason)
		e.Oom = true
		return e, true
	case p.killCode != 0:
		return newExit(p.killCode, ""), true
	}
	return nil, false
}

func firstLine(s string) string {
	line, _, _ := strings.Cut(s, "\n")
	return line
}

// finish records the exit and releases the instance; it runs on the
// process's thread, so nothing else uses the instance any more.
func (p *process) finish(inst *instance, e *api.Exit) {
	if inst != nil {
		if inst.mod != nil {
			if err := inst.mod.Close(context.Background()); err != nil {
				log.L.WithError(err).Debug("closing module instance")
			}
		}
		if inst.alloc != nil {
			inst.alloc.release()
		}
		p.h.engine.release(inst.module)
	}
	if p.files != nil {
		p.files.release()
	}
	var ru unix.Rusage
	_ = unix.Getrusage(unix.RUSAGE_THREAD, &ru)
	p.stdio.closeOutputs()
	p.killOnce.Do(func() { close(p.killed) })
	if p.wake >= 0 {
		unix.Close(p.wake)
	}
	p.mu.Lock()
	p.cpu = cpuTimes{user: time.Duration(ru.Utime.Nano()), system: time.Duration(ru.Stime.Nano())}
	p.status = api.Status_STOPPED
	p.exit = e
	p.mu.Unlock()
	close(p.done)
	if p.execID == "" {
		// As in a PID namespace whose init ends: the rest go too.
		for _, e := range p.c.execList() {
			e.kill(128+int(unix.SIGKILL), false)
		}
	}
	p.h.exited(p)
}

// cpuTime returns the CPU time of the process's thread so far.
func (p *process) cpuTime() cpuTimes {
	p.mu.Lock()
	tid, stopped, cpu := p.tid, p.status == api.Status_STOPPED, p.cpu
	p.mu.Unlock()
	if stopped || tid == 0 {
		return cpu
	}
	b, err := os.ReadFile(fmt.Sprintf("/proc/self/task/%d/stat", tid))
	if err != nil {
		return cpu
	}
	s := string(b)
	f := strings.Fields(s[strings.LastIndexByte(s, ')')+2:])
	if len(f) < 13 {
		return cpu
	}
	tick := time.Second / 100 // USER_HZ
	ut, _ := strconv.ParseUint(f[11], 10, 64)
	st, _ := strconv.ParseUint(f[12], 10, 64)
	return cpuTimes{user: time.Duration(ut) * tick, system: time.Duration(st) * tick}
}

// loadFromRootfs reads the module named by arg0 inside the (already
// entered) container root, looking it up on PATH like a shell would when it
// has no slash. The code's bytes are held in the engine's budget until the
// returned release is called.
func (e *engine) loadFromRootfs(ctx context.Context, arg0 string, env []string) ([]byte, func(), error) {
	if arg0 == "" {
		return nil, nil, fmt.Errorf("no module to run: the container's command is empty: %w", errdefs.ErrInvalidArgument)
	}
	candidates := []string{arg0}
	if !strings.Contains(arg0, "/") {
		candidates = nil
		pathVar := "/usr/local/bin:/usr/bin:/bin"
		for _, kv := range env {
			if v, ok := strings.CutPrefix(kv, "PATH="); ok {
				pathVar = v
			}
		}
		for _, dir := range append(strings.Split(pathVar, ":"), "/") {
			if dir != "" {
				candidates = append(candidates, path.Join(dir, arg0), path.Join(dir, arg0+".wasm"))
			}
		}
	}
	for _, c := range candidates {
		code, release, err := e.readModule(ctx, c)
		if errors.Is(err, errNotModuleFile) {
			continue
		}
		if err != nil {
			return nil, nil, err
		}
		if !bytes.HasPrefix(code, []byte("\x00asm")) {
			release()
			return nil, nil, fmt.Errorf("%s is not a WebAssembly module (kuasar-wasm runs WASI modules only): %w", c, errdefs.ErrInvalidArgument)
		}
		return code, release, nil
	}
	return nil, nil, fmt.Errorf("module %q not found in the container's rootfs (nor a Wasm layer in its image): %w", arg0, errdefs.ErrNotFound)
}

var errNotModuleFile = errors.New("not a regular file")

// readModule reads a module file: opened once, without blocking (it may be
// a FIFO, swapped in by a running container), checked to be a regular file
// on that descriptor, read no further than MaxModuleSize, and only once its
// size fits in the engine's memory budget, which holds it until release.
func (e *engine) readModule(ctx context.Context, path string) (_ []byte, release func(), retErr error) {
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_NONBLOCK|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, nil, errNotModuleFile
	}
	f := os.NewFile(uintptr(fd), path)
	defer f.Close()
	st, err := f.Stat()
	if err != nil || !st.Mode().IsRegular() {
		return nil, nil, errNotModuleFile
	}
	if st.Size() > MaxModuleSize {
		return nil, nil, fmt.Errorf("module %s is %d bytes, over the limit of %d: %w", path, st.Size(), MaxModuleSize, errdefs.ErrInvalidArgument)
	}
	if release, err = e.reserve(ctx, st.Size()); err != nil {
		return nil, nil, err
	}
	defer func() {
		if retErr != nil {
			release()
		}
	}()
	// No more than reserved: a file that grows meanwhile is refused.
	code, err := io.ReadAll(io.LimitReader(f, st.Size()+1))
	if err != nil {
		return nil, nil, fmt.Errorf("reading module %s: %w", path, err)
	}
	if int64(len(code)) > st.Size() {
		return nil, nil, fmt.Errorf("module %s grew while it was read: %w", path, errdefs.ErrInvalidArgument)
	}
	return code, release, nil
}

// stdio holds a process's standard streams. Output FIFOs are held open
// read-write, so writes never meet a closed pipe while the daemon that
// reads them restarts; a writer of the stdin FIFO is held until CloseStdin,
// so the module sees end of file only when asked to.
type stdio struct {
	in, inKeep, out, err *os.File
	inFIFO               string // path of a stdin FIFO
	mu                   sync.Mutex
}

func openStdio(s *api.Stdio) (_ *stdio, retErr error) {
	st := &stdio{}
	defer func() {
		if retErr != nil {
			st.close()
		}
	}()
	var err error
	if in := s.GetStdin(); in != "" {
		p := strings.TrimPrefix(in, "file://")
		if st.in, err = os.OpenFile(p, os.O_RDONLY|unix.O_NONBLOCK, 0); err != nil {
			return nil, fmt.Errorf("opening stdin: %w", err)
		}
		if fi, ferr := st.in.Stat(); ferr == nil && fi.Mode()&os.ModeNamedPipe != 0 {
			st.inFIFO = p
			if st.inKeep, err = os.OpenFile(p, os.O_WRONLY|unix.O_NONBLOCK, 0); err != nil {
				return nil, fmt.Errorf("opening stdin: %w", err)
			}
		}
	}
	if st.out, err = openOutput(s.GetStdout()); err != nil {
		return nil, err
	}
	switch {
	case s.GetTerminal() || s.GetStderr() == s.GetStdout():
		// With a terminal both streams go to its one output.
		st.err = st.out
	default:
		if st.err, err = openOutput(s.GetStderr()); err != nil {
			return nil, err
		}
	}
	return st, nil
}

func openOutput(p string) (*os.File, error) {
	switch {
	case p == "":
		return nil, nil
	case strings.HasPrefix(p, "binary://"):
		return nil, fmt.Errorf("logging to a binary (%s) is not supported by kuasar-wasm: %w", p, errdefs.ErrNotImplemented)
	case strings.HasPrefix(p, "file://"):
		return os.OpenFile(strings.TrimPrefix(p, "file://"), os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o640)
	}
	f, err := os.OpenFile(p, os.O_RDWR, 0)
	if err != nil {
		return nil, fmt.Errorf("opening output %s: %w", p, err)
	}
	return f, nil
}

// pollable reports whether stdin is a FIFO or file the host can poll.
func (s *stdio) pollable() bool { return s != nil && s.in != nil }

func (s *stdio) stdinReader() io.Reader {
	if s.in == nil {
		return nil
	}
	return s.in
}

// report writes a line of the host's own to the process's stderr.
func (s *stdio) report(msg string) {
	if s == nil {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.err != nil {
		_ = s.err.SetWriteDeadline(time.Now().Add(time.Second))
		_, _ = s.err.Write([]byte(msg + "\n"))
	}
}

// interrupt makes blocked reads and writes of the module return.
func (s *stdio) interrupt() {
	if s == nil {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	now := time.Now()
	for _, f := range []*os.File{s.in, s.out, s.err} {
		if f != nil {
			_ = f.SetDeadline(now)
		}
	}
	if s.in != nil && s.inFIFO != "" {
		// A module waiting for stdin waits in poll(2), which deadlines do
		// not reach: give it something to read (it is ending anyway).
		if w, err := os.OpenFile(s.inFIFO, os.O_WRONLY|unix.O_NONBLOCK, 0); err == nil {
			_, _ = w.Write([]byte{'\n'})
			w.Close()
		}
	}
}

// closeStdin lets the module see end of file once the daemon's writer is
// gone too.
func (s *stdio) closeStdin() {
	if s == nil {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.inKeep != nil {
		s.inKeep.Close()
		s.inKeep = nil
	}
}

func (s *stdio) closeOutputs() {
	if s == nil {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.out != nil {
		s.out.Close()
	}
	if s.err != nil && s.err != s.out {
		s.err.Close()
	}
	s.out, s.err = nil, nil
}

func (s *stdio) close() {
	if s == nil {
		return
	}
	s.closeOutputs()
	s.closeStdin()
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.in != nil {
		s.in.Close()
		s.in = nil
	}
}
