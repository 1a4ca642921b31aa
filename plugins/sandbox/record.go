package sandbox

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/containerd/containerd/api/types"
	tasktypes "github.com/containerd/containerd/api/types/task"
	"github.com/containerd/errdefs"
	"github.com/containerd/log"
	"github.com/containerd/typeurl/v2"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"
	"google.golang.org/protobuf/proto"
	runtime "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/kuasar-io/containerd-kuasar/plugins/internal/fsutil"
	"github.com/kuasar-io/containerd-kuasar/plugins/metrics"
	"github.com/kuasar-io/containerd-kuasar/plugins/task"
)

const recordFile = "sandbox.json"

// record is a sandbox as written to its directory.
type record struct {
	Sandbox    *Sandbox  `json:"sandbox"`
	Config     []byte    `json:"config,omitempty"` // protobuf PodSandboxConfig
	State      string    `json:"state,omitempty"`
	Started    bool      `json:"started,omitempty"`
	ExitStatus uint32    `json:"exitStatus,omitempty"`
	ExitedAt   time.Time `json:"exitedAt,omitzero"`
}

// save writes e's record; called with e.mu held.
func (c *Controller) save(e *entry) error {
	cfg, err := proto.Marshal(e.sb.Config)
	if err != nil {
		return err
	}
	r := record{
		Sandbox:    e.sb,
		Config:     cfg,
		State:      e.state,
		Started:    e.endpoint != nil || e.state != "",
		ExitStatus: e.exitStatus,
		ExitedAt:   e.exitedAt,
	}
	b, err := json.Marshal(&r)
	if err != nil {
		return err
	}
	return fsutil.WriteFileAtomic(filepath.Join(e.sb.Dir, recordFile), b, 0o600)
}

// Recover loads every sandbox recorded by a previous daemon, re-attaches
// its kind and containers, and serves its task endpoint again. It must run
// before containerd's task runtime reconnects to the endpoints. Last, a
// kind that can (Reconciler) removes what a daemon killed in the middle of
// an operation left without a record.
func (c *Controller) Recover(ctx context.Context) error {
	if err := os.MkdirAll(c.paths.State, 0o700); err != nil {
		return err
	}
	dirs, err := os.ReadDir(c.paths.State)
	if err != nil {
		return err
	}
	for _, d := range dirs {
		if !d.IsDir() {
			continue
		}
		dir := filepath.Join(c.paths.State, d.Name())
		if err := c.recoverOne(ctx, dir); err != nil {
			c.metrics.SandboxRecovered(c.id, metrics.Discarded)
			if errors.Is(err, errNotRecorded) {
				// Left by a Create interrupted by a crash: nothing started.
				log.G(ctx).WithField("dir", dir).Warn("removing a sandbox directory without record")
			} else {
				log.G(ctx).WithError(err).WithField("dir", dir).Error("could not recover sandbox; removing it")
			}
			if err := removeDir(dir); err != nil {
				log.G(ctx).WithError(err).WithField("dir", dir).Error("removing a sandbox directory")
			}
		}
	}
	if r, ok := c.kind.(Reconciler); ok {
		owned := Owned{Containers: map[string][]*task.Container{}}
		c.mu.Lock()
		for _, e := range c.sandboxes {
			if e.lost {
				continue
			}
			owned.Sandboxes = append(owned.Sandboxes, e.sb)
			owned.Containers[e.sb.ID] = e.tasks.Containers()
		}
		c.mu.Unlock()
		if err := r.Reconcile(ctx, owned); err != nil {
			log.G(ctx).WithError(err).WithField("sandboxer", c.id).Error("removing what no record owns")
		}
	}
	return nil
}

func (c *Controller) recoverOne(ctx context.Context, dir string) error {
	r, err := readRecord(dir)
	if errors.Is(err, errNotRecorded) {
		return err
	}
	handler := c.id
	if err == nil && r.Sandbox.Handler != "" {
		handler = r.Sandbox.Handler
	}
	c.mu.Lock()
	e := c.newEntry(handler)
	c.mu.Unlock()
	// Held until the entry is whole: an exit the kind or its containers
	// report while they recover (a PID-namespace init that ended while the
	// daemon was down) is applied after that.
	e.mu.Lock()
	defer e.mu.Unlock()
	var sb *Sandbox
	var inst Instance
	if err != nil {
		// A record that cannot be read: the sandbox, named by its
		// directory, is lost.
		log.G(ctx).WithError(err).WithField("dir", dir).Errorf("%s sandbox record unreadable; reporting the sandbox ended", c.id)
		sb = &Sandbox{ID: filepath.Base(dir), Dir: dir, Config: &runtime.PodSandboxConfig{}}
		r = &record{Sandbox: sb}
	} else {
		sb = r.Sandbox
	}
	sb.Handler = handler
	e.sb, e.exitStatus, e.exitedAt = sb, r.ExitStatus, r.ExitedAt
	e.setState(r.State)
	sb.exit = func(status uint32) { c.exitedOnItsOwn(e, status) }
	if err == nil {
		if !sb.hasPodFiles() {
			// Written by an older daemon where CRI removes them.
			if err := WritePodFiles(sb); err != nil {
				log.G(ctx).WithError(err).WithField("sandbox", sb.ID).Warn("rewriting the pod's files")
			}
		}
		inst, err = c.kind.Recover(ctx, sb)
		if err != nil {
			log.G(ctx).WithError(err).WithField("sandbox", sb.ID).Errorf("%s sandbox could not be recovered; reporting it ended", c.id)
		}
	}
	if err != nil {
		// What the kind could not take back is not its any more: the
		// sandbox and its containers are reported ended, what it held on
		// the node is released (Reconcile removes its processes), and it
		// can be removed.
		if err := removeMounts(sb.Dir); err != nil {
			log.G(ctx).WithError(err).WithField("sandbox", sb.ID).Warn("unmounting what the sandbox held")
		}
		inst, e.lost = &lostInstance{reason: err.Error()}, true
		if e.state != stateNotReady {
			e.setState(stateNotReady)
			e.exitStatus, e.exitedAt = lostStatus, time.Now().UTC()
		}
	}
	if e.state == stateNotReady {
		e.closeExited()
	}
	tasks, err := c.newTasks(sb, inst)
	if err != nil {
		return err
	}
	e.inst, e.tasks = inst, tasks
	if r.Started && sb.Namespace != "" {
		ep, err := task.Listen(ctx, c.socketPath(sb.Namespace, sb.ID), tasks)
		if err != nil {
			return err
		}
		e.endpoint = ep
	} else if sb.Namespace != "" {
		// A Start killed before it recorded the sandbox started leaves
		// the endpoint's socket, which nothing will close.
		if err := os.Remove(c.socketPath(sb.Namespace, sb.ID)); err != nil && !errors.Is(err, os.ErrNotExist) {
			log.G(ctx).WithError(err).WithField("sandbox", sb.ID).Warn("removing the socket of an interrupted start")
		}
	}
	c.mu.Lock()
	c.sandboxes[sb.ID] = e
	c.mu.Unlock()
	if err := tasks.Recover(ctx); err != nil {
		log.G(ctx).WithError(err).WithField("sandbox", sb.ID).Error("recovering containers")
	}
	if err := c.save(e); err != nil {
		log.G(ctx).WithError(err).WithField("sandbox", sb.ID).Warn("saving sandbox record")
	}
	result := metrics.Recovered
	if e.lost {
		result = metrics.Lost
	}
	c.metrics.SandboxRecovered(handler, result)
	log.G(ctx).WithField("sandbox", sb.ID).WithField("state", e.state).Info("recovered sandbox")
	return nil
}

// readRecord reads a sandbox's record from its directory.
func readRecord(dir string) (*record, error) {
	b, err := os.ReadFile(filepath.Join(dir, recordFile))
	if errors.Is(err, os.ErrNotExist) {
		return nil, errNotRecorded
	}
	if err != nil {
		return nil, err
	}
	var r record
	if err := json.Unmarshal(b, &r); err != nil || r.Sandbox == nil {
		return nil, fmt.Errorf("decoding sandbox record: %v", err)
	}
	r.Sandbox.Config = &runtime.PodSandboxConfig{}
	if err := proto.Unmarshal(r.Config, r.Sandbox.Config); err != nil {
		return nil, fmt.Errorf("decoding pod config: %w", err)
	}
	return &r, nil
}

// lostStatus is the exit status of a sandbox that could not be recovered.
const lostStatus = 255

// lostInstance stands for a sandbox whose kind could not recover it:
// nothing of it runs any more; it can only be stopped and removed.
type lostInstance struct {
	reason string
}

func (l *lostInstance) Start(context.Context) error {
	return fmt.Errorf("sandbox was lost at a restart (%s): %w", l.reason, errdefs.ErrFailedPrecondition)
}
func (l *lostInstance) Runtime() task.Runtime          { return lostRuntime{reason: l.reason} }
func (l *lostInstance) Stop(context.Context) error     { return nil }
func (l *lostInstance) Shutdown(context.Context) error { return nil }
func (l *lostInstance) Info() map[string]any           { return map[string]any{"lost": l.reason} }
func (l *lostInstance) Metrics(context.Context) (*types.Metric, error) {
	return nil, fmt.Errorf("sandbox was lost at a restart: %w", errdefs.ErrNotFound)
}

// lostRuntime is the Runtime of a lost sandbox: its containers are
// reported exited at recovery and can only be deleted.
type lostRuntime struct {
	reason string
}

func (l lostRuntime) err() error {
	return fmt.Errorf("sandbox was lost at a restart (%s): %w", l.reason, errdefs.ErrNotFound)
}

func (l lostRuntime) Create(context.Context, *task.Container) error { return l.err() }
func (l lostRuntime) Start(context.Context, *task.Process) error    { return l.err() }
func (l lostRuntime) Exec(context.Context, *task.Process) error     { return l.err() }
func (l lostRuntime) Kill(context.Context, *task.Process, unix.Signal, bool) error {
	return l.err()
}
func (l lostRuntime) Delete(context.Context, *task.Process) error { return nil }
func (l lostRuntime) Pids(context.Context, *task.Container) ([]*tasktypes.ProcessInfo, error) {
	return nil, l.err()
}
func (l lostRuntime) ResizePty(context.Context, *task.Process, uint32, uint32) error { return l.err() }
func (l lostRuntime) CloseIO(context.Context, *task.Process) error                   { return l.err() }
func (l lostRuntime) Update(context.Context, *task.Container, *specs.LinuxResources, map[string]string) error {
	return l.err()
}
func (l lostRuntime) Stats(context.Context, *task.Container) (typeurl.Any, error) {
	return nil, l.err()
}
func (l lostRuntime) Pause(context.Context, *task.Container) error   { return l.err() }
func (l lostRuntime) Resume(context.Context, *task.Container) error  { return l.err() }
func (l lostRuntime) Recover(context.Context, *task.Container) error { return task.ErrNotRecoverable }
