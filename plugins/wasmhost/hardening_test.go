package wasmhost

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"regexp"
	"strconv"
	"sync/atomic"
	"testing"
	"time"

	"github.com/containerd/errdefs"
	"github.com/tetratelabs/wazero"
	"golang.org/x/sys/unix"

	"github.com/kuasar-io/containerd-kuasar/plugins/wasmhost/api"
)

// eventually waits for cond, up to a ceiling only a hang reaches.
func eventually(t *testing.T, what string, ceiling time.Duration, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(ceiling); !cond(); time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("still not %s", what)
		}
	}
}

// TestCreateAbandoned: a create whose deadline passes returns then, and the
// host undoes the container at once, without waiting for what it was
// waiting for (here, the compile of its module). The compile, which cannot
// be interrupted, goes on and is kept for the next attempt.
func TestCreateAbandoned(t *testing.T) {
	f := newFixture(t)
	proceed := make(chan struct{})
	var compiles atomic.Int32
	compile := f.h.engine.compileFn
	f.h.engine.compileFn = func(ctx context.Context, code []byte) (wazero.CompiledModule, error) {
		compiles.Add(1)
		<-proceed
		return compile(context.Background(), code)
	}
	req, _ := f.request(nil, "sleep")
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	_, err := f.h.Create(ctx, req)
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("create past its deadline: %v", err)
	}
	eventually(t, "undone", 20*time.Second, func() bool { return f.h.HostStats().GetContainers() == 0 })
	if _, err := f.h.State(&api.ProcessRef{Id: req.GetId()}); !errdefs.IsNotFound(err) {
		t.Fatalf("the abandoned container: %v, want not found", err)
	}
	if n := f.h.HostStats().GetCompiling(); n != 1 {
		t.Fatalf("%d modules compiling, want the abandoned one's", n)
	}
	close(proceed)
	eventually(t, "compiled", 3*time.Minute, func() bool { // compiling the Go test module takes a while
		s := f.h.HostStats()
		return s.GetCompiling() == 0 && s.GetModules() == 1
	})
	// The next attempt finds it compiled.
	if e, out := f.run(nil, "echo", "after"); e.GetStatus() != 0 {
		t.Fatalf("the next container: %+v %s", e, out)
	}
	if n := compiles.Load(); n != 1 {
		t.Fatalf("the module was compiled %d times", n)
	}
}

// TestListenCredentials: a module's listening sockets are bound with its
// container's credentials: a port below 1024 (here on the host's network,
// where ip_unprivileged_port_start is 1024) needs root with
// CAP_NET_BIND_SERVICE, as it would for a process.
func TestListenCredentials(t *testing.T) {
	f := newFixture(t)
	tests := []struct {
		name   string
		port   int
		user   *api.User
		caps   *api.Capabilities
		denied bool
	}{
		{name: "non-root, privileged port", port: 1013, user: &api.User{Uid: 1000, Gid: 1000}, denied: true},
		{name: "root without CAP_NET_BIND_SERVICE", port: 1013, caps: &api.Capabilities{Bounding: []string{"CAP_CHOWN"}, Effective: []string{"CAP_CHOWN"}}, denied: true},
		{name: "root", port: 1013},
		{name: "non-root, unprivileged port", port: 18933, user: &api.User{Uid: 1000, Gid: 1000}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			req, _, err := f.create(func(r *api.CreateRequest) {
				r.Listen = []string{"127.0.0.1:" + strconv.Itoa(tt.port)}
				r.Process.User, r.Process.Capabilities = tt.user, tt.caps
			}, "sleep")
			if tt.denied {
				if !errdefs.IsPermissionDenied(err) {
					t.Fatalf("create: %v, want permission denied", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if _, err := f.h.Delete(&api.ProcessRef{Id: req.GetId()}); err != nil {
				t.Fatal(err)
			}
		})
	}
}

// TestOpenFileBudget: the files all modules hold open together stay
// within the host's budget, whatever each may hold on its own; they are
// given back as the modules end.
func TestOpenFileBudget(t *testing.T) {
	const budget = 40
	f := newFixtureWith(t, Options{MaxOpenFiles: budget})
	opened := regexp.MustCompile(`opened (\d+) of`)
	var refs []*api.ProcessRef
	var got []int
	for i := 0; i < 2; i++ {
		req, out, err := f.create(nil, "open", "30", "/app/app.wasm")
		if err != nil {
			t.Fatal(err)
		}
		ref := &api.ProcessRef{Id: req.GetId()}
		if _, err := f.h.Start(ref); err != nil {
			t.Fatal(err)
		}
		refs = append(refs, ref)
		m := opened.FindStringSubmatch(f.waitOutput(out, "opened"))
		n, _ := strconv.Atoi(m[1])
		got = append(got, n)
	}
	if got[0] != 30 || got[1] >= 30 {
		t.Errorf("two modules opening 30 files each with a budget of %d opened %v", budget, got)
	}
	if n := f.h.HostStats().GetOpenFiles(); n > budget {
		t.Errorf("%d files open, over the budget of %d", n, budget)
	}
	for _, ref := range refs {
		if err := f.h.Kill(&api.KillRequest{Ref: ref, Signal: int32(unix.SIGKILL)}); err != nil {
			t.Fatal(err)
		}
		if _, err := f.h.Wait(context.Background(), ref); err != nil {
			t.Fatal(err)
		}
		if _, err := f.h.Delete(ref); err != nil {
			t.Fatal(err)
		}
	}
	if n := f.h.HostStats().GetOpenFiles(); n != 0 {
		t.Errorf("%d files still counted once every module ended", n)
	}
}

// TestClientHostGone: when the host goes, a client's wait ends at once
// with ErrHostGone, and calls about its processes fail so without reaching
// any host, even once a new host serves the socket.
func TestClientHostGone(t *testing.T) {
	f := newFixture(t)
	sock := filepath.Join(t.TempDir(), "host.sock")
	l, err := Listen(sock)
	if err != nil {
		t.Fatal(err)
	}
	ctx, stop := context.WithCancel(context.Background())
	served := make(chan error, 1)
	go func() { served <- f.h.Serve(ctx, l) }()
	c := NewClient(Launch{Socket: sock})
	defer c.Close()
	req, _ := f.request(nil, "sleep")
	st, err := c.Create(context.Background(), req)
	if err != nil {
		t.Fatal(err)
	}
	ref := &api.ProcessRef{Id: req.GetId(), Boot: st.GetBoot()}
	if st.GetBoot() != f.h.Boot() {
		t.Fatalf("created by boot %q, the host is %q", st.GetBoot(), f.h.Boot())
	}
	if _, err := c.Start(context.Background(), ref); err != nil {
		t.Fatal(err)
	}
	waited := make(chan error, 1)
	go func() {
		_, err := c.Wait(context.Background(), ref)
		waited <- err
	}()

	stop() // the host stops serving: its connections close, as at its death
	if err := <-served; err != nil {
		t.Fatal(err)
	}
	l.Close()
	select {
	case err := <-waited:
		if !errors.Is(err, ErrHostGone) {
			t.Fatalf("wait: %v, want ErrHostGone", err)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("the wait did not end when the host went")
	}
	if !c.Gone(st.GetBoot()) {
		t.Fatal("the client does not know the host is gone")
	}

	// A new host on the socket: the old host's processes stay gone.
	h2, err := NewHost(context.Background(), Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer h2.Close(context.Background())
	l2, err := Listen(sock)
	if err != nil {
		t.Fatal(err)
	}
	ctx2, stop2 := context.WithCancel(context.Background())
	go func() { served <- h2.Serve(ctx2, l2) }()
	defer func() { stop2(); <-served; l2.Close() }()
	for name, call := range map[string]func() error{
		"delete": func() error { _, err := c.Delete(context.Background(), ref); return err },
		"kill":   func() error { return c.Kill(context.Background(), ref, int(unix.SIGKILL), true) },
		"state":  func() error { _, err := c.State(context.Background(), ref); return err },
	} {
		if err := call(); !errors.Is(err, ErrHostGone) {
			t.Errorf("%s of a process of the host that is gone: %v, want ErrHostGone", name, err)
		}
	}
	if s, err := c.HostStats(context.Background()); err != nil || c.Boot() != h2.Boot() || s.GetContainers() != 0 {
		t.Fatalf("the new host: %v %v (boot %s, want %s)", s, err, c.Boot(), h2.Boot())
	}
	// The new host refuses refs of the old one, should a client ask.
	if _, err := h2.State(ref); !errdefs.IsNotFound(err) {
		t.Errorf("a host asked about another host's process: %v, want not found", err)
	}
	if err := f.h.Kill(&api.KillRequest{Ref: &api.ProcessRef{Id: req.GetId()}, Signal: int32(unix.SIGKILL)}); err != nil {
		t.Fatal(fmt.Errorf("ending the module of the first host: %w", err))
	}
}
