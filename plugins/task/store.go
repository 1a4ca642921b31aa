package task

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"time"

	tasktypes "github.com/containerd/containerd/api/types/task"
	"github.com/containerd/log"

	"github.com/kuasar-io/containerd-kuasar/plugins/internal/fsutil"
	"github.com/kuasar-io/containerd-kuasar/plugins/metrics"
)

// record is what survives a daemon restart of one container. Execs are not
// kept: containerd forgets them across a restart too.
type record struct {
	ID         string          `json:"id"`
	Namespace  string          `json:"namespace"`
	Bundle     string          `json:"bundle"`
	Rootfs     []Mount         `json:"rootfs,omitempty"`
	IO         IO              `json:"io"`
	CreatedAt  time.Time       `json:"createdAt"`
	Pid        int             `json:"pid"`
	Status     string          `json:"status"`
	ExitStatus uint32          `json:"exitStatus,omitempty"`
	ExitedAt   time.Time       `json:"exitedAt,omitzero"`
	State      json.RawMessage `json:"state,omitempty"`
}

func (s *Service) recordPath(id string) string {
	return filepath.Join(s.dir, id+".json")
}

func (s *Service) save(c *Container) error {
	p := c.Init
	p.mu.Lock()
	r := record{
		ID:         c.ID,
		Namespace:  c.Namespace,
		Bundle:     c.Bundle,
		Rootfs:     c.Rootfs,
		IO:         p.IO,
		CreatedAt:  c.CreatedAt,
		Pid:        p.pid,
		Status:     p.status.String(),
		ExitStatus: p.exitStatus,
		ExitedAt:   p.exitedAt,
		State:      c.State,
	}
	p.mu.Unlock()
	b, err := json.Marshal(&r)
	if err != nil {
		return err
	}
	return fsutil.WriteFileAtomic(s.recordPath(c.ID), b, 0o600)
}

// Recover loads the containers recorded by a previous daemon and lets the
// Runtime re-attach to each. A container whose runtime cannot recover it is
// reported as exited (status 255) so that containerd can clean it up.
func (s *Service) Recover(ctx context.Context) error {
	entries, err := os.ReadDir(s.dir)
	if err != nil {
		return err
	}
	for _, e := range entries {
		name := e.Name()
		if e.IsDir() || !strings.HasSuffix(name, ".json") {
			continue
		}
		b, err := os.ReadFile(filepath.Join(s.dir, name))
		if err != nil {
			return err
		}
		var r record
		if err := json.Unmarshal(b, &r); err != nil {
			log.G(ctx).WithError(err).WithField("record", name).Error("dropping unreadable container record")
			_ = os.Remove(filepath.Join(s.dir, name))
			continue
		}
		c := &Container{
			ID:        r.ID,
			Namespace: r.Namespace,
			Bundle:    r.Bundle,
			Rootfs:    r.Rootfs,
			CreatedAt: r.CreatedAt,
			State:     r.State,
			svc:       s,
			execs:     map[string]*Process{},
		}
		if spec, err := loadSpec(r.Bundle); err == nil {
			c.Spec = spec
		}
		p := newProcess(c, "", r.IO)
		p.pid = r.Pid
		p.status = statusFromString(r.Status)
		if p.status == tasktypes.Status_STOPPED {
			p.exitStatus, p.exitedAt = r.ExitStatus, r.ExitedAt
			close(p.exited)
		}
		c.Init = p
		s.mu.Lock()
		s.containers[c.ID] = c
		s.mu.Unlock()
		result := metrics.Recovered
		if err := s.rt.Recover(ctx, c); err != nil {
			log.G(ctx).WithError(err).WithField("container", c.ID).Error("container could not be recovered; reporting it exited")
			p.Exited(255, time.Now())
			result = metrics.Lost
		}
		if s.metrics != nil {
			s.metrics.ContainerRecovered(result)
		}
	}
	return nil
}

func statusFromString(s string) tasktypes.Status {
	if v, ok := tasktypes.Status_value[s]; ok {
		return tasktypes.Status(v)
	}
	return tasktypes.Status_UNKNOWN
}

// ErrNotRecoverable may be returned by Runtime.Recover.
var ErrNotRecoverable = errors.New("container cannot be recovered")
