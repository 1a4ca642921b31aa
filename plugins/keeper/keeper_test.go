package keeper

import (
	"context"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

const serveEnv = "KEEPER_TEST_SERVE"

// TestMain lets the test binary act as a keeper process when re-executed.
func TestMain(m *testing.M) {
	if sock := os.Getenv(serveEnv); sock != "" {
		l, err := net.ListenUnix("unixpacket", &net.UnixAddr{Name: sock, Net: "unixpacket"})
		if err != nil {
			os.Exit(2)
		}
		_ = NewServer(2*time.Second).Serve(context.Background(), l)
		os.Exit(0)
	}
	os.Exit(m.Run())
}

func startKeeper(t *testing.T) (*Client, string) {
	t.Helper()
	dir := t.TempDir()
	sock := filepath.Join(dir, "k.sock")
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	t.Setenv(serveEnv, sock)
	ctx := context.Background()
	c, err := Connect(ctx, Launch{Binary: self, Socket: sock, LogPath: filepath.Join(dir, "log"), Args: []string{"-test.run=^$"}})
	os.Unsetenv(serveEnv)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		c.Close()
		if p, err := os.FindProcess(c.KeeperPid); err == nil {
			p.Signal(unix.SIGKILL)
		}
	})
	return c, sock
}

func TestSpawnWaitReportsExitCode(t *testing.T) {
	c, _ := startKeeper(t)
	ctx := context.Background()
	tests := []struct {
		name   string
		script string
		want   int
	}{
		{"zero", "exit 0", 0},
		{"code", "exit 3", 3},
		{"signal", "kill -KILL $$", 128 + 9},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, exit, err := c.Spawn(ctx, SpawnRequest{Path: "/bin/sh", Args: []string{"sh", "-c", tt.script}, Stdio: [3]int{NoFD, NoFD, NoFD}, Wait: true})
			if err != nil {
				t.Fatal(err)
			}
			if exit == nil || exit.Status != tt.want {
				t.Fatalf("exit = %+v, want status %d", exit, tt.want)
			}
		})
	}
}

func TestSpawnBadRequests(t *testing.T) {
	c, _ := startKeeper(t)
	ctx := context.Background()
	tests := []struct {
		name string
		req  SpawnRequest
	}{
		{"missing binary", SpawnRequest{Path: "/nonexistent/bin", Args: []string{"x"}, Stdio: [3]int{NoFD, NoFD, NoFD}}},
		{"no args", SpawnRequest{Path: "/bin/true", Stdio: [3]int{NoFD, NoFD, NoFD}}},
		{"fd out of range", SpawnRequest{Path: "/bin/true", Args: []string{"true"}, Stdio: [3]int{0, NoFD, NoFD}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if _, _, err := c.Spawn(ctx, tt.req); err == nil {
				t.Fatal("expected an error")
			}
		})
	}
}

// An orphan left by a spawned process is adopted, and its exit is delivered
// and redelivered until acknowledged.
func TestOrphanExitIsKeptUntilAck(t *testing.T) {
	c, sock := startKeeper(t)
	ctx := context.Background()
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	_, exit, err := c.Spawn(ctx, SpawnRequest{
		Path: "/bin/sh", Args: []string{"sh", "-c", "sh -c 'sleep 0.3; exit 7' & echo $!"},
		Stdio: [3]int{NoFD, 0, NoFD}, Wait: true,
	}, w)
	w.Close()
	if err != nil || exit.Status != 0 {
		t.Fatalf("spawn: %v %+v", err, exit)
	}
	buf := make([]byte, 64)
	n, _ := r.Read(buf)
	orphan, err := strconv.Atoi(strings.TrimSpace(string(buf[:n])))
	if err != nil {
		t.Fatalf("orphan pid %q: %v", buf[:n], err)
	}

	got := make(chan Exit, 4)
	backlog, err := c.Subscribe(ctx, func(e Exit) { got <- e })
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range backlog {
		got <- e
	}
	e := waitExit(t, got, orphan)
	if e.Status != 7 {
		t.Fatalf("orphan exit %+v, want 7", e)
	}

	// A second client (a restarted daemon) sees it again until acked.
	c2, err := Dial(ctx, sock)
	if err != nil {
		t.Fatal(err)
	}
	defer c2.Close()
	backlog, err = c2.Subscribe(ctx, func(Exit) {})
	if err != nil {
		t.Fatal(err)
	}
	if len(backlog) != 1 || backlog[0].Pid != orphan {
		t.Fatalf("backlog %+v, want the orphan's exit", backlog)
	}
	if err := c2.Ack(ctx, orphan); err != nil {
		t.Fatal(err)
	}
	c3, err := Dial(ctx, sock)
	if err != nil {
		t.Fatal(err)
	}
	defer c3.Close()
	backlog, err = c3.Subscribe(ctx, func(Exit) {})
	if err != nil {
		t.Fatal(err)
	}
	if len(backlog) != 0 {
		t.Fatalf("acknowledged exit redelivered: %+v", backlog)
	}
}

func waitExit(t *testing.T, ch <-chan Exit, pid int) Exit {
	t.Helper()
	deadline := time.After(5 * time.Second)
	for {
		select {
		case e := <-ch:
			if e.Pid == pid {
				return e
			}
		case <-deadline:
			t.Fatalf("no exit for pid %d", pid)
		}
	}
}

func TestHeldDescriptorSurvivesClient(t *testing.T) {
	c, sock := startKeeper(t)
	ctx := context.Background()
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	if err := c.PutFD(ctx, "ns/ctr/stdin", w); err != nil {
		t.Fatal(err)
	}
	w.Close()
	c.Close()

	c2, err := Dial(ctx, sock)
	if err != nil {
		t.Fatal(err)
	}
	defer c2.Close()
	w2, err := c2.GetFD(ctx, "ns/ctr/stdin")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := w2.Write([]byte("hi")); err != nil {
		t.Fatal(err)
	}
	w2.Close()
	buf := make([]byte, 2)
	if _, err := r.Read(buf); err != nil || string(buf) != "hi" {
		t.Fatalf("read %q %v", buf, err)
	}
	if _, err := c2.GetFD(ctx, "missing"); err == nil {
		t.Fatal("expected an error for a missing key")
	}
	if err := c2.DropFD(ctx, "ns/", true); err != nil {
		t.Fatal(err)
	}
	// With every write end closed the reader sees EOF.
	r.SetReadDeadline(time.Now().Add(2 * time.Second))
	if n, err := r.Read(buf); n != 0 || err == nil {
		t.Fatalf("expected EOF after drop, got %d %v", n, err)
	}
}
