package reaper

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func TestParseStat(t *testing.T) {
	tests := []struct {
		in    string
		state byte
		ppid  int
		ok    bool
	}{
		{"12 (sh) Z 1 12 12 0", 'Z', 1, true},
		{"12 (a) b) c) S 7 1", 'S', 7, true},
		{"12 (x", 0, 0, false},
		{"12 (x) Z", 0, 0, false},
		{"12 (x) Z notanumber", 0, 0, false},
	}
	for _, tc := range tests {
		s, p, ok := parseStat([]byte(tc.in))
		if s != tc.state || p != tc.ppid || ok != tc.ok {
			t.Errorf("parseStat(%q) = %c %d %v", tc.in, s, p, ok)
		}
	}
}

// TestWatchAndExec reaps real children of the test process: one watched
// (as a container process would be), one run through os/exec (left to
// exec.Cmd.Wait), one watched only after it was reaped.
func TestWatchAndExec(t *testing.T) {
	ctx := context.Background()
	r := New()

	watched := exec.Command("sh", "-c", "exit 3")
	if err := watched.Start(); err != nil {
		t.Fatal(err)
	}
	w := r.Watch(watched.Process.Pid)

	late := exec.Command("sh", "-c", "kill -9 $$")
	if err := late.Start(); err != nil {
		t.Fatal(err)
	}

	execd := exec.Command("sh", "-c", "exit 5")
	if err := r.Start(execd); err != nil {
		t.Fatal(err)
	}
	// Let every child become a zombie, then reap.
	waitZombie(t, watched.Process.Pid)
	waitZombie(t, late.Process.Pid)
	waitZombie(t, execd.Process.Pid)
	r.Reap(ctx)

	select {
	case e := <-w:
		if e.Code() != 3 {
			t.Errorf("watched exit %d, want 3", e.Code())
		}
	case <-time.After(10 * time.Second):
		t.Fatal("no exit for the watched process")
	}
	if e := <-r.Watch(late.Process.Pid); e.Code() != 128+9 {
		t.Errorf("late watch: exit %d, want 137", e.Code())
	}
	err := execd.Wait()
	r.Done(execd.Process.Pid)
	if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != 5 {
		t.Errorf("os/exec child: %v, want exit status 5", err)
	}
}

func waitZombie(t *testing.T, pid int) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		b, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "stat"))
		if err == nil {
			if s, _, ok := parseStat(b); ok && s == 'Z' {
				return
			}
		}
		time.Sleep(5 * time.Millisecond)
	}
	t.Fatalf("pid %d did not exit", pid)
}

func TestUnwatchedBound(t *testing.T) {
	r := New()
	for pid := 1; pid <= keepUnwatched+10; pid++ {
		r.deliver(context.Background(), Exit{Pid: pid, Status: unix.WaitStatus(0)})
	}
	if len(r.unwatched) != keepUnwatched || len(r.order) != keepUnwatched {
		t.Fatalf("kept %d/%d exits", len(r.unwatched), len(r.order))
	}
	if _, ok := r.unwatched[1]; ok {
		t.Error("the oldest exit was kept")
	}
}
