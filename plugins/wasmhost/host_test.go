package wasmhost

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/containerd/errdefs"
	"golang.org/x/sys/unix"

	"github.com/kuasar-io/containerd-kuasar/plugins/wasmhost/api"
)

// The main goroutine stays on the main thread, so that no container thread
// is ever the main thread (see process.thread).
func init() { runtime.LockOSThread() }

// appModule is the test workload (integration/wasmapp), built once.
var appModule []byte

func TestMain(m *testing.M) {
	if os.Geteuid() == 0 {
		dir, err := os.MkdirTemp("", "wasmapp")
		if err != nil {
			panic(err)
		}
		out := filepath.Join(dir, "app.wasm")
		cmd := exec.Command("go", "build", "-o", out, ".")
		cmd.Dir = "../../integration/wasmapp"
		cmd.Env = append(os.Environ(), "GOOS=wasip1", "GOARCH=wasm")
		if b, err := cmd.CombinedOutput(); err != nil {
			fmt.Fprintf(os.Stderr, "building the wasm test module: %v\n%s", err, b)
			os.Exit(1)
		}
		if appModule, err = os.ReadFile(out); err != nil {
			panic(err)
		}
		os.RemoveAll(dir)
	}
	os.Exit(m.Run())
}

func needRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("skipped: the wasm host makes mount namespaces and needs root")
	}
}

// fixture is a host with a rootfs holding the test module.
type fixture struct {
	t    *testing.T
	h    *Host
	root string
	dir  string
	n    int
}

func newFixture(t *testing.T) *fixture {
	t.Helper()
	return newFixtureWith(t, Options{KeepModules: 2})
}

func newFixtureWith(t *testing.T, o Options) *fixture {
	t.Helper()
	needRoot(t)
	dir := t.TempDir()
	root := filepath.Join(dir, "rootfs")
	for _, d := range []string{"app", "etc", "data"} {
		if err := os.MkdirAll(filepath.Join(root, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(filepath.Join(root, "app/app.wasm"), appModule, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(root, "etc/hostname"), []byte("wasm-pod\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(filepath.Join(root, "data"), 0o777); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(filepath.Join(root, "sealed"), 0o555); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mkfifo(filepath.Join(root, "fifo"), 0o666); err != nil {
		t.Fatal(err)
	}
	// An image may carry device nodes: /dev/zero's here.
	if err := unix.Mknod(filepath.Join(root, "devzero"), unix.S_IFCHR|0o666, int(unix.Mkdev(1, 5))); err != nil {
		t.Fatal(err)
	}
	h, err := NewHost(context.Background(), o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := h.Close(context.Background()); err != nil {
			t.Error(err)
		}
		if m := hostMounts(t, dir); m != "" {
			t.Errorf("mounts left on the host:\n%s", m)
		}
	})
	return &fixture{t: t, h: h, root: root, dir: dir}
}

// hostMounts lists the host's mounts under dir.
func hostMounts(t *testing.T, dir string) string {
	b, err := os.ReadFile("/proc/self/mounts")
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Fields(line); len(f) > 1 && strings.HasPrefix(f[1], dir) {
			out = append(out, line)
		}
	}
	return strings.Join(out, "\n")
}

// request is a container running the app with args, with mutate applied,
// and the path of its output file.
func (f *fixture) request(mutate func(*api.CreateRequest), args ...string) (*api.CreateRequest, string) {
	f.n++
	out := filepath.Join(f.dir, fmt.Sprintf("out-%d", f.n))
	req := &api.CreateRequest{
		Id:        f.lastID(),
		Pod:       "pod",
		RootfsDir: f.root,
		Limits:    &api.Limits{},
		Process: &api.Process{
			Args:  append([]string{"/app/app.wasm"}, args...),
			Env:   []string{"FOO=bar"},
			Stdio: &api.Stdio{Stdout: "file://" + out, Stderr: "file://" + out},
		},
	}
	if mutate != nil {
		mutate(req)
	}
	return req, out
}

// lastID is the id of the container request made last.
func (f *fixture) lastID() string { return fmt.Sprintf("c%d", f.n) }

// create creates a container running the app with args.
func (f *fixture) create(mutate func(*api.CreateRequest), args ...string) (*api.CreateRequest, string, error) {
	req, out := f.request(mutate, args...)
	_, err := f.h.Create(context.Background(), req)
	return req, out, err
}

// waitOutput waits until the output file has a line containing s.
func (f *fixture) waitOutput(out, s string) string {
	f.t.Helper()
	for deadline := time.Now().Add(20 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		b, _ := os.ReadFile(out)
		if strings.Contains(string(b), s) {
			return string(b)
		}
		if time.Now().After(deadline) {
			f.t.Fatalf("output has no %q:\n%s", s, b)
		}
	}
}

func (f *fixture) run(mutate func(*api.CreateRequest), args ...string) (*api.Exit, string) {
	f.t.Helper()
	req, out, err := f.create(mutate, args...)
	if err != nil {
		f.t.Fatalf("create %v: %v", args, err)
	}
	if _, err := f.h.Start(&api.ProcessRef{Id: req.Id}); err != nil {
		f.t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	e, err := f.h.Wait(ctx, &api.ProcessRef{Id: req.Id})
	if err != nil {
		f.t.Fatalf("wait %v: %v", args, err)
	}
	if _, err := f.h.Delete(&api.ProcessRef{Id: req.Id}); err != nil {
		f.t.Fatal(err)
	}
	b, _ := os.ReadFile(out)
	return e, string(b)
}

func TestRun(t *testing.T) {
	f := newFixture(t)
	tests := []struct {
		name   string
		args   []string
		mutate func(*api.CreateRequest)
		status int
		want   string
	}{
		{name: "hello", args: []string{"hello", "x"}, want: `hello from wasm: args=["/app/app.wasm" "hello" "x"] cwd=/`},
		{name: "env", args: []string{"env"}, want: "FOO=bar"},
		{name: "exit code", args: []string{"exit", "3"}, status: 3, want: "exiting with 3"},
		{name: "rootfs", args: []string{"cat", "/etc/hostname"}, want: "wasm-pod"},
		{name: "cwd", args: []string{"hello"}, mutate: func(r *api.CreateRequest) { r.Process.Cwd = "/app" }, want: "cwd=/app"},
		{name: "write", args: []string{"write", "/data/x", "y"}, want: "wrote /data/x"},
		{name: "read-only rootfs", args: []string{"write", "/data/x", "y"}, mutate: func(r *api.CreateRequest) { r.Readonly = true },
			status: 1, want: "read-only file system"},
		{name: "trap", args: []string{"trap"}, status: statusTrap, want: "kuasar-wasm: the module trapped"},
		{name: "memory limit", args: []string{"hog", "8"}, mutate: func(r *api.CreateRequest) { r.Limits = &api.Limits{MemoryBytes: 48 << 20} },
			status: statusOOM, want: "allocated MiB: 16"},
		{name: "pod memory limit", args: []string{"hog", "8"}, mutate: func(r *api.CreateRequest) { r.PodMemoryBytes = 40 << 20; r.Pod = "small" },
			status: statusOOM, want: "allocated MiB: 8"},
		{name: "user", args: []string{"write", "/app/x", "y"}, mutate: func(r *api.CreateRequest) { r.Process.User = &api.User{Uid: 1000, Gid: 1000} },
			status: 1, want: "permission denied"},
		{name: "user may write where allowed", args: []string{"write", "/data/by-user", "y"}, mutate: func(r *api.CreateRequest) { r.Process.User = &api.User{Uid: 1000, Gid: 1000} },
			want: "wrote /data/by-user"},
		{name: "device nodes do nothing", args: []string{"cat", "/devzero"}, status: 1, want: "permission denied"},
		{name: "root with the capabilities it keeps", args: []string{"write", "/sealed/x", "y"}, status: 0, want: "wrote /sealed/x"},
		{name: "root without CAP_DAC_OVERRIDE", args: []string{"write", "/sealed/y", "y"}, status: 1, want: "permission denied",
			mutate: func(r *api.CreateRequest) {
				r.Process.Capabilities = &api.Capabilities{Bounding: []string{"CAP_CHOWN"}, Effective: []string{"CAP_CHOWN"}}
			}},
		{name: "hostile poll_oneoff", args: []string{"poll-overflow"}, want: "poll_oneoff errno 28"},
		{name: "a FIFO in the image does not hang the module", args: []string{"cat", "/fifo"}}, // reads as empty: no writer
		{name: "PATH lookup", args: []string{"echo", "found"}, mutate: func(r *api.CreateRequest) {
			r.Process.Args[0] = "app"
			r.Process.Env = append(r.Process.Env, "PATH=/app")
		}, want: "found"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e, out := f.run(tt.mutate, tt.args...)
			if int(e.GetStatus()) != tt.status || !strings.Contains(strings.ToLower(out), strings.ToLower(tt.want)) {
				t.Fatalf("status %d (want %d), reason %q, output:\n%s\nwant it to contain %q", e.GetStatus(), tt.status, e.GetReason(), out, tt.want)
			}
			if tt.status == statusOOM && !e.GetOom() {
				t.Fatalf("exit %+v not marked OOM", e)
			}
		})
	}
}

func TestMounts(t *testing.T) {
	f := newFixture(t)
	src := filepath.Join(f.dir, "volume")
	if err := os.MkdirAll(src, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(src, "file"), []byte("from the volume"), 0o644); err != nil {
		t.Fatal(err)
	}
	hosts := filepath.Join(f.dir, "hosts")
	if err := os.WriteFile(hosts, []byte("127.0.0.1 wasm\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	// A symlink in the image that points out of it must stay inside.
	if err := os.Symlink("/", filepath.Join(f.root, "escape")); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(f.dir, filepath.Join(f.root, "hostdir")); err != nil {
		t.Fatal(err)
	}
	mounts := func(r *api.CreateRequest) {
		r.Mounts = []*api.Mount{
			{Type: "bind", Source: src, Destination: "/mnt/vol", Options: []string{"rbind", "ro"}},
			{Type: "bind", Source: hosts, Destination: "/etc/hosts", Options: []string{"rbind"}},
			{Type: "bind", Source: src, Destination: "/escape/vol2", Options: []string{"rbind"}},
			{Type: "tmpfs", Source: "tmpfs", Destination: "/scratch", Options: []string{"size=1m"}},
			{Type: "proc", Source: "proc", Destination: "/proc"},
			{Type: "bind", Source: "/nonexistent-shm", Destination: "/dev/shm", Options: []string{"rbind"}},
		}
	}
	for _, tc := range []struct {
		args   []string
		status int
		want   string
	}{
		{[]string{"cat", "/mnt/vol/file"}, 0, "from the volume"},
		{[]string{"cat", "/etc/hosts"}, 0, "127.0.0.1 wasm"},
		{[]string{"write", "/mnt/vol/new", "x"}, 1, "read-only file system"},
		{[]string{"cat", "/vol2/file"}, 0, "from the volume"}, // /escape -> / resolved inside the rootfs
		{[]string{"ls", "/hostdir"}, 1, "no such file"},
		{[]string{"write", "/scratch/x", "y"}, 0, "wrote /scratch/x"},
		{[]string{"ls", "/proc"}, 1, "no such file"},
	} {
		e, out := f.run(mounts, tc.args...)
		if int(e.GetStatus()) != tc.status || !strings.Contains(strings.ToLower(out), tc.want) {
			t.Errorf("%v: status %d (want %d), output:\n%s\nwant %q", tc.args, e.GetStatus(), tc.status, out, tc.want)
		}
	}
	if _, err := os.Stat(filepath.Join(f.root, "vol2")); err != nil {
		t.Errorf("the /escape/vol2 mount point was not made inside the rootfs: %v", err)
	}
}

func TestKill(t *testing.T) {
	f := newFixture(t)
	for _, args := range [][]string{{"loop"}, {"sleep"}, {"stdin"}} {
		req, _, err := f.create(func(r *api.CreateRequest) {
			if args[0] == "stdin" {
				fifo := filepath.Join(f.dir, "stdin")
				_ = os.Remove(fifo)
				if err := unix.Mkfifo(fifo, 0o600); err != nil {
					t.Fatal(err)
				}
				r.Process.Stdio.Stdin = fifo
			}
		}, args...)
		if err != nil {
			t.Fatal(err)
		}
		ref := &api.ProcessRef{Id: req.Id}
		if _, err := f.h.Start(ref); err != nil {
			t.Fatal(err)
		}
		time.Sleep(300 * time.Millisecond)
		if st, _ := f.h.State(ref); st.GetStatus() != api.Status_RUNNING {
			t.Fatalf("%v: %+v, want running", args, st)
		}
		begin := time.Now()
		if err := f.h.Kill(&api.KillRequest{Ref: ref, Signal: int32(unix.SIGTERM)}); err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		e, err := f.h.Wait(ctx, ref)
		cancel()
		if err != nil {
			t.Fatalf("%v did not stop on SIGTERM: %v", args, err)
		}
		if int(e.GetStatus()) != 128+int(unix.SIGTERM) {
			t.Errorf("%v: status %d, want %d", args, e.GetStatus(), 128+int(unix.SIGTERM))
		}
		t.Logf("%v stopped in %v", args, time.Since(begin))
		if err := f.h.Kill(&api.KillRequest{Ref: ref, Signal: int32(unix.SIGKILL)}); !errdefs.IsNotFound(err) {
			t.Errorf("killing a stopped process: %v, want not found", err)
		}
		if _, err := f.h.Delete(ref); err != nil {
			t.Fatal(err)
		}
	}
}

func TestExec(t *testing.T) {
	f := newFixture(t)
	req, _, err := f.create(nil, "sleep")
	if err != nil {
		t.Fatal(err)
	}
	ref := &api.ProcessRef{Id: req.Id}
	if _, err := f.h.Start(ref); err != nil {
		t.Fatal(err)
	}
	out := filepath.Join(f.dir, "exec-out")
	if _, err := f.h.Exec(context.Background(), &api.ExecRequest{Id: req.Id, ExecId: "e1", Process: &api.Process{
		Args: []string{"/app/app.wasm", "cat", "/etc/hostname"}, Stdio: &api.Stdio{Stdout: "file://" + out},
	}}); err != nil {
		t.Fatal(err)
	}
	eref := &api.ProcessRef{Id: req.Id, ExecId: "e1"}
	if _, err := f.h.Start(eref); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	e, err := f.h.Wait(ctx, eref)
	if err != nil || e.GetStatus() != 0 {
		t.Fatalf("exec: %+v %v", e, err)
	}
	if b, _ := os.ReadFile(out); string(b) != "wasm-pod\n" {
		t.Fatalf("exec output %q", b)
	}
	if _, err := f.h.Exec(context.Background(), &api.ExecRequest{Id: req.Id, ExecId: "e2", Process: &api.Process{Args: []string{"sh"}}}); !errdefs.IsNotFound(err) {
		t.Errorf("exec of a non-module: %v, want not found", err)
	}
	if err := f.h.Kill(&api.KillRequest{Ref: ref, Signal: int32(unix.SIGKILL), All: true}); err != nil {
		t.Fatal(err)
	}
	if _, err := f.h.Wait(ctx, ref); err != nil {
		t.Fatal(err)
	}
	if _, err := f.h.Delete(ref); err != nil {
		t.Fatal(err)
	}
}

func TestCreateErrors(t *testing.T) {
	f := newFixture(t)
	write := func(name string, b []byte) {
		if err := os.WriteFile(filepath.Join(f.root, name), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	write("garbage.wasm", []byte("\x00asm\x01\x00\x00\x00garbage"))
	write("text.wasm", []byte("#!/bin/sh\n"))
	// A module importing env.foo, which the host does not provide.
	write("imports.wasm", []byte("\x00asm\x01\x00\x00\x00\x01\x04\x01\x60\x00\x00\x02\x0b\x01\x03env\x03foo\x00\x00"))
	for _, tc := range []struct {
		module string
		is     func(error) bool
		want   string
	}{
		{"/missing.wasm", errdefs.IsNotFound, "not found"},
		{"/garbage.wasm", errdefs.IsInvalidArgument, "invalid WebAssembly module"},
		{"/text.wasm", errdefs.IsInvalidArgument, "not a WebAssembly module"},
		{"/imports.wasm", errdefs.IsInvalidArgument, "env.foo"},
	} {
		_, _, err := f.create(func(r *api.CreateRequest) { r.Process.Args = []string{tc.module} })
		if err == nil || !tc.is(err) || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v, want an error with %q", tc.module, err, tc.want)
		}
	}
	if n := f.h.HostStats().GetContainers(); n != 0 {
		t.Errorf("%d containers left after failed creates", n)
	}
}

func TestListen(t *testing.T) {
	f := newFixture(t)
	addr := "127.0.0.1:18931"
	req, out, err := f.create(func(r *api.CreateRequest) { r.Listen = []string{addr} }, "serve")
	if err != nil {
		t.Fatal(err)
	}
	ref := &api.ProcessRef{Id: req.Id}
	if _, err := f.h.Start(ref); err != nil {
		t.Fatal(err)
	}
	var reply []byte
	begin := time.Now()
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		c, err := net.Dial("tcp", addr)
		if err != nil {
			continue
		}
		fmt.Fprintf(c, "GET /x HTTP/1.0\r\n\r\n")
		resp, err := http.ReadResponse(bufio.NewReader(c), nil)
		if err == nil {
			reply, _ = io.ReadAll(resp.Body)
		}
		c.Close()
		break
	}
	t.Logf("reply after %v", time.Since(begin))
	if b, _ := os.ReadFile(out); len(b) > 0 {
		t.Logf("server output:\n%s", b)
	}
	if !strings.Contains(string(reply), "hello from wasm over http: GET /x") {
		b, _ := os.ReadFile(out)
		t.Fatalf("reply %q; output:\n%s", reply, b)
	}
	// Waiting for connections must not spin: a spinning module uses a
	// whole core; a paced one a few percent of it.
	s1, _ := f.h.Stats(ref)
	begin = time.Now()
	time.Sleep(2 * time.Second)
	s2, _ := f.h.Stats(ref)
	used := time.Duration(s2.GetCpuUserNanos() + s2.GetCpuSystemNanos() - s1.GetCpuUserNanos() - s1.GetCpuSystemNanos())
	if share := float64(used) / float64(time.Since(begin)); share > 0.5 {
		t.Errorf("an idle server used %v of CPU in %v", used, time.Since(begin))
	}
	if err := f.h.Kill(&api.KillRequest{Ref: ref, Signal: int32(unix.SIGTERM)}); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := f.h.Wait(ctx, ref); err != nil {
		t.Fatalf("server did not stop: %v", err)
	}
	t.Logf("stopped after %v", time.Since(begin))
	if _, err := f.h.Delete(ref); err != nil {
		t.Fatal(err)
	}
	if c, err := net.Dial("tcp", addr); err == nil {
		c.Close()
		t.Error("listener still open after delete")
	}
}

func TestExecEndsWithInit(t *testing.T) {
	f := newFixture(t)
	req, _, err := f.create(nil, "sleep")
	if err != nil {
		t.Fatal(err)
	}
	ref := &api.ProcessRef{Id: req.Id}
	if _, err := f.h.Start(ref); err != nil {
		t.Fatal(err)
	}
	eref := &api.ProcessRef{Id: req.Id, ExecId: "e"}
	if _, err := f.h.Exec(context.Background(), &api.ExecRequest{Id: req.Id, ExecId: "e", Process: &api.Process{Args: []string{"/app/app.wasm", "sleep"}}}); err != nil {
		t.Fatal(err)
	}
	if _, err := f.h.Start(eref); err != nil {
		t.Fatal(err)
	}
	if err := f.h.Kill(&api.KillRequest{Ref: ref, Signal: int32(unix.SIGTERM)}); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := f.h.Wait(ctx, eref); err != nil {
		t.Fatalf("the exec outlived its container's init: %v", err)
	}
	if _, err := f.h.Start(ref); !errdefs.IsFailedPrecondition(err) {
		t.Errorf("starting an exited process: %v", err)
	}
	if _, err := f.h.Delete(ref); err != nil {
		t.Fatal(err)
	}
}

func TestConcurrentDeletes(t *testing.T) {
	f := newFixture(t)
	var reqs []*api.CreateRequest
	for i := 0; i < 2; i++ {
		req, _, err := f.create(func(r *api.CreateRequest) { r.PodMemoryBytes = 512 << 20 }, "sleep")
		if err != nil {
			t.Fatal(err)
		}
		if _, err := f.h.Start(&api.ProcessRef{Id: req.Id}); err != nil {
			t.Fatal(err)
		}
		reqs = append(reqs, req)
	}
	// What the daemon exports as kuasar_wasm_host_*: an instance counts
	// once its thread runs it.
	eventually(t, "two instances running", 20*time.Second, func() bool { return f.h.HostStats().GetInstances() == 2 })
	if st := f.h.HostStats(); st.GetModules() < 1 || st.GetLinearMemoryBytes() <= 0 || st.GetResidentMemoryBytes() <= st.GetLinearMemoryBytes() {
		t.Fatalf("with two instances running: %+v", st)
	}
	gone := &api.ProcessRef{Id: reqs[0].Id}
	if err := f.h.Kill(&api.KillRequest{Ref: gone, Signal: int32(unix.SIGKILL)}); err != nil {
		t.Fatal(err)
	}
	if _, err := f.h.Wait(context.Background(), gone); err != nil {
		t.Fatal(err)
	}
	errs := make(chan error, 3)
	for i := 0; i < 3; i++ {
		go func() {
			_, err := f.h.Delete(gone)
			if errdefs.IsNotFound(err) {
				err = nil // one of the others got there first
			}
			errs <- err
		}()
	}
	for i := 0; i < 3; i++ {
		if err := <-errs; err != nil {
			t.Errorf("delete: %v", err)
		}
	}
	if st := f.h.HostStats(); st.GetContainers() != 1 || st.GetPods() != 1 || st.GetInstances() != 1 {
		t.Fatalf("after deleting one of two containers: %+v", st)
	}
	if err := f.h.ReleasePod("pod"); err != nil {
		t.Fatal(err)
	}
	if st := f.h.HostStats(); st.GetContainers() != 0 || st.GetPods() != 0 {
		t.Fatalf("after releasing the pod: %+v", st)
	}
}

// TestClientReconnects: a host that went away (idle, or killed) and came
// back is reached again by the next call, which is made once more.
func TestClientReconnects(t *testing.T) {
	needRoot(t)
	sock := filepath.Join(t.TempDir(), "host.sock")
	serve := func() (context.CancelFunc, chan struct{}) {
		h, err := NewHost(context.Background(), Options{})
		if err != nil {
			t.Fatal(err)
		}
		l, err := Listen(sock)
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan struct{})
		go func() {
			defer close(done)
			_ = h.Serve(ctx, l)
			l.Close()
			h.Close(context.Background())
		}()
		return cancel, done
	}
	stop, done := serve()
	c := NewClient(Launch{Socket: sock})
	defer c.Close()
	first, err := c.Connect(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	stop()
	<-done
	// ttrpc closes a server's connections asynchronously: wait until the
	// client saw its connection end, as it does when a host process exits.
	for deadline := time.Now().Add(10 * time.Second); c.current() != nil; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the client never saw the old host's connection end")
		}
	}
	stop, done = serve()
	defer func() { stop(); <-done }()
	st, err := c.HostStats(context.Background())
	if err != nil {
		t.Fatalf("call after the host came back: %v", err)
	}
	if boot := c.Boot(); boot == first.GetBoot() || st.GetContainers() != 0 {
		t.Fatalf("still on the old host (%s), or stats %+v", boot, st)
	}
}
