// Package task serves containerd's task API (v3, ttrpc) from inside the
// containerd-kuasar process, one endpoint per sandbox, in place of a shim.
//
// The Service here owns everything every kind of sandbox shares: the
// container and exec bookkeeping, the process state machine, Wait, exit
// statuses, task events published to containerd's exchange, and the records
// that let a restarted daemon pick its containers up again. What actually
// runs a container is a Runtime, provided per sandbox by its kind: runc for
// namespaces, a guest agent for microVMs, a Wasm engine for WebAssembly.
package task

import (
	"context"
	"encoding/json"
	"sync"
	"time"

	"github.com/containerd/containerd/api/types/runc/options"
	tasktypes "github.com/containerd/containerd/api/types/task"
	"github.com/containerd/typeurl/v2"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"
)

// Runtime runs the containers of one sandbox. The Service calls it with the
// process state already checked; a Runtime reports exits by calling
// Process.Exited. Operations a kind cannot support return an error wrapping
// errdefs.ErrNotImplemented that names the kind.
//
// Nothing here assumes a process is one of the node's: a Runtime may run
// its containers on the node (kuasar-runc: processes parented by the
// keeper, writing straight into containerd's FIFOs), in a process of its
// own (the Wasm host: threads), or in a VM (kuasar-vmm: processes of the
// guest, their streams copied by the daemon). It reports, with SetPid, the
// node pid that stands for the process: its own, or what runs it.
type Runtime interface {
	// Create prepares c (rootfs, IO, init process) without starting it. On
	// error it must leave nothing behind.
	Create(ctx context.Context, c *Container) error
	// Start starts p, the init process after Create or an exec after Exec,
	// and records its pid with p.SetPid.
	Start(ctx context.Context, p *Process) error
	// Exec validates and prepares an additional process in c (p.Spec).
	Exec(ctx context.Context, p *Process) error
	// Kill signals p, or with all every process of p's container.
	Kill(ctx context.Context, p *Process, sig unix.Signal, all bool) error
	// Delete releases what p holds; for an init process, everything the
	// container holds. It is called once p has exited or never started.
	Delete(ctx context.Context, p *Process) error
	// Pids lists the processes of c.
	Pids(ctx context.Context, c *Container) ([]*tasktypes.ProcessInfo, error)
	// ResizePty resizes p's terminal.
	ResizePty(ctx context.Context, p *Process, width, height uint32) error
	// CloseIO closes p's stdin.
	CloseIO(ctx context.Context, p *Process) error
	// Update changes c's resources.
	Update(ctx context.Context, c *Container, res *specs.LinuxResources, annotations map[string]string) error
	// Stats returns c's metrics (cgroup v1 or v2 metrics, as a typeurl.Any).
	Stats(ctx context.Context, c *Container) (typeurl.Any, error)
	// Pause and Resume freeze and thaw c.
	Pause(ctx context.Context, c *Container) error
	Resume(ctx context.Context, c *Container) error
	// Recover re-attaches to c after a daemon restart: it must resume exit
	// reporting (calling Exited for an init that ended meanwhile) and IO.
	Recover(ctx context.Context, c *Container) error
}

// Status of a process, as containerd's task API reports it.
type Status = tasktypes.Status

// IO is where a process's standard streams go, as containerd hands them
// over: FIFO paths (or file:// URIs) and whether it has a terminal.
type IO struct {
	Stdin    string `json:"stdin,omitempty"`
	Stdout   string `json:"stdout,omitempty"`
	Stderr   string `json:"stderr,omitempty"`
	Terminal bool   `json:"terminal,omitempty"`
}

// Mount is a rootfs mount of a container.
type Mount struct {
	Type    string   `json:"type"`
	Source  string   `json:"source"`
	Target  string   `json:"target,omitempty"`
	Options []string `json:"options,omitempty"`
}

// Container is one task of the sandbox: its init process and its execs.
type Container struct {
	ID        string
	Namespace string
	Bundle    string
	Rootfs    []Mount
	// Spec is the OCI spec from the bundle. A Runtime may change it in
	// Create (and rewrite the bundle's config.json accordingly).
	Spec      *specs.Spec
	CreatedAt time.Time
	Init      *Process

	// State is the Runtime's own data for this container. It is persisted
	// with the container's record and given back on Recover.
	State json.RawMessage

	svc   *Service
	mu    sync.Mutex
	execs map[string]*Process
	// createTook is how long the Runtime's Create took (for metrics).
	createTook time.Duration
}

// Process returns the init process ("") or the exec with that ID.
func (c *Container) Process(execID string) (*Process, bool) {
	if execID == "" {
		return c.Init, true
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	p, ok := c.execs[execID]
	return p, ok
}

// Execs returns the container's exec processes.
func (c *Container) Execs() []*Process {
	c.mu.Lock()
	defer c.mu.Unlock()
	out := make([]*Process, 0, len(c.execs))
	for _, p := range c.execs {
		out = append(out, p)
	}
	return out
}

// OOM reports that a process of c was killed for lack of memory. The
// service publishes it once per container, before c's exit.
func (c *Container) OOM() {
	c.svc.oom(c)
}

// SaveState persists c's record (with its State) now.
func (c *Container) SaveState() error {
	return c.svc.save(c)
}

// Process is the init process of a container or one exec in it.
type Process struct {
	// ExecID is empty for the init process.
	ExecID string
	IO     IO
	// Spec is the process spec of an exec (nil for init: see the
	// container's Spec).
	Spec *specs.Process
	// Container the process belongs to.
	Container *Container
	// Private is the Runtime's in-memory data for this process.
	Private any

	mu         sync.Mutex
	pid        int
	status     Status
	exitStatus uint32
	exitedAt   time.Time
	exited     chan struct{}
}

func newProcess(c *Container, execID string, io IO) *Process {
	return &Process{
		ExecID:    execID,
		IO:        io,
		Container: c,
		status:    tasktypes.Status_CREATED,
		exited:    make(chan struct{}),
	}
}

// ID is the process ID in the task API: the exec ID, or the container ID.
func (p *Process) ID() string {
	if p.ExecID == "" {
		return p.Container.ID
	}
	return p.ExecID
}

// Pid returns the node pid that stands for the process (see Runtime): its
// own, or, for a process with none on the node (in a VM), what runs it; 0
// if none yet.
func (p *Process) Pid() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.pid
}

// SetPid records the pid of a created or started process.
func (p *Process) SetPid(pid int) {
	p.mu.Lock()
	p.pid = pid
	p.mu.Unlock()
}

// Status returns the process's current status.
func (p *Process) Status() Status {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.status
}

// ExitStatus returns the exit status and time of a stopped process.
func (p *Process) ExitStatus() (uint32, time.Time) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.exitStatus, p.exitedAt
}

// Done is closed once the process has exited.
func (p *Process) Done() <-chan struct{} { return p.exited }

// Exited records the end of the process, once; later calls are ignored.
// status follows containerd's convention (128+signal for a signal).
func (p *Process) Exited(status int, at time.Time) {
	p.mu.Lock()
	if p.status == tasktypes.Status_STOPPED {
		p.mu.Unlock()
		return
	}
	p.status = tasktypes.Status_STOPPED
	p.exitStatus = uint32(status)
	p.exitedAt = at
	p.mu.Unlock()
	p.Container.svc.exited(p)
	close(p.exited)
}

func (p *Process) setStatus(s Status) {
	p.mu.Lock()
	if p.status != tasktypes.Status_STOPPED {
		p.status = s
	}
	p.mu.Unlock()
}

// ProcessInfos lists pids of c for the task API's Pids, marking those of
// its execs with their exec ID (runc options' ProcessDetails, as
// containerd's runc shim does).
func ProcessInfos(c *Container, pids []int) []*tasktypes.ProcessInfo {
	execs := map[int]string{}
	for _, e := range c.Execs() {
		if pid := e.Pid(); pid > 0 {
			execs[pid] = e.ExecID
		}
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
	return out
}
