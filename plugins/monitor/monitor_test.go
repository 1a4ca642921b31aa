package monitor

import (
	"context"
	"net"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/kuasar-io/containerd-kuasar/plugins/internal/proc"
	"github.com/kuasar-io/containerd-kuasar/plugins/keeper"
)

const serveEnv = "MONITOR_TEST_KEEPER"

func TestMain(m *testing.M) {
	if sock := os.Getenv(serveEnv); sock != "" {
		l, err := net.ListenUnix("unixpacket", &net.UnixAddr{Name: sock, Net: "unixpacket"})
		if err != nil {
			os.Exit(2)
		}
		_ = keeper.NewServer(2*time.Second).Serve(context.Background(), l)
		os.Exit(0)
	}
	os.Exit(m.Run())
}

func newMonitor(t *testing.T) *Monitor {
	t.Helper()
	dir := t.TempDir()
	self, _ := os.Executable()
	t.Setenv(serveEnv, filepath.Join(dir, "k.sock"))
	m := New(keeper.Launch{Binary: self, Socket: filepath.Join(dir, "k.sock"), LogPath: filepath.Join(dir, "log"), Args: []string{"-test.run=^$"}})
	if err := m.Connect(context.Background()); err != nil {
		t.Fatal(err)
	}
	os.Unsetenv(serveEnv)
	t.Cleanup(func() {
		pid := m.keeperPid
		m.Close()
		syscall.Kill(pid, syscall.SIGKILL)
	})
	return m
}

func spawn(t *testing.T, m *Monitor, script string) int {
	t.Helper()
	pid, _, err := m.Spawn(context.Background(), keeper.SpawnRequest{
		Path: "/bin/sh", Args: []string{"sh", "-c", script}, Stdio: [3]int{keeper.NoFD, keeper.NoFD, keeper.NoFD},
	})
	if err != nil {
		t.Fatal(err)
	}
	return pid
}

func watch(t *testing.T, m *Monitor, pid int, start uint64) keeper.Exit {
	t.Helper()
	ch := make(chan keeper.Exit, 1)
	if err := m.Watch(context.Background(), pid, start, func(e keeper.Exit) { ch <- e }); err != nil {
		t.Fatal(err)
	}
	select {
	case e := <-ch:
		return e
	case <-time.After(5 * time.Second):
		t.Fatalf("no exit for %d", pid)
	}
	return keeper.Exit{}
}

func TestWatch(t *testing.T) {
	m := newMonitor(t)
	tests := []struct {
		name   string
		script string
		before func(pid int) // between spawn and Watch
		after  func(pid int) // after Watch registered
		want   int
	}{
		// The exit is reaped before anyone watches: it must not be lost.
		{"exited before watch", "exit 3", func(int) { time.Sleep(100 * time.Millisecond) }, nil, 3},
		{"exits while watched", "sleep 0.2; exit 4", nil, nil, 4},
		{"killed", "sleep 30", nil, func(pid int) { syscall.Kill(pid, syscall.SIGKILL) }, 137},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			pid := spawn(t, m, tt.script)
			start := proc.StartTime(pid)
			if tt.before != nil {
				tt.before(pid)
			}
			if tt.after != nil {
				go func() { time.Sleep(50 * time.Millisecond); tt.after(pid) }()
			}
			if e := watch(t, m, pid, start); e.Status != tt.want {
				t.Fatalf("exit %+v, want status %d", e, tt.want)
			}
		})
	}
}

// A process that is not the keeper's and is gone has no status to report.
func TestWatchUnknownIsLost(t *testing.T) {
	m := newMonitor(t)
	p, err := os.StartProcess("/bin/true", []string{"true"}, &os.ProcAttr{})
	if err != nil {
		t.Fatal(err)
	}
	p.Wait()
	if e := watch(t, m, p.Pid, 0); e.Status != LostStatus {
		t.Fatalf("exit %+v, want %d", e, LostStatus)
	}
}

// Rewatch delivers an exit that happened before it was called before it
// returns (a container recovered after a restart must be known exited
// before containerd's task runtime asks about it).
func TestRewatchDeliversBeforeReturning(t *testing.T) {
	m := newMonitor(t)
	pid := spawn(t, m, "exit 7")
	start := proc.StartTime(pid)
	time.Sleep(200 * time.Millisecond) // reaped by the keeper, unwatched
	var got *keeper.Exit
	if err := m.Rewatch(context.Background(), pid, start, func(e keeper.Exit) { got = &e }); err != nil {
		t.Fatal(err)
	}
	if got == nil || got.Status != 7 {
		t.Fatalf("after Rewatch returned: %+v, want the exit (7) delivered", got)
	}
}
