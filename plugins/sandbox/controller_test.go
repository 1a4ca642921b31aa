package sandbox

import (
	"context"
	"encoding/json"
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/containerd/containerd/api/types"
	"github.com/containerd/containerd/v2/core/events"
	"github.com/containerd/containerd/v2/core/sandbox"
	"github.com/containerd/containerd/v2/pkg/namespaces"
	"github.com/containerd/errdefs"
	"golang.org/x/sys/unix"
	runtime "k8s.io/cri-api/pkg/apis/runtime/v1"

	"github.com/kuasar-io/containerd-kuasar/plugins/task"
)

type fakeKind struct {
	failCreate error
	failStart  error
	created    []*Sandbox
	recovered  []string
	instances  []*fakeInstance
}

func (k *fakeKind) Create(ctx context.Context, sb *Sandbox) (Instance, error) {
	if k.failCreate != nil {
		return nil, k.failCreate
	}
	sb.State = json.RawMessage(`{"hello":"world"}`)
	k.created = append(k.created, sb)
	i := &fakeInstance{failStart: k.failStart}
	k.instances = append(k.instances, i)
	return i, nil
}

func (k *fakeKind) Recover(ctx context.Context, sb *Sandbox) (Instance, error) {
	if string(sb.State) != `{"hello":"world"}` {
		return nil, errors.New("kind state lost")
	}
	k.recovered = append(k.recovered, sb.ID)
	return &fakeInstance{}, nil
}

type fakeInstance struct {
	started, stopped, shutdown int
	failStart                  error
}

func (i *fakeInstance) Start(context.Context) error    { i.started++; return i.failStart }
func (i *fakeInstance) Runtime() task.Runtime          { return nil }
func (i *fakeInstance) Stop(context.Context) error     { i.stopped++; return nil }
func (i *fakeInstance) Shutdown(context.Context) error { i.shutdown++; return nil }
func (i *fakeInstance) Metrics(context.Context) (*types.Metric, error) {
	return &types.Metric{ID: "x"}, nil
}
func (i *fakeInstance) Info() map[string]any { return map[string]any{"fake": true} }

type nopPublisher struct{}

func (nopPublisher) Publish(context.Context, string, events.Event) error { return nil }

func testPaths(t *testing.T) Paths {
	d := t.TempDir()
	return Paths{State: filepath.Join(d, "sb"), Sockets: filepath.Join(d, "s")}
}

func nsCtx() context.Context { return namespaces.WithNamespace(context.Background(), "k8s.io") }

func createStart(t *testing.T, c *Controller, id string) sandbox.ControllerInstance {
	t.Helper()
	cfg := &runtime.PodSandboxConfig{Hostname: "h-" + id}
	if err := c.Create(nsCtx(), sandbox.Sandbox{ID: id}, sandbox.WithOptions(cfg), sandbox.WithNetNSPath("/var/run/netns/x")); err != nil {
		t.Fatal(err)
	}
	ci, err := c.Start(nsCtx(), id)
	if err != nil {
		t.Fatal(err)
	}
	return ci
}

func TestControllerLifecycle(t *testing.T) {
	k := &fakeKind{}
	paths := testPaths(t)
	c := NewController("kuasar-test", k, paths, nopPublisher{})
	ci := createStart(t, c, "sb1")
	if ci.Version != 3 || !strings.HasPrefix(ci.Address, "ttrpc+unix:///") {
		t.Fatalf("endpoint %q v%d", ci.Address, ci.Version)
	}
	sock := strings.TrimPrefix(ci.Address, "ttrpc+unix://")
	if conn, err := net.Dial("unix", sock); err != nil {
		t.Fatalf("task endpoint not listening: %v", err)
	} else {
		conn.Close()
	}
	if k.created[0].Config.GetHostname() != "h-sb1" || k.created[0].NetNSPath != "/var/run/netns/x" {
		t.Fatalf("kind got %+v", k.created[0])
	}
	if err := c.Create(nsCtx(), sandbox.Sandbox{ID: "sb1"}); !errors.Is(err, errdefs.ErrAlreadyExists) {
		t.Fatalf("duplicate create: %v", err)
	}
	st, err := c.Status(nsCtx(), "sb1", true)
	if err != nil || st.State != "SANDBOX_READY" || st.Address != ci.Address {
		t.Fatalf("status %+v %v", st, err)
	}
	var info map[string]any
	if err := json.Unmarshal([]byte(st.Info[InfoKey]), &info); err != nil || info["fake"] != true {
		t.Fatalf("info %q: %v", st.Info[InfoKey], err)
	}
	// What CRI keeps of "info" (its podsandbox SandboxInfo schema).
	var cri struct {
		Pid     int    `json:"pid"`
		Status  string `json:"processStatus"`
		Runtime string `json:"runtimeType"`
	}
	if err := json.Unmarshal([]byte(st.Info["info"]), &cri); err != nil || cri.Status != "running" || cri.Runtime == "" {
		t.Fatalf("CRI's info %q: %v", st.Info["info"], err)
	}

	waited := make(chan sandbox.ExitStatus, 1)
	go func() {
		es, _ := c.Wait(nsCtx(), "sb1")
		waited <- es
	}()
	select {
	case <-waited:
		t.Fatal("Wait returned while the sandbox runs")
	case <-time.After(50 * time.Millisecond):
	}
	if err := c.Stop(nsCtx(), "sb1"); err != nil {
		t.Fatal(err)
	}
	select {
	case es := <-waited:
		if es.ExitedAt.IsZero() {
			t.Fatal("no exit time")
		}
	case <-time.After(2 * time.Second):
		t.Fatal("Wait did not return after Stop")
	}
	if st, _ := c.Status(nsCtx(), "sb1", false); st.State != "SANDBOX_NOTREADY" {
		t.Fatalf("state after stop %q", st.State)
	}
	if err := c.Stop(nsCtx(), "sb1"); err != nil {
		t.Fatalf("second stop: %v", err)
	}
	if err := c.Shutdown(nsCtx(), "sb1"); err != nil {
		t.Fatal(err)
	}
	if k.instances[0].stopped != 1 || k.instances[0].shutdown != 1 {
		t.Fatalf("instance %+v", k.instances[0])
	}
	if _, err := os.Stat(filepath.Join(paths.State, "sb1")); !os.IsNotExist(err) {
		t.Fatal("sandbox dir left after shutdown")
	}
	if _, err := os.Stat(sock); !os.IsNotExist(err) {
		t.Fatal("socket left after shutdown")
	}
	if _, err := c.Status(nsCtx(), "sb1", false); !errors.Is(err, errdefs.ErrNotFound) {
		t.Fatalf("status after shutdown: %v", err)
	}
}

func TestControllerCreateFailureLeavesNothing(t *testing.T) {
	k := &fakeKind{failCreate: errors.New("no kvm")}
	paths := testPaths(t)
	c := NewController("kuasar-test", k, paths, nopPublisher{})
	if err := c.Create(nsCtx(), sandbox.Sandbox{ID: "sb1"}); err == nil || !strings.Contains(err.Error(), "no kvm") {
		t.Fatalf("create: %v", err)
	}
	entries, _ := os.ReadDir(paths.State)
	if len(entries) != 0 {
		t.Fatalf("left %v", entries)
	}
	if err := c.Create(nsCtx(), sandbox.Sandbox{ID: "../x"}); err == nil {
		t.Fatal("bad sandbox id accepted")
	}
	if _, err := c.Start(nsCtx(), "sb1"); !errors.Is(err, errdefs.ErrNotFound) {
		t.Fatalf("start of a failed sandbox: %v", err)
	}
}

// CRI never shuts down a sandbox whose Start failed: the controller
// undoes it.
func TestControllerStartFailureLeavesNothing(t *testing.T) {
	k := &fakeKind{failStart: errors.New("the VM did not come up")}
	paths := testPaths(t)
	c := NewController("kuasar-test", k, paths, nopPublisher{})
	if err := c.Create(nsCtx(), sandbox.Sandbox{ID: "sb1"}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Start(nsCtx(), "sb1"); err == nil || !strings.Contains(err.Error(), "did not come up") {
		t.Fatalf("start: %v", err)
	}
	if entries, _ := os.ReadDir(paths.State); len(entries) != 0 {
		t.Errorf("left %v", entries)
	}
	if entries, _ := os.ReadDir(paths.Sockets); len(entries) != 0 {
		t.Errorf("sockets left: %v", entries)
	}
	if k.instances[0].shutdown != 1 {
		t.Errorf("the instance was shut down %d times", k.instances[0].shutdown)
	}
	if _, err := c.Status(nsCtx(), "sb1", false); !errors.Is(err, errdefs.ErrNotFound) {
		t.Errorf("status of a sandbox that failed to start: %v", err)
	}
	// The ID can be used again.
	k.failStart = nil
	createStart(t, c, "sb1")
}

func TestSandboxEndingOnItsOwn(t *testing.T) {
	k := &fakeKind{}
	c := NewController("kuasar-test", k, testPaths(t), nopPublisher{})
	createStart(t, c, "sb1")
	k.created[0].Exited(3)
	ctx, cancel := context.WithTimeout(nsCtx(), 2*time.Second)
	defer cancel()
	es, err := c.Wait(ctx, "sb1")
	if err != nil || es.ExitStatus != 3 {
		t.Fatalf("wait: %+v %v", es, err)
	}
}

func TestControllerRecover(t *testing.T) {
	k := &fakeKind{}
	paths := testPaths(t)
	c := NewController("kuasar-test", k, paths, nopPublisher{})
	ci := createStart(t, c, "ready")
	createStart(t, c, "stopped")
	if err := c.Stop(nsCtx(), "stopped"); err != nil {
		t.Fatal(err)
	}
	// A directory a crash left without a record.
	if err := os.MkdirAll(filepath.Join(paths.State, "halfmade"), 0o700); err != nil {
		t.Fatal(err)
	}
	// The daemon dies: its endpoints go with it.
	for _, id := range []string{"ready", "stopped"} {
		e, _ := c.get(id)
		e.endpoint.Close()
	}

	k2 := &fakeKind{}
	c2 := NewController("kuasar-test", k2, paths, nopPublisher{})
	if err := c2.Recover(nsCtx()); err != nil {
		t.Fatal(err)
	}
	if len(k2.recovered) != 2 {
		t.Fatalf("recovered %v", k2.recovered)
	}
	st, err := c2.Status(nsCtx(), "ready", false)
	if err != nil || st.State != "SANDBOX_READY" || st.Address != ci.Address {
		t.Fatalf("recovered ready: %+v %v", st, err)
	}
	conn, err := net.Dial("unix", strings.TrimPrefix(st.Address, "ttrpc+unix://"))
	if err != nil {
		t.Fatalf("recovered endpoint not listening: %v", err)
	}
	conn.Close()
	if st, _ := c2.Status(nsCtx(), "stopped", false); st.State != "SANDBOX_NOTREADY" {
		t.Fatalf("recovered stopped: %q", st.State)
	}
	ctx, cancel := context.WithTimeout(nsCtx(), time.Second)
	defer cancel()
	if _, err := c2.Wait(ctx, "stopped"); err != nil {
		t.Fatalf("wait on a recovered stopped sandbox: %v", err)
	}
	if _, err := os.Stat(filepath.Join(paths.State, "halfmade")); !os.IsNotExist(err) {
		t.Fatal("record-less dir not cleaned")
	}
	for _, id := range []string{"ready", "stopped"} {
		if err := c2.Shutdown(nsCtx(), id); err != nil {
			t.Fatal(err)
		}
	}
}

// mountTmpfs mounts a tmpfs at dir (the tests run as root, as the daemon).
func mountTmpfs(t *testing.T, dir string) {
	t.Helper()
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount("tmpfs", dir, "tmpfs", 0, ""); err != nil {
		t.Fatalf("mounting a tmpfs (the tests need root): %v", err)
	}
	t.Cleanup(func() { _ = unix.Unmount(dir, unix.MNT_DETACH) })
}

func isMounted(t *testing.T, dir string) bool {
	t.Helper()
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	return strings.Contains(string(b), " "+dir+" ")
}

// A directory left by a create a crash interrupted, with a mount in it (a
// pinned namespace, a /dev/shm), is unmounted and removed at recovery.
func TestRecoverRemovesUnrecordedMounts(t *testing.T) {
	paths := testPaths(t)
	shm := filepath.Join(paths.State, "halfmade", "shm")
	mountTmpfs(t, shm)
	c := NewController("kuasar-test", &fakeKind{}, paths, nopPublisher{})
	if err := c.Recover(nsCtx()); err != nil {
		t.Fatal(err)
	}
	if isMounted(t, shm) {
		t.Fatal("the mount of an unrecorded sandbox is left")
	}
	if _, err := os.Stat(filepath.Join(paths.State, "halfmade")); !os.IsNotExist(err) {
		t.Fatalf("unrecorded sandbox dir left: %v", err)
	}
}

// A sandbox its kind cannot recover is reported ended, its mounts are
// released, and it can be removed.
func TestRecoverFailureReleasesSandbox(t *testing.T) {
	paths := testPaths(t)
	c := NewController("kuasar-test", &fakeKind{}, paths, nopPublisher{})
	createStart(t, c, "doomed")
	e, _ := c.get("doomed")
	e.endpoint.Close()
	shm := filepath.Join(e.sb.Dir, "shm")
	mountTmpfs(t, shm)
	// The next daemon's kind cannot take it back.
	var rec record
	b, _ := os.ReadFile(filepath.Join(e.sb.Dir, recordFile))
	json.Unmarshal(b, &rec)
	rec.Sandbox.State = json.RawMessage(`{"garbled":true}`)
	b, _ = json.Marshal(&rec)
	os.WriteFile(filepath.Join(e.sb.Dir, recordFile), b, 0o600)

	c2 := NewController("kuasar-test", &fakeKind{}, paths, nopPublisher{})
	if err := c2.Recover(nsCtx()); err != nil {
		t.Fatal(err)
	}
	st, err := c2.Status(nsCtx(), "doomed", false)
	if err != nil || st.State != "SANDBOX_NOTREADY" {
		t.Fatalf("unrecoverable sandbox: %+v %v", st, err)
	}
	if isMounted(t, shm) {
		t.Fatal("an unrecoverable sandbox keeps its mounts")
	}
	ctx, cancel := context.WithTimeout(nsCtx(), time.Second)
	defer cancel()
	if es, err := c2.Wait(ctx, "doomed"); err != nil || es.ExitStatus != lostStatus {
		t.Fatalf("wait: %+v %v", es, err)
	}
	if err := c2.Stop(nsCtx(), "doomed"); err != nil {
		t.Fatal(err)
	}
	if err := c2.Shutdown(nsCtx(), "doomed"); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(e.sb.Dir); !os.IsNotExist(err) {
		t.Fatalf("sandbox dir left: %v", err)
	}
}

// exitingKind recovers a sandbox that ended while the daemon was down: its
// Recover reports the exit (as kuasar-runc's holder watch does) before it
// returns.
type exitingKind struct{ fakeKind }

func (k *exitingKind) Recover(ctx context.Context, sb *Sandbox) (Instance, error) {
	sb.Exited(137)
	time.Sleep(time.Millisecond) // the acknowledgement to the keeper
	return &fakeInstance{}, nil
}

// A sandbox that ended while the daemon was down is recovered ended, once,
// and stays ended across later restarts (it once panicked closing its
// exit twice, at every start).
func TestRecoverSandboxEndedWhileDown(t *testing.T) {
	paths := testPaths(t)
	c := NewController("kuasar-test", &fakeKind{}, paths, nopPublisher{})
	createStart(t, c, "sb1")
	e, _ := c.get("sb1")
	e.endpoint.Close()
	for restart := 0; restart < 2; restart++ {
		c2 := NewController("kuasar-test", &exitingKind{}, paths, nopPublisher{})
		if err := c2.Recover(nsCtx()); err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(nsCtx(), 5*time.Second)
		es, err := c2.Wait(ctx, "sb1")
		cancel()
		if err != nil || es.ExitStatus != 137 {
			t.Fatalf("restart %d: wait %+v %v, want 137", restart, es, err)
		}
		if st, _ := c2.Status(nsCtx(), "sb1", false); st.State != "SANDBOX_NOTREADY" {
			t.Fatalf("restart %d: %s", restart, st.State)
		}
		c2.mu.Lock()
		for _, e := range c2.sandboxes {
			if e.endpoint != nil {
				e.endpoint.Close()
			}
		}
		c2.mu.Unlock()
	}
}

// A Start killed after it made the task endpoint but before it recorded the
// sandbox started leaves a socket: recovery removes it (nothing else would).
func TestRecoverRemovesSocketOfInterruptedStart(t *testing.T) {
	paths := testPaths(t)
	c := NewController("kuasar-test", &fakeKind{}, paths, nopPublisher{})
	if err := c.Create(nsCtx(), sandbox.Sandbox{ID: "half"}, sandbox.WithOptions(&runtime.PodSandboxConfig{}), sandbox.WithNetNSPath("/var/run/netns/x")); err != nil {
		t.Fatal(err)
	}
	sock := c.socketPath("k8s.io", "half")
	if err := os.MkdirAll(filepath.Dir(sock), 0o700); err != nil {
		t.Fatal(err)
	}
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	l.(*net.UnixListener).SetUnlinkOnClose(false)
	l.Close()

	c2 := NewController("kuasar-test", &fakeKind{}, paths, nopPublisher{})
	if err := c2.Recover(nsCtx()); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(sock); !os.IsNotExist(err) {
		t.Fatalf("the socket of an interrupted start is left: %v", err)
	}
}
