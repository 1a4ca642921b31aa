package task

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"time"

	eventstypes "github.com/containerd/containerd/api/events"
	taskAPI "github.com/containerd/containerd/api/runtime/task/v3"
	tasktypes "github.com/containerd/containerd/api/types/task"
	"github.com/containerd/containerd/v2/core/events"
	"github.com/containerd/containerd/v2/core/runtime"
	"github.com/containerd/containerd/v2/pkg/identifiers"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/containerd/v2/pkg/protobuf"
	"github.com/containerd/errdefs"
	"github.com/containerd/errdefs/pkg/errgrpc"
	"github.com/containerd/log"
	"github.com/containerd/typeurl/v2"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"
	"google.golang.org/protobuf/types/known/emptypb"

	"github.com/kuasar-io/containerd-kuasar/plugins/internal/fsutil"
)

var empty = &emptypb.Empty{}

// Service implements containerd.task.v3.Task for the containers of one
// sandbox, on top of the sandbox's Runtime.
type Service struct {
	sandboxID string
	namespace string
	dir       string
	rt        Runtime
	publisher events.Publisher
	prepare   func(*Container) error
	metrics   Metrics

	mu         sync.Mutex
	containers map[string]*Container
	reserved   map[string]bool
	oomSent    map[string]bool
}

var _ taskAPI.TTRPCTaskService = (*Service)(nil)

// Metrics is told how container starts and recoveries went.
type Metrics interface {
	// ContainerStarted: a container's init took d to create and start
	// (the Runtime's Create and Start).
	ContainerStarted(d time.Duration)
	// ContainerStartFailed: the Runtime failed a container's create or
	// start.
	ContainerStartFailed()
	// ContainerRecovered: a container recorded by a previous daemon was
	// taken back (metrics.Recovered) or reported exited (metrics.Lost).
	ContainerRecovered(result string)
}

// Option configures a Service.
type Option func(*Service)

// WithMetrics has the service report container starts and recoveries to m.
func WithMetrics(m Metrics) Option {
	return func(s *Service) { s.metrics = m }
}

// NewService returns the task service of sandboxID. Container records are
// kept under dir; events are published to publisher in namespace. prepare,
// if not nil, may change a new container's spec (it is written back to the
// bundle) before the Runtime creates it.
func NewService(sandboxID, namespace, dir string, rt Runtime, publisher events.Publisher, prepare func(*Container) error, opts ...Option) (*Service, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("creating task record dir: %w", err)
	}
	s := &Service{
		sandboxID:  sandboxID,
		namespace:  namespace,
		dir:        dir,
		rt:         rt,
		publisher:  publisher,
		prepare:    prepare,
		containers: map[string]*Container{},
		reserved:   map[string]bool{},
		oomSent:    map[string]bool{},
	}
	for _, o := range opts {
		o(s)
	}
	return s, nil
}

func (s *Service) startFailed() {
	if s.metrics != nil {
		s.metrics.ContainerStartFailed()
	}
}

// Containers returns the sandbox's containers.
func (s *Service) Containers() []*Container {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]*Container, 0, len(s.containers))
	for _, c := range s.containers {
		out = append(out, c)
	}
	return out
}

func (s *Service) container(id string) (*Container, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	c, ok := s.containers[id]
	if !ok {
		return nil, fmt.Errorf("container %q in sandbox %q: %w", id, s.sandboxID, errdefs.ErrNotFound)
	}
	return c, nil
}

func (s *Service) process(id, execID string) (*Process, error) {
	c, err := s.container(id)
	if err != nil {
		return nil, err
	}
	p, ok := c.Process(execID)
	if !ok {
		return nil, fmt.Errorf("exec %q in container %q: %w", execID, id, errdefs.ErrNotFound)
	}
	return p, nil
}

func (s *Service) publish(ns string, event any) {
	if s.publisher == nil {
		return
	}
	if ns == "" {
		ns = s.namespace
	}
	ctx := namespaces.WithNamespace(context.Background(), ns)
	if err := s.publisher.Publish(ctx, runtime.GetTopic(event), event); err != nil {
		log.G(ctx).WithError(err).Warn("publishing task event")
	}
}

// Create a container and its init process, ready to start.
func (s *Service) Create(ctx context.Context, r *taskAPI.CreateTaskRequest) (_ *taskAPI.CreateTaskResponse, retErr error) {
	defer func() { retErr = errgrpc.ToGRPC(retErr) }()
	if err := identifiers.Validate(r.ID); err != nil {
		return nil, err
	}
	if r.Checkpoint != "" || r.ParentCheckpoint != "" {
		return nil, fmt.Errorf("restoring from a checkpoint: %w", errdefs.ErrNotImplemented)
	}
	ns, _ := namespaces.Namespace(ctx)
	if ns == "" {
		ns = s.namespace
	}
	s.mu.Lock()
	if _, ok := s.containers[r.ID]; ok || s.reserved[r.ID] {
		s.mu.Unlock()
		return nil, fmt.Errorf("container %q: %w", r.ID, errdefs.ErrAlreadyExists)
	}
	s.reserved[r.ID] = true
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		delete(s.reserved, r.ID)
		s.mu.Unlock()
	}()

	spec, err := loadSpec(r.Bundle)
	if err != nil {
		return nil, err
	}
	c := &Container{
		ID:        r.ID,
		Namespace: ns,
		Bundle:    r.Bundle,
		Spec:      spec,
		CreatedAt: time.Now(),
		svc:       s,
		execs:     map[string]*Process{},
	}
	for _, m := range r.Rootfs {
		c.Rootfs = append(c.Rootfs, Mount{Type: m.Type, Source: m.Source, Target: m.Target, Options: m.Options})
	}
	c.Init = newProcess(c, "", IO{Stdin: r.Stdin, Stdout: r.Stdout, Stderr: r.Stderr, Terminal: r.Terminal})
	if s.prepare != nil {
		if err := s.prepare(c); err != nil {
			return nil, err
		}
		if err := c.WriteSpec(); err != nil {
			return nil, err
		}
	}
	began := time.Now()
	if err := s.rt.Create(ctx, c); err != nil {
		s.startFailed()
		return nil, err
	}
	c.createTook = time.Since(began)
	if err := s.save(c); err != nil {
		_ = s.rt.Delete(ctx, c.Init)
		return nil, err
	}
	s.mu.Lock()
	s.containers[c.ID] = c
	s.mu.Unlock()

	s.publish(ns, &eventstypes.TaskCreate{
		ContainerID: c.ID,
		Bundle:      c.Bundle,
		Rootfs:      r.Rootfs,
		IO:          &eventstypes.TaskIO{Stdin: r.Stdin, Stdout: r.Stdout, Stderr: r.Stderr, Terminal: r.Terminal},
		Pid:         uint32(c.Init.Pid()),
	})
	return &taskAPI.CreateTaskResponse{Pid: uint32(c.Init.Pid())}, nil
}

// Start the init process or an exec.
func (s *Service) Start(ctx context.Context, r *taskAPI.StartRequest) (_ *taskAPI.StartResponse, retErr error) {
	defer func() { retErr = errgrpc.ToGRPC(retErr) }()
	p, err := s.process(r.ID, r.ExecID)
	if err != nil {
		return nil, err
	}
	if st := p.Status(); st != tasktypes.Status_CREATED {
		return nil, fmt.Errorf("process %q is %s, not created: %w", p.ID(), st, errdefs.ErrFailedPrecondition)
	}
	if p.ExecID != "" {
		if st := p.Container.Init.Status(); st != tasktypes.Status_RUNNING {
			return nil, fmt.Errorf("container %q is %s: an exec cannot start in it: %w", p.Container.ID, st, errdefs.ErrFailedPrecondition)
		}
	}
	began := time.Now()
	if err := s.rt.Start(ctx, p); err != nil {
		if p.ExecID == "" {
			s.startFailed()
		}
		return nil, err
	}
	p.setStatus(tasktypes.Status_RUNNING)
	c := p.Container
	if p.ExecID == "" {
		if s.metrics != nil {
			s.metrics.ContainerStarted(c.createTook + time.Since(began))
		}
		if err := s.save(c); err != nil {
			log.G(ctx).WithError(err).Warn("saving container record")
		}
		s.publish(c.Namespace, &eventstypes.TaskStart{ContainerID: c.ID, Pid: uint32(p.Pid())})
	} else {
		s.publish(c.Namespace, &eventstypes.TaskExecStarted{ContainerID: c.ID, ExecID: p.ExecID, Pid: uint32(p.Pid())})
	}
	return &taskAPI.StartResponse{Pid: uint32(p.Pid())}, nil
}

// Delete an exited (or never started) process; for the init process, the
// whole container.
func (s *Service) Delete(ctx context.Context, r *taskAPI.DeleteRequest) (_ *taskAPI.DeleteResponse, retErr error) {
	defer func() { retErr = errgrpc.ToGRPC(retErr) }()
	p, err := s.process(r.ID, r.ExecID)
	if err != nil {
		return nil, err
	}
	c := p.Container
	switch p.Status() {
	case tasktypes.Status_RUNNING, tasktypes.Status_PAUSED, tasktypes.Status_PAUSING:
		return nil, fmt.Errorf("process %q is still running: %w", p.ID(), errdefs.ErrFailedPrecondition)
	}
	if err := s.rt.Delete(ctx, p); err != nil {
		return nil, err
	}
	status, at := p.ExitStatus()
	if at.IsZero() {
		at = time.Now()
	}
	resp := &taskAPI.DeleteResponse{Pid: uint32(p.Pid()), ExitStatus: status, ExitedAt: protobuf.ToTimestamp(at)}
	if p.ExecID != "" {
		c.mu.Lock()
		delete(c.execs, p.ExecID)
		c.mu.Unlock()
		return resp, nil
	}
	s.mu.Lock()
	delete(s.containers, c.ID)
	delete(s.oomSent, c.ID)
	s.mu.Unlock()
	if err := os.Remove(s.recordPath(c.ID)); err != nil && !errors.Is(err, os.ErrNotExist) {
		log.G(ctx).WithError(err).Warn("removing container record")
	}
	s.publish(c.Namespace, &eventstypes.TaskDelete{ContainerID: c.ID, Pid: resp.Pid, ExitStatus: status, ExitedAt: resp.ExitedAt})
	return resp, nil
}

// Exec adds a process to a running container.
func (s *Service) Exec(ctx context.Context, r *taskAPI.ExecProcessRequest) (_ *emptypb.Empty, retErr error) {
	defer func() { retErr = errgrpc.ToGRPC(retErr) }()
	if err := identifiers.Validate(r.ExecID); err != nil {
		return nil, err
	}
	c, err := s.container(r.ID)
	if err != nil {
		return nil, err
	}
	if st := c.Init.Status(); st != tasktypes.Status_RUNNING {
		return nil, fmt.Errorf("container %q is %s: %w", c.ID, st, errdefs.ErrFailedPrecondition)
	}
	if r.Spec == nil {
		return nil, fmt.Errorf("exec %q has no process spec: %w", r.ExecID, errdefs.ErrInvalidArgument)
	}
	var spec specs.Process
	if err := json.Unmarshal(r.Spec.Value, &spec); err != nil {
		return nil, fmt.Errorf("decoding exec process spec: %w: %w", err, errdefs.ErrInvalidArgument)
	}
	p := newProcess(c, r.ExecID, IO{Stdin: r.Stdin, Stdout: r.Stdout, Stderr: r.Stderr, Terminal: r.Terminal})
	p.Spec = &spec
	c.mu.Lock()
	if _, ok := c.execs[r.ExecID]; ok {
		c.mu.Unlock()
		return nil, fmt.Errorf("exec %q: %w", r.ExecID, errdefs.ErrAlreadyExists)
	}
	c.execs[r.ExecID] = p
	c.mu.Unlock()
	if err := s.rt.Exec(ctx, p); err != nil {
		c.mu.Lock()
		delete(c.execs, r.ExecID)
		c.mu.Unlock()
		return nil, err
	}
	s.publish(c.Namespace, &eventstypes.TaskExecAdded{ContainerID: c.ID, ExecID: r.ExecID})
	return empty, nil
}

// State of a process.
func (s *Service) State(ctx context.Context, r *taskAPI.StateRequest) (_ *taskAPI.StateResponse, retErr error) {
	defer func() { retErr = errgrpc.ToGRPC(retErr) }()
	p, err := s.process(r.ID, r.ExecID)
	if err != nil {
		return nil, err
	}
	status, at := p.ExitStatus()
	resp := &taskAPI.StateResponse{
		ID:         p.ID(),
		Bundle:     p.Container.Bundle,
		Pid:        uint32(p.Pid()),
		Status:     p.Status(),
		Stdin:      p.IO.Stdin,
		Stdout:     p.IO.Stdout,
		Stderr:     p.IO.Stderr,
		Terminal:   p.IO.Terminal,
		ExitStatus: status,
		ExecID:     p.ExecID,
	}
	if !at.IsZero() {
		resp.ExitedAt = protobuf.ToTimestamp(at)
	}
	return resp, nil
}

// Wait blocks until a process exits.
func (s *Service) Wait(ctx context.Context, r *taskAPI.WaitRequest) (_ *taskAPI.WaitResponse, retErr error) {
	defer func() { retErr = errgrpc.ToGRPC(retErr) }()
	p, err := s.process(r.ID, r.ExecID)
	if err != nil {
		return nil, err
	}
	select {
	case <-p.Done():
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	status, at := p.ExitStatus()
	return &taskAPI.WaitResponse{ExitStatus: status, ExitedAt: protobuf.ToTimestamp(at)}, nil
}

// Kill signals a process.
func (s *Service) Kill(ctx context.Context, r *taskAPI.KillRequest) (_ *emptypb.Empty, retErr error) {
	defer func() { retErr = errgrpc.ToGRPC(retErr) }()
	p, err := s.process(r.ID, r.ExecID)
	if err != nil {
		return nil, err
	}
	if p.Status() == tasktypes.Status_STOPPED && !r.All {
		return nil, fmt.Errorf("process %q already finished: %w", p.ID(), errdefs.ErrNotFound)
	}
	if r.Signal == 0 || r.Signal >= 65 {
		return nil, fmt.Errorf("signal %d: %w", r.Signal, errdefs.ErrInvalidArgument)
	}
	if err := s.rt.Kill(ctx, p, unix.Signal(r.Signal), r.All); err != nil {
		return nil, err
	}
	return empty, nil
}

// Pids lists the container's processes.
func (s *Service) Pids(ctx context.Context, r *taskAPI.PidsRequest) (_ *taskAPI.PidsResponse, retErr error) {
	defer func() { retErr = errgrpc.ToGRPC(retErr) }()
	c, err := s.container(r.ID)
	if err != nil {
		return nil, err
	}
	if c.Init.Status() == tasktypes.Status_STOPPED {
		return &taskAPI.PidsResponse{Processes: []*tasktypes.ProcessInfo{{Pid: uint32(c.Init.Pid())}}}, nil
	}
	ps, err := s.rt.Pids(ctx, c)
	if err != nil {
		return nil, err
	}
	return &taskAPI.PidsResponse{Processes: ps}, nil
}

// Pause freezes a container.
func (s *Service) Pause(ctx context.Context, r *taskAPI.PauseRequest) (_ *emptypb.Empty, retErr error) {
	defer func() { retErr = errgrpc.ToGRPC(retErr) }()
	c, err := s.container(r.ID)
	if err != nil {
		return nil, err
	}
	if err := s.rt.Pause(ctx, c); err != nil {
		return nil, err
	}
	c.Init.setStatus(tasktypes.Status_PAUSED)
	s.publish(c.Namespace, &eventstypes.TaskPaused{ContainerID: c.ID})
	return empty, nil
}

// Resume thaws a container.
func (s *Service) Resume(ctx context.Context, r *taskAPI.ResumeRequest) (_ *emptypb.Empty, retErr error) {
	defer func() { retErr = errgrpc.ToGRPC(retErr) }()
	c, err := s.container(r.ID)
	if err != nil {
		return nil, err
	}
	if err := s.rt.Resume(ctx, c); err != nil {
		return nil, err
	}
	c.Init.setStatus(tasktypes.Status_RUNNING)
	s.publish(c.Namespace, &eventstypes.TaskResumed{ContainerID: c.ID})
	return empty, nil
}

// Checkpoint is not supported.
func (s *Service) Checkpoint(ctx context.Context, r *taskAPI.CheckpointTaskRequest) (*emptypb.Empty, error) {
	return nil, errgrpc.ToGRPC(fmt.Errorf("checkpoint of %q: %w", r.ID, errdefs.ErrNotImplemented))
}

// ResizePty resizes a process's terminal.
func (s *Service) ResizePty(ctx context.Context, r *taskAPI.ResizePtyRequest) (_ *emptypb.Empty, retErr error) {
	defer func() { retErr = errgrpc.ToGRPC(retErr) }()
	p, err := s.process(r.ID, r.ExecID)
	if err != nil {
		return nil, err
	}
	if !p.IO.Terminal {
		return nil, fmt.Errorf("process %q has no terminal: %w", p.ID(), errdefs.ErrFailedPrecondition)
	}
	if err := s.rt.ResizePty(ctx, p, r.Width, r.Height); err != nil {
		return nil, err
	}
	return empty, nil
}

// CloseIO closes a process's stdin.
func (s *Service) CloseIO(ctx context.Context, r *taskAPI.CloseIORequest) (_ *emptypb.Empty, retErr error) {
	defer func() { retErr = errgrpc.ToGRPC(retErr) }()
	p, err := s.process(r.ID, r.ExecID)
	if err != nil {
		return nil, err
	}
	if r.Stdin {
		if err := s.rt.CloseIO(ctx, p); err != nil {
			return nil, err
		}
	}
	return empty, nil
}

// Update a container's resources.
func (s *Service) Update(ctx context.Context, r *taskAPI.UpdateTaskRequest) (_ *emptypb.Empty, retErr error) {
	defer func() { retErr = errgrpc.ToGRPC(retErr) }()
	c, err := s.container(r.ID)
	if err != nil {
		return nil, err
	}
	var res *specs.LinuxResources
	if r.Resources != nil {
		v, err := typeurl.UnmarshalAny(r.Resources)
		if err != nil {
			return nil, fmt.Errorf("decoding resources: %w: %w", err, errdefs.ErrInvalidArgument)
		}
		var ok bool
		if res, ok = v.(*specs.LinuxResources); !ok {
			return nil, fmt.Errorf("resources of type %T: %w", v, errdefs.ErrInvalidArgument)
		}
	}
	if err := s.rt.Update(ctx, c, res, r.Annotations); err != nil {
		return nil, err
	}
	return empty, nil
}

// Stats returns a container's metrics.
func (s *Service) Stats(ctx context.Context, r *taskAPI.StatsRequest) (_ *taskAPI.StatsResponse, retErr error) {
	defer func() { retErr = errgrpc.ToGRPC(retErr) }()
	c, err := s.container(r.ID)
	if err != nil {
		return nil, err
	}
	st, err := s.rt.Stats(ctx, c)
	if err != nil {
		return nil, err
	}
	return &taskAPI.StatsResponse{Stats: typeurl.MarshalProto(completeStats(st))}, nil
}

// Connect returns the pid serving the task (containerd-kuasar's own: there
// is no shim) and the container's init pid.
func (s *Service) Connect(ctx context.Context, r *taskAPI.ConnectRequest) (_ *taskAPI.ConnectResponse, retErr error) {
	defer func() { retErr = errgrpc.ToGRPC(retErr) }()
	c, err := s.container(r.ID)
	if err != nil {
		return nil, err
	}
	return &taskAPI.ConnectResponse{ShimPid: uint32(os.Getpid()), TaskPid: uint32(c.Init.Pid())}, nil
}

// Shutdown is called by containerd after each task delete. The endpoint is
// shared by the sandbox's containers and lives as long as the sandbox, so
// there is nothing to do.
func (s *Service) Shutdown(ctx context.Context, r *taskAPI.ShutdownRequest) (*emptypb.Empty, error) {
	return empty, nil
}

// execsDrain bounds the wait for a container's execs to end after its
// init did, before the init's exit is published.
const execsDrain = 2 * time.Second

// exited is called once per process when it ends. An init's exit is
// published after those of its execs, as containerd's runc shim does: they
// end with it (the kernel ends them with the container's PID namespace;
// without one of its own they are killed here).
func (s *Service) exited(p *Process) {
	c := p.Container
	status, at := p.ExitStatus()
	if p.ExecID == "" {
		s.endExecs(c)
		if err := s.save(c); err != nil {
			log.L.WithError(err).WithField("container", c.ID).Warn("saving exit status")
		}
	}
	s.publish(c.Namespace, &eventstypes.TaskExit{
		ContainerID: c.ID,
		ID:          p.ID(),
		Pid:         uint32(p.Pid()),
		ExitStatus:  status,
		ExitedAt:    protobuf.ToTimestamp(at),
	})
}

// endExecs ends the execs still running in c, whose init has exited, and
// waits (bounded) for their exits.
func (s *Service) endExecs(c *Container) {
	var running []*Process
	for _, e := range c.Execs() {
		if st := e.Status(); st == tasktypes.Status_RUNNING || st == tasktypes.Status_PAUSED {
			running = append(running, e)
		}
	}
	if len(running) == 0 {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), execsDrain)
	defer cancel()
	if !ownsPIDNamespace(c.Spec) {
		for _, e := range running {
			if err := s.rt.Kill(ctx, e, unix.SIGKILL, false); err != nil && !errdefs.IsNotFound(err) {
				log.G(ctx).WithError(err).WithField("exec", e.ExecID).Debug("killing an exec after its init")
			}
		}
	}
	for _, e := range running {
		select {
		case <-e.Done():
		case <-ctx.Done():
			log.G(ctx).WithField("container", c.ID).WithField("exec", e.ExecID).Warn("exec still running after its container's init exited")
			return
		}
	}
}

// ownsPIDNamespace reports whether a container has a PID namespace of its
// own (one that ends with its init).
func ownsPIDNamespace(spec *specs.Spec) bool {
	if spec == nil || spec.Linux == nil {
		return false
	}
	for _, ns := range spec.Linux.Namespaces {
		if ns.Type == specs.PIDNamespace {
			return ns.Path == ""
		}
	}
	return false
}

func (s *Service) oom(c *Container) {
	s.mu.Lock()
	sent := s.oomSent[c.ID]
	s.oomSent[c.ID] = true
	s.mu.Unlock()
	if !sent {
		s.publish(c.Namespace, &eventstypes.TaskOOM{ContainerID: c.ID})
	}
}

// KillAll kills every container of the sandbox and waits (bounded by ctx)
// for their init processes to exit. Used when the sandbox stops.
func (s *Service) KillAll(ctx context.Context) {
	for _, c := range s.Containers() {
		if c.Init.Status() == tasktypes.Status_STOPPED {
			continue
		}
		if err := s.rt.Kill(ctx, c.Init, unix.SIGKILL, true); err != nil {
			log.G(ctx).WithError(err).WithField("container", c.ID).Debug("killing container at sandbox stop")
		}
	}
	for _, c := range s.Containers() {
		select {
		case <-c.Init.Done():
		case <-ctx.Done():
			return
		}
	}
}

// DeleteAll releases every container left in the sandbox (for Shutdown).
func (s *Service) DeleteAll(ctx context.Context) {
	for _, c := range s.Containers() {
		for _, p := range c.Execs() {
			if err := s.rt.Delete(ctx, p); err != nil {
				log.G(ctx).WithError(err).WithField("exec", p.ExecID).Warn("deleting exec at sandbox shutdown")
			}
		}
		if err := s.rt.Delete(ctx, c.Init); err != nil {
			log.G(ctx).WithError(err).WithField("container", c.ID).Warn("deleting container at sandbox shutdown")
		}
		s.mu.Lock()
		delete(s.containers, c.ID)
		s.mu.Unlock()
		_ = os.Remove(s.recordPath(c.ID))
	}
}

func loadSpec(bundle string) (*specs.Spec, error) {
	if !filepath.IsAbs(bundle) {
		return nil, fmt.Errorf("bundle path %q is not absolute: %w", bundle, errdefs.ErrInvalidArgument)
	}
	b, err := os.ReadFile(filepath.Join(bundle, "config.json"))
	if err != nil {
		return nil, fmt.Errorf("reading OCI spec: %w", err)
	}
	var spec specs.Spec
	if err := json.Unmarshal(b, &spec); err != nil {
		return nil, fmt.Errorf("decoding OCI spec: %w: %w", err, errdefs.ErrInvalidArgument)
	}
	if spec.Process == nil || len(spec.Process.Args) == 0 {
		return nil, fmt.Errorf("OCI spec has no process to run: %w", errdefs.ErrInvalidArgument)
	}
	return &spec, nil
}

// WriteSpec replaces the bundle's config.json with c.Spec.
func (c *Container) WriteSpec() error {
	b, err := json.Marshal(c.Spec)
	if err != nil {
		return err
	}
	return fsutil.WriteFileAtomic(filepath.Join(c.Bundle, "config.json"), b, 0o600)
}
