package monitor

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/kuasar-io/containerd-kuasar/plugins/keeper"
	"github.com/kuasar-io/containerd-kuasar/plugins/keeper/api"
)

const serveEnv = "MONITOR_TEST_KEEPER"

func TestMain(m *testing.M) {
	if sock := os.Getenv(serveEnv); sock != "" {
		l, err := keeper.Listen(sock)
		if err != nil {
			os.Exit(2)
		}
		_ = keeper.NewServer(2*time.Second).Serve(context.Background(), l)
		os.Exit(0)
	}
	os.Exit(m.Run())
}

type testMonitor struct {
	*Monitor
	sock string
}

func newMonitor(t *testing.T) *testMonitor {
	t.Helper()
	dir := t.TempDir()
	self, _ := os.Executable()
	sock := filepath.Join(dir, "k.sock")
	t.Setenv(serveEnv, sock)
	m := New(keeper.Launch{Binary: self, Socket: sock, LogPath: filepath.Join(dir, "log"), Args: []string{"-test.run=^$"}})
	if err := m.Connect(context.Background()); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		pid := m.keeperPid()
		m.Close()
		syscall.Kill(pid, syscall.SIGKILL)
	})
	return &testMonitor{Monitor: m, sock: sock}
}

func (m *Monitor) keeperPid() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.client == nil {
		return 0
	}
	return m.client.KeeperPid
}

func spawn(t *testing.T, m *testMonitor, script string) keeper.ProcessRef {
	t.Helper()
	r, err := m.Spawn(context.Background(), &api.SpawnRequest{Path: "/bin/sh", Args: []string{"sh", "-c", script}})
	if err != nil {
		t.Fatal(err)
	}
	return r.Process
}

func watch(t *testing.T, m *testMonitor, ref keeper.ProcessRef) <-chan keeper.Exit {
	t.Helper()
	ch := make(chan keeper.Exit, 2)
	m.Watch(context.Background(), ref, func(e keeper.Exit) { ch <- e })
	return ch
}

func wait(t *testing.T, ch <-chan keeper.Exit, what string) keeper.Exit {
	t.Helper()
	select {
	case e := <-ch:
		return e
	case <-time.After(10 * time.Second):
		t.Fatalf("no exit for %s", what)
	}
	return keeper.Exit{}
}

func TestWatch(t *testing.T) {
	m := newMonitor(t)
	tests := []struct {
		script string
		want   int
	}{
		{"exit 0", 0},
		{"sleep 0.2; exit 4", 4},
		{"kill -TERM $$", 143},
	}
	for _, tc := range tests {
		t.Run(tc.script, func(t *testing.T) {
			ref := spawn(t, m, tc.script)
			e := wait(t, watch(t, m, ref), tc.script)
			if e.Status != tc.want || e.Process != ref || e.Lost {
				t.Fatalf("exit %+v, want %d of %v", e, tc.want, ref)
			}
		})
	}
}

// A stale reference (a pid now used by another process) is reported lost
// at once, never attached to the process that has the pid now.
func TestWatchStaleRefIsLost(t *testing.T) {
	m := newMonitor(t)
	stale := keeper.ProcessRef{Pid: os.Getpid(), StartTime: 1}
	e := wait(t, watch(t, m, stale), "a stale ref")
	if !e.Lost || e.Status != LostStatus {
		t.Fatalf("exit %+v, want lost", e)
	}
}

func TestRewatchDeliversBeforeReturning(t *testing.T) {
	m := newMonitor(t)
	ref := spawn(t, m, "exit 5")
	// Register interest, as the first daemon did, and let it exit.
	c, err := m.conn(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c.Wait(context.Background(), ref, true); err != nil {
		t.Fatal(err)
	}
	time.Sleep(200 * time.Millisecond)
	var got *keeper.Exit
	if err := m.Rewatch(context.Background(), ref, func(e keeper.Exit) { got = &e }); err != nil {
		t.Fatal(err)
	}
	if got == nil || got.Status != 5 {
		t.Fatalf("Rewatch returned before delivering: %+v", got)
	}
}

// When the keeper is killed, watched processes are still reported when
// they end (status lost) through a keeper started anew.
func TestKeeperReplaced(t *testing.T) {
	m := newMonitor(t)
	ref := spawn(t, m, "sleep 1")
	ch := watch(t, m, ref)
	old := m.keeperPid()
	t.Setenv(serveEnv, m.sock)
	syscall.Kill(old, syscall.SIGKILL)
	e := wait(t, ch, "a process of a killed keeper")
	if !e.Lost || e.Status != LostStatus {
		t.Fatalf("exit %+v, want lost", e)
	}
	if pid := m.keeperPid(); pid == 0 || pid == old {
		t.Fatalf("keeper not replaced: %d", pid)
	}
	// The new keeper works as the old one did.
	if e := wait(t, watch(t, m, spawn(t, m, "exit 3")), "exit 3"); e.Status != 3 {
		t.Fatalf("exit %+v", e)
	}
}

// Many processes exiting at once while others are spawned and watched:
// every exit reaches its watcher (the old keeper protocol could deadlock
// here, an exit event racing a subscribe reply).
func TestConcurrentSpawnAndExits(t *testing.T) {
	m := newMonitor(t)
	const n = 60
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for i := 0; i < n; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r, err := m.Spawn(context.Background(), &api.SpawnRequest{Path: "/bin/sh", Args: []string{"sh", "-c", fmt.Sprintf("exit %d", i%7)}})
			if err != nil {
				errs <- err
				return
			}
			ch := make(chan keeper.Exit, 1)
			m.Watch(context.Background(), r.Process, func(e keeper.Exit) { ch <- e })
			select {
			case e := <-ch:
				if e.Status != i%7 {
					errs <- fmt.Errorf("process %d: exit %+v", i, e)
				}
			case <-time.After(20 * time.Second):
				errs <- fmt.Errorf("process %d: no exit", i)
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}
