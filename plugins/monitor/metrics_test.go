package monitor

import (
	"syscall"
	"testing"
	"time"

	"github.com/kuasar-io/containerd-kuasar/plugins/keeper"
	"github.com/kuasar-io/containerd-kuasar/plugins/metrics/metricstest"
)

func TestKeeperMetrics(t *testing.T) {
	read := func(m *Monitor) metricstest.Series {
		t.Helper()
		s, err := metricstest.Gather(m.collector())
		if err != nil {
			t.Fatal(err)
		}
		return s
	}
	// No keeper: nothing is dialled or started.
	idle := New(keeper.Launch{Socket: t.TempDir() + "/none.sock"})
	s := read(idle)
	if s["kuasar_keeper_up{}"] != 0 || s["kuasar_keeper_children{}"] != 0 || s["kuasar_keeper_watched_processes{}"] != 0 {
		t.Fatalf("without a keeper: %v", s)
	}
	if idle.keeperPid() != 0 {
		t.Fatal("a scrape connected to a keeper")
	}

	m := newMonitor(t)
	ref := spawn(t, m, "exec sleep 60")
	ch := watch(t, m, ref)
	s = read(m.Monitor)
	if s["kuasar_keeper_up{}"] != 1 || s["kuasar_keeper_children{}"] != 1 || s["kuasar_keeper_watched_processes{}"] != 1 {
		t.Fatalf("with one child watched: %v", s)
	}
	if err := syscall.Kill(ref.Pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	wait(t, ch, "the child's exit")
	// The exit is delivered before the keeper reaps it for good: poll.
	deadline := time.Now().Add(10 * time.Second)
	for {
		s = read(m.Monitor)
		if s["kuasar_keeper_children{}"] == 0 && s["kuasar_keeper_watched_processes{}"] == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("after the child's exit: %v", s)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
