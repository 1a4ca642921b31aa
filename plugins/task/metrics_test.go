package task

import (
	"context"
	"errors"
	"path/filepath"
	"sync"
	"testing"
	"time"

	taskAPI "github.com/containerd/containerd/api/runtime/task/v3"

	"github.com/kuasar-io/containerd-kuasar/plugins/metrics"
)

type metricsRecorder struct {
	mu        sync.Mutex
	started   []time.Duration
	failed    int
	recovered map[string]int
}

func (m *metricsRecorder) ContainerStarted(d time.Duration) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.started = append(m.started, d)
}

func (m *metricsRecorder) ContainerStartFailed() {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.failed++
}

func (m *metricsRecorder) ContainerRecovered(result string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.recovered == nil {
		m.recovered = map[string]int{}
	}
	m.recovered[result]++
}

// unrecoverable is a runtime that cannot take any container back.
type unrecoverable struct{ fakeRuntime }

func (*unrecoverable) Recover(context.Context, *Container) error { return ErrNotRecoverable }

func TestMetricsOfStartsAndRecoveries(t *testing.T) {
	dir := t.TempDir()
	rt, m := &fakeRuntime{}, &metricsRecorder{}
	s, err := NewService("sb1", "k8s.io", filepath.Join(dir, "tasks"), rt, &recorder{}, nil, WithMetrics(m))
	if err != nil {
		t.Fatal(err)
	}
	ctx := nsCtx()
	for _, id := range []string{"a", "b"} {
		if _, err := s.Create(ctx, &taskAPI.CreateTaskRequest{ID: id, Bundle: bundle(t, dir, id, validSpec())}); err != nil {
			t.Fatal(err)
		}
		if _, err := s.Start(ctx, &taskAPI.StartRequest{ID: id}); err != nil {
			t.Fatal(err)
		}
	}
	// An exec's start is not a container's.
	if _, err := s.Exec(ctx, &taskAPI.ExecProcessRequest{ID: "a", ExecID: "e1", Spec: procAny(t)}); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Start(ctx, &taskAPI.StartRequest{ID: "a", ExecID: "e1"}); err != nil {
		t.Fatal(err)
	}
	// A failed create and a failed start each count once.
	rt.failNext = errors.New("create fails")
	if _, err := s.Create(ctx, &taskAPI.CreateTaskRequest{ID: "c", Bundle: bundle(t, dir, "c", validSpec())}); err == nil {
		t.Fatal("create did not fail")
	}
	if _, err := s.Create(ctx, &taskAPI.CreateTaskRequest{ID: "d", Bundle: bundle(t, dir, "d", validSpec())}); err != nil {
		t.Fatal(err)
	}
	rt.failNext = errors.New("start fails")
	if _, err := s.Start(ctx, &taskAPI.StartRequest{ID: "d"}); err == nil {
		t.Fatal("start did not fail")
	}
	if len(m.started) != 2 || m.failed != 2 {
		t.Fatalf("started %v, failed %d; want 2 starts, 2 failures", m.started, m.failed)
	}
	for _, d := range m.started {
		if d <= 0 {
			t.Fatalf("start durations %v", m.started)
		}
	}

	// A new daemon that takes every container back, then one that cannot.
	for _, tc := range []struct {
		rt     Runtime
		result string
	}{{&fakeRuntime{}, metrics.Recovered}, {&unrecoverable{}, metrics.Lost}} {
		m2 := &metricsRecorder{}
		s2, err := NewService("sb1", "k8s.io", filepath.Join(dir, "tasks"), tc.rt, &recorder{}, nil, WithMetrics(m2))
		if err != nil {
			t.Fatal(err)
		}
		if err := s2.Recover(ctx); err != nil {
			t.Fatal(err)
		}
		if len(m2.recovered) != 1 || m2.recovered[tc.result] != 3 {
			t.Fatalf("recoveries %v, want 3 %s", m2.recovered, tc.result)
		}
	}
}
