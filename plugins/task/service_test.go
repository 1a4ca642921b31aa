package task

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"time"

	eventstypes "github.com/containerd/containerd/api/events"
	taskAPI "github.com/containerd/containerd/api/runtime/task/v3"
	tasktypes "github.com/containerd/containerd/api/types/task"
	"github.com/containerd/containerd/v2/core/events"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/errdefs"
	"github.com/containerd/errdefs/pkg/errgrpc"
	"github.com/containerd/typeurl/v2"
	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"
)

// fakeRuntime runs nothing; tests end processes with p.Exited.
type fakeRuntime struct {
	mu        sync.Mutex
	nextPid   int
	calls     []string
	failNext  error
	recovered []string
}

func (f *fakeRuntime) call(name string) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls = append(f.calls, name)
	err := f.failNext
	f.failNext = nil
	return err
}

func (f *fakeRuntime) Create(ctx context.Context, c *Container) error {
	if err := f.call("create"); err != nil {
		return err
	}
	c.State = json.RawMessage(`{"fake":true}`)
	return nil
}
func (f *fakeRuntime) Start(ctx context.Context, p *Process) error {
	if err := f.call("start"); err != nil {
		return err
	}
	f.mu.Lock()
	f.nextPid++
	pid := 1000 + f.nextPid
	f.mu.Unlock()
	p.SetPid(pid)
	return nil
}
func (f *fakeRuntime) Exec(ctx context.Context, p *Process) error { return f.call("exec") }
func (f *fakeRuntime) Kill(ctx context.Context, p *Process, sig unix.Signal, all bool) error {
	return f.call("kill")
}
func (f *fakeRuntime) Delete(ctx context.Context, p *Process) error { return f.call("delete") }
func (f *fakeRuntime) Pids(ctx context.Context, c *Container) ([]*tasktypes.ProcessInfo, error) {
	return []*tasktypes.ProcessInfo{{Pid: uint32(c.Init.Pid())}}, f.call("pids")
}
func (f *fakeRuntime) ResizePty(ctx context.Context, p *Process, w, h uint32) error {
	return f.call("resize")
}
func (f *fakeRuntime) CloseIO(ctx context.Context, p *Process) error { return f.call("closeio") }
func (f *fakeRuntime) Update(ctx context.Context, c *Container, r *specs.LinuxResources, a map[string]string) error {
	return f.call("update")
}
func (f *fakeRuntime) Stats(ctx context.Context, c *Container) (typeurl.Any, error) {
	return nil, errdefs.ErrNotImplemented
}
func (f *fakeRuntime) Pause(ctx context.Context, c *Container) error  { return f.call("pause") }
func (f *fakeRuntime) Resume(ctx context.Context, c *Container) error { return f.call("resume") }
func (f *fakeRuntime) Recover(ctx context.Context, c *Container) error {
	f.mu.Lock()
	f.recovered = append(f.recovered, c.ID)
	f.mu.Unlock()
	return nil
}

// recorder keeps published events.
type recorder struct {
	mu     sync.Mutex
	topics []string
	events []events.Event
}

func (r *recorder) Publish(ctx context.Context, topic string, e events.Event) error {
	if _, err := namespaces.NamespaceRequired(ctx); err != nil {
		return err
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	r.topics = append(r.topics, topic)
	r.events = append(r.events, e)
	return nil
}

func (r *recorder) Topics() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]string(nil), r.topics...)
}

func newTestService(t *testing.T) (*Service, *fakeRuntime, *recorder, string) {
	t.Helper()
	dir := t.TempDir()
	rt, rec := &fakeRuntime{}, &recorder{}
	s, err := NewService("sb1", "k8s.io", filepath.Join(dir, "tasks"), rt, rec, nil)
	if err != nil {
		t.Fatal(err)
	}
	return s, rt, rec, dir
}

func bundle(t *testing.T, dir, id string, spec *specs.Spec) string {
	t.Helper()
	b := filepath.Join(dir, "bundles", id)
	if err := os.MkdirAll(b, 0o700); err != nil {
		t.Fatal(err)
	}
	if spec != nil {
		data, _ := json.Marshal(spec)
		if err := os.WriteFile(filepath.Join(b, "config.json"), data, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	return b
}

func validSpec() *specs.Spec {
	return &specs.Spec{Process: &specs.Process{Args: []string{"sleep", "1"}}, Linux: &specs.Linux{}}
}

func nsCtx() context.Context { return namespaces.WithNamespace(context.Background(), "k8s.io") }

func isKind(err error, kind error) bool {
	return errors.Is(errgrpc.ToNative(err), kind)
}

func TestCreateRejectsBadInput(t *testing.T) {
	s, _, _, dir := newTestService(t)
	tests := []struct {
		name string
		req  *taskAPI.CreateTaskRequest
		kind error
	}{
		{"bad id", &taskAPI.CreateTaskRequest{ID: "../escape", Bundle: bundle(t, dir, "x", validSpec())}, errdefs.ErrInvalidArgument},
		{"relative bundle", &taskAPI.CreateTaskRequest{ID: "c1", Bundle: "relative/path"}, errdefs.ErrInvalidArgument},
		{"no config.json", &taskAPI.CreateTaskRequest{ID: "c2", Bundle: bundle(t, dir, "empty", nil)}, errdefs.ErrNotFound},
		{"no process", &taskAPI.CreateTaskRequest{ID: "c3", Bundle: bundle(t, dir, "noproc", &specs.Spec{})}, errdefs.ErrInvalidArgument},
		{"checkpoint", &taskAPI.CreateTaskRequest{ID: "c4", Bundle: bundle(t, dir, "ck", validSpec()), Checkpoint: "/x"}, errdefs.ErrNotImplemented},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := s.Create(nsCtx(), tt.req)
			if err == nil {
				t.Fatal("expected an error")
			}
			if tt.kind == errdefs.ErrNotFound {
				return // a plain os error through gRPC
			}
			if !isKind(err, tt.kind) {
				t.Fatalf("error %v is not %v", err, tt.kind)
			}
		})
	}
	if len(s.Containers()) != 0 {
		t.Fatal("failed creates left containers")
	}
}

func TestLifecycleAndEvents(t *testing.T) {
	s, rt, rec, dir := newTestService(t)
	ctx := nsCtx()
	b := bundle(t, dir, "c1", validSpec())
	if _, err := s.Create(ctx, &taskAPI.CreateTaskRequest{ID: "c1", Bundle: b, Stdout: "/fifo/out"}); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Create(ctx, &taskAPI.CreateTaskRequest{ID: "c1", Bundle: b}); !isKind(err, errdefs.ErrAlreadyExists) {
		t.Fatalf("duplicate create: %v", err)
	}
	st, _ := s.State(ctx, &taskAPI.StateRequest{ID: "c1"})
	if st.Status != tasktypes.Status_CREATED || st.Stdout != "/fifo/out" {
		t.Fatalf("state after create: %v", st)
	}
	if _, err := s.Exec(ctx, &taskAPI.ExecProcessRequest{ID: "c1", ExecID: "e1", Spec: procAny(t)}); !isKind(err, errdefs.ErrFailedPrecondition) {
		t.Fatalf("exec before start: %v", err)
	}
	resp, err := s.Start(ctx, &taskAPI.StartRequest{ID: "c1"})
	if err != nil || resp.Pid == 0 {
		t.Fatalf("start: %v %v", resp, err)
	}
	if _, err := s.Start(ctx, &taskAPI.StartRequest{ID: "c1"}); !isKind(err, errdefs.ErrFailedPrecondition) {
		t.Fatalf("second start: %v", err)
	}
	if _, err := s.Delete(ctx, &taskAPI.DeleteRequest{ID: "c1"}); !isKind(err, errdefs.ErrFailedPrecondition) {
		t.Fatalf("delete while running: %v", err)
	}

	// An exec: added, started, exits on its own.
	if _, err := s.Exec(ctx, &taskAPI.ExecProcessRequest{ID: "c1", ExecID: "e1", Spec: procAny(t)}); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Exec(ctx, &taskAPI.ExecProcessRequest{ID: "c1", ExecID: "e1", Spec: procAny(t)}); !isKind(err, errdefs.ErrAlreadyExists) {
		t.Fatalf("duplicate exec: %v", err)
	}
	if _, err := s.Start(ctx, &taskAPI.StartRequest{ID: "c1", ExecID: "e1"}); err != nil {
		t.Fatal(err)
	}
	c, _ := s.container("c1")
	e1, _ := c.Process("e1")
	e1.Exited(5, time.Now())
	w, err := s.Wait(ctx, &taskAPI.WaitRequest{ID: "c1", ExecID: "e1"})
	if err != nil || w.ExitStatus != 5 {
		t.Fatalf("wait exec: %v %v", w, err)
	}
	if _, err := s.Delete(ctx, &taskAPI.DeleteRequest{ID: "c1", ExecID: "e1"}); err != nil {
		t.Fatal(err)
	}

	// A Wait blocked on the init returns when it exits, OOM first.
	waited := make(chan *taskAPI.WaitResponse, 1)
	go func() {
		r, _ := s.Wait(ctx, &taskAPI.WaitRequest{ID: "c1"})
		waited <- r
	}()
	time.Sleep(20 * time.Millisecond)
	c.OOM()
	c.OOM()
	c.Init.Exited(137, time.Now())
	c.Init.Exited(1, time.Now()) // ignored: a process ends once
	select {
	case r := <-waited:
		if r.ExitStatus != 137 {
			t.Fatalf("wait init: %v", r)
		}
	case <-time.After(2 * time.Second):
		t.Fatal("Wait did not return on exit")
	}
	if _, err := s.Kill(ctx, &taskAPI.KillRequest{ID: "c1", Signal: 9}); !isKind(err, errdefs.ErrNotFound) {
		t.Fatalf("kill after exit: %v", err)
	}
	d, err := s.Delete(ctx, &taskAPI.DeleteRequest{ID: "c1"})
	if err != nil || d.ExitStatus != 137 {
		t.Fatalf("delete: %v %v", d, err)
	}
	if _, err := os.Stat(filepath.Join(dir, "tasks", "c1.json")); !os.IsNotExist(err) {
		t.Fatal("record left after delete")
	}
	want := []string{"/tasks/create", "/tasks/start", "/tasks/exec-added", "/tasks/exec-started", "/tasks/exit", "/tasks/oom", "/tasks/exit", "/tasks/delete"}
	got := rec.Topics()
	if len(got) != len(want) {
		t.Fatalf("events %v, want %v", got, want)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Fatalf("events %v, want %v", got, want)
		}
	}
	if ex := rec.events[4].(*eventstypes.TaskExit); ex.ID != "e1" || ex.ExitStatus != 5 {
		t.Fatalf("exec exit event %+v", ex)
	}
	_ = rt
}

func procAny(t *testing.T) *anyProto {
	t.Helper()
	b, _ := json.Marshal(&specs.Process{Args: []string{"true"}})
	return &anyProto{TypeUrl: "types.containerd.io/opencontainers/runtime-spec/1/Process", Value: b}
}

func TestWaitHonoursContext(t *testing.T) {
	s, _, _, dir := newTestService(t)
	if _, err := s.Create(nsCtx(), &taskAPI.CreateTaskRequest{ID: "c1", Bundle: bundle(t, dir, "c1", validSpec())}); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(nsCtx(), 50*time.Millisecond)
	defer cancel()
	if _, err := s.Wait(ctx, &taskAPI.WaitRequest{ID: "c1"}); err == nil {
		t.Fatal("Wait returned for a process that did not exit")
	}
}

func TestFailedRuntimeCreateLeavesNothing(t *testing.T) {
	s, rt, rec, dir := newTestService(t)
	rt.failNext = errors.New("boom")
	if _, err := s.Create(nsCtx(), &taskAPI.CreateTaskRequest{ID: "c1", Bundle: bundle(t, dir, "c1", validSpec())}); err == nil {
		t.Fatal("expected the runtime's error")
	}
	entries, _ := os.ReadDir(filepath.Join(dir, "tasks"))
	if len(s.Containers()) != 0 || len(entries) != 0 || len(rec.Topics()) != 0 {
		t.Fatalf("left behind: %d containers, %d records, events %v", len(s.Containers()), len(entries), rec.Topics())
	}
	// The ID is free again.
	if _, err := s.Create(nsCtx(), &taskAPI.CreateTaskRequest{ID: "c1", Bundle: bundle(t, dir, "c1", validSpec())}); err != nil {
		t.Fatal(err)
	}
}

func TestRecover(t *testing.T) {
	s, _, _, dir := newTestService(t)
	ctx := nsCtx()
	for _, id := range []string{"running", "done"} {
		if _, err := s.Create(ctx, &taskAPI.CreateTaskRequest{ID: id, Bundle: bundle(t, dir, id, validSpec()), Stdout: "/out/" + id}); err != nil {
			t.Fatal(err)
		}
		if _, err := s.Start(ctx, &taskAPI.StartRequest{ID: id}); err != nil {
			t.Fatal(err)
		}
	}
	done, _ := s.container("done")
	exitedAt := time.Now().Add(-time.Minute).UTC().Round(time.Millisecond)
	done.Init.Exited(9, exitedAt)

	// A new daemon: a new service on the same records.
	rt2 := &fakeRuntime{}
	s2, err := NewService("sb1", "k8s.io", filepath.Join(dir, "tasks"), rt2, &recorder{}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := s2.Recover(ctx); err != nil {
		t.Fatal(err)
	}
	if len(rt2.recovered) != 2 {
		t.Fatalf("runtime recovered %v", rt2.recovered)
	}
	st, err := s2.State(ctx, &taskAPI.StateRequest{ID: "running"})
	if err != nil || st.Status != tasktypes.Status_RUNNING || st.Stdout != "/out/running" || st.Pid == 0 {
		t.Fatalf("recovered running: %v %v", st, err)
	}
	st, err = s2.State(ctx, &taskAPI.StateRequest{ID: "done"})
	if err != nil || st.Status != tasktypes.Status_STOPPED || st.ExitStatus != 9 || !st.ExitedAt.AsTime().Equal(exitedAt) {
		t.Fatalf("recovered stopped: %v %v", st, err)
	}
	c, _ := s2.container("running")
	if string(c.State) != `{"fake":true}` {
		t.Fatalf("runtime state not kept: %s", c.State)
	}
	w, err := s2.Wait(ctx, &taskAPI.WaitRequest{ID: "done"})
	if err != nil || w.ExitStatus != 9 {
		t.Fatalf("wait on recovered stopped: %v %v", w, err)
	}
}

// The exits of execs are published before their init's, and an exec that
// outlives its init (no PID namespace of its container's own) is killed;
// an exec cannot start once its init is gone.
func TestExecExitsBeforeInit(t *testing.T) {
	for _, ownPID := range []bool{true, false} {
		t.Run(map[bool]string{true: "own pid namespace", false: "shared pid namespace"}[ownPID], func(t *testing.T) {
			s, rt, rec, dir := newTestService(t)
			ctx := nsCtx()
			spec := validSpec()
			if ownPID {
				spec.Linux.Namespaces = []specs.LinuxNamespace{{Type: specs.PIDNamespace}}
			} else {
				spec.Linux.Namespaces = []specs.LinuxNamespace{{Type: specs.PIDNamespace, Path: "/proc/42/ns/pid"}}
			}
			if _, err := s.Create(ctx, &taskAPI.CreateTaskRequest{ID: "c1", Bundle: bundle(t, dir, "c1", spec)}); err != nil {
				t.Fatal(err)
			}
			if _, err := s.Start(ctx, &taskAPI.StartRequest{ID: "c1"}); err != nil {
				t.Fatal(err)
			}
			for _, id := range []string{"e1", "e2"} {
				if _, err := s.Exec(ctx, &taskAPI.ExecProcessRequest{ID: "c1", ExecID: id, Spec: procAny(t)}); err != nil {
					t.Fatal(err)
				}
			}
			if _, err := s.Start(ctx, &taskAPI.StartRequest{ID: "c1", ExecID: "e1"}); err != nil {
				t.Fatal(err)
			}
			c, _ := s.container("c1")
			e1, _ := c.Process("e1")
			rt.mu.Lock()
			rt.calls = nil
			rt.mu.Unlock()
			// The exec ends a moment after its init, as the kernel (or a
			// kill) ends it.
			go func() {
				time.Sleep(50 * time.Millisecond)
				e1.Exited(137, time.Now())
			}()
			c.Init.Exited(0, time.Now())
			var exits []string
			for _, e := range rec.events {
				if x, ok := e.(*eventstypes.TaskExit); ok {
					exits = append(exits, x.ID)
				}
			}
			if len(exits) != 2 || exits[0] != "e1" || exits[1] != "c1" {
				t.Fatalf("exit events %v, want the exec's before the init's", exits)
			}
			rt.mu.Lock()
			killed := slices.Contains(rt.calls, "kill")
			rt.mu.Unlock()
			if killed == ownPID {
				t.Fatalf("exec killed %v with its own pid namespace %v", killed, ownPID)
			}
			if _, err := s.Start(ctx, &taskAPI.StartRequest{ID: "c1", ExecID: "e2"}); !isKind(err, errdefs.ErrFailedPrecondition) {
				t.Fatalf("an exec started after its init exited: %v", err)
			}
		})
	}
}
