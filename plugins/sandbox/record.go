package sandbox

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/containerd/log"
	"google.golang.org/protobuf/proto"
	runtime "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/kuasar-io/containerd-kuasar/plugins/internal/fsutil"
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
// before containerd's task runtime reconnects to the endpoints.
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
			if errors.Is(err, errNotRecorded) {
				// Left by a Create interrupted by a crash: nothing started.
				log.G(ctx).WithField("dir", dir).Warn("removing a sandbox directory without record")
				os.RemoveAll(dir)
				continue
			}
			log.G(ctx).WithError(err).WithField("dir", dir).Error("could not recover sandbox")
		}
	}
	return nil
}

func (c *Controller) recoverOne(ctx context.Context, dir string) error {
	b, err := os.ReadFile(filepath.Join(dir, recordFile))
	if errors.Is(err, os.ErrNotExist) {
		return errNotRecorded
	}
	if err != nil {
		return err
	}
	var r record
	if err := json.Unmarshal(b, &r); err != nil || r.Sandbox == nil {
		return fmt.Errorf("decoding sandbox record: %v", err)
	}
	sb := r.Sandbox
	sb.Config = &runtime.PodSandboxConfig{}
	if err := proto.Unmarshal(r.Config, sb.Config); err != nil {
		return fmt.Errorf("decoding pod config: %w", err)
	}
	e := &entry{sb: sb, state: r.State, exitStatus: r.ExitStatus, exitedAt: r.ExitedAt, exited: make(chan struct{})}
	sb.exit = func(status uint32) { c.exitedOnItsOwn(e, status) }
	if e.state == stateNotReady {
		close(e.exited)
	}
	inst, err := c.kind.Recover(ctx, sb)
	if err != nil {
		return fmt.Errorf("recovering %s sandbox %s: %w", c.id, sb.ID, err)
	}
	tasks, err := task.NewService(sb.ID, sb.Namespace, filepath.Join(sb.Dir, "tasks"), inst.Runtime(), c.publisher)
	if err != nil {
		return err
	}
	e.inst, e.tasks = inst, tasks
	if r.Started {
		ep, err := task.Listen(ctx, c.socketPath(sb.Namespace, sb.ID), tasks)
		if err != nil {
			return err
		}
		e.endpoint = ep
	}
	c.mu.Lock()
	c.sandboxes[sb.ID] = e
	c.mu.Unlock()
	if err := tasks.Recover(ctx); err != nil {
		log.G(ctx).WithError(err).WithField("sandbox", sb.ID).Error("recovering containers")
	}
	log.G(ctx).WithField("sandbox", sb.ID).WithField("state", e.state).Info("recovered sandbox")
	return nil
}
